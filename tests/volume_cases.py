"""Builders of small, deliberately messy CT series for the volume and series tests.

Every builder starts from `engines.phantom.ct_series_datasets` (axial, head first, dataset
``i`` holding ``hu[i]``) and changes what a real scanner or export would have changed.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from engines.phantom import ct_series_datasets
from engines.volume import Volume


def hu_block(n: int = 8, rows: int = 24, columns: int = 32, seed: int = 0) -> np.ndarray:
    """Random HU in [-1000, 2000) with a distinct value range per slice, indexed [k, r, c]."""
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 2000, size=(n, rows, columns)).astype(np.int16)


def axial_series(
    hu: np.ndarray,
    *,
    seed: int = 1,
    pixel_spacing: tuple[float, float] = (0.7, 0.8),
    slice_spacing: float = 2.5,
    origin: Sequence[float] = (-10.0, -20.0, 30.0),
    **kwargs,
) -> list[Dataset]:
    """Phantom datasets, dataset ``i`` holding ``hu[i]`` at z = origin z + i * slice_spacing."""
    return ct_series_datasets(hu, pixel_spacing, slice_spacing, origin, seed=seed, **kwargs)


def place(
    datasets: Sequence[Dataset],
    row_cos: Sequence[float],
    col_cos: Sequence[float],
    origin: Sequence[float],
    step: Sequence[float],
) -> None:
    """Give dataset ``i`` orientation (row_cos, col_cos) and position origin + i * step."""
    for i, ds in enumerate(datasets):
        ds.ImageOrientationPatient = [float(v) for v in (*row_cos, *col_cos)]
        ds.ImagePositionPatient = [round(float(o + i * s), 4) for o, s in zip(origin, step, strict=True)]


def set_stored(ds: Dataset, stored: np.ndarray, *, signed: bool, bits_stored: int = 16) -> None:
    """Replace the stored pixel values (and the attributes that describe them)."""
    ds.PixelRepresentation = int(signed)
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()


def write_series(datasets: Sequence[Dataset], folder: Path, prefix: str = "IMG") -> list[Path]:
    """Write each dataset as ``folder/{prefix}{i:03d}.dcm`` in list order; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{prefix}{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def enhanced_ct(datasets: Sequence[Dataset], sop_class_uid: str, transfer_syntax_uid: str) -> Dataset:
    """One multi-frame instance of the datasets via highdicom's legacy conversion.

    highdicom writes Legacy Converted Enhanced CT (frames in instance-number order); another
    ``sop_class_uid`` (Enhanced CT) relabels it, which keeps the functional-group layout
    readers must handle.
    """
    image = hd.legacy.LegacyConvertedEnhancedCTImage(
        list(datasets), generate_uid(), 9, generate_uid(), 1, transfer_syntax_uid=transfer_syntax_uid
    )
    image.SOPClassUID = sop_class_uid
    image.file_meta.MediaStorageSOPClassUID = sop_class_uid
    return image


def transcode(paths: Sequence[Path], folder: Path, tool: Sequence[str]) -> list[Path]:
    """Run a dcmtk converter (e.g. ``["dcmcrle"]``) on every file into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in paths:
        target = folder / path.name
        subprocess.run([*tool, str(path), str(target)], check=True, capture_output=True)
        out.append(target)
    return out


def dicom_position(ds: Dataset, r: int, c: int) -> np.ndarray:
    """Patient position of pixel (r, c) by the DICOM formula, from the dataset itself."""
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    return ipp + r * row_spacing * iop[3:] + c * column_spacing * iop[:3]


def assert_volume_matches(volume: Volume, datasets: Sequence[Dataset], hu: np.ndarray) -> None:
    """Each volume slice holds its source dataset's HU and the affine maps voxels where DICOM does."""
    index_of = {ds.SOPInstanceUID: i for i, ds in enumerate(datasets)}
    rows, columns = hu.shape[1:]
    for k, uid in enumerate(volume.sop_instance_uids):
        i = index_of[uid]
        np.testing.assert_array_equal(volume.hu[k], hu[i], err_msg=f"slice k={k}")
        for r, c in ((0, 0), (rows - 1, 0), (0, columns - 1), (rows - 1, columns - 1)):
            voxel = volume.affine @ np.array([k, r, c, 1.0])
            np.testing.assert_allclose(voxel[:3], dicom_position(datasets[i], r, c), atol=1e-3)


def write_study_series(
    folder: Path,
    *,
    seed: int,
    number: int,
    description: str,
    n: int = 6,
    thickness: float = 2.5,
    modality: str = "CT",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
) -> list[Dataset]:
    """Write one small series of a study into ``folder``; returns its datasets."""
    datasets = axial_series(
        hu_block(n=n, rows=16, columns=16, seed=seed),
        seed=seed,
        slice_spacing=thickness,
        series_description=description,
    )
    for ds in datasets:
        ds.SeriesNumber = number
        ds.Modality = modality
        ds.ImageType = list(image_type)
    write_series(datasets, folder, prefix=f"S{number}_")
    return datasets
