"""A CT series as a volume: HU voxels indexed [k, r, c] with their patient geometry.

`k` counts slices sorted ascending by ImagePositionPatient projected on the slice normal
(row direction x column direction), `r` is the image row and `c` the image column.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset


class VolumeError(ValueError):
    """A series that cannot become a volume; the message names the problem for the user."""


@dataclass(frozen=True)
class Volume:
    """HU voxels of one series plus everything needed to map and reference them.

    Attributes
    ----------
    hu:
        Hounsfield units indexed ``[k, r, c]``; int16 unless a rescale slope makes
        values non-integral, then float32.
    affine:
        4x4 matrix from voxel index ``(k, r, c, 1)`` to patient LPS millimetres.
    sop_instance_uids:
        SOP Instance UID of the instance holding each slice, in ``k`` order.
    frame_numbers:
        1-based frame number within a multi-frame instance for each slice, or ``None``
        for single-frame instances, in ``k`` order.
    sources:
        The source instances' headers (no pixel data), one per distinct instance, in
        ``k`` order of first use; writers reference them.
    warnings:
        Human-readable notes about what was excluded, repaired or tolerated.
    """

    hu: np.ndarray
    affine: np.ndarray
    sop_instance_uids: tuple[str, ...]
    frame_numbers: tuple[int | None, ...]
    sources: tuple[Dataset, ...]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    warnings: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.hu.shape)  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Distance between neighbouring voxel centres along k, r and c."""
        return tuple(float(np.linalg.norm(self.affine[:3, i])) for i in range(3))  # type: ignore[return-value]

    @property
    def origin_mm(self) -> tuple[float, float, float]:
        """LPS position of the centre of voxel (0, 0, 0)."""
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def slice_normal(self) -> np.ndarray:
        """Unit vector along increasing k."""
        return self.affine[:3, 0] / np.linalg.norm(self.affine[:3, 0])

    @property
    def orientation(self) -> str:
        """``axial``, ``coronal`` or ``sagittal`` by the slice normal's main axis, else ``oblique``."""
        return orientation_of_normal(self.slice_normal)

    def source_of_slice(self, k: int) -> tuple[Dataset, int | None]:
        """The source instance header and frame number (or ``None``) holding slice ``k``."""
        uid = self.sop_instance_uids[k]
        for ds in self.sources:
            if ds.SOPInstanceUID == uid:
                return ds, self.frame_numbers[k]
        raise KeyError(uid)


def orientation_of_normal(normal: np.ndarray, tolerance_deg: float = 25.0) -> str:
    """Name the plane whose normal is within ``tolerance_deg`` of ``normal``, else ``oblique``."""
    n = np.abs(np.asarray(normal, dtype=float))
    n = n / np.linalg.norm(n)
    axis = int(np.argmax(n))
    if n[axis] < np.cos(np.deg2rad(tolerance_deg)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]
