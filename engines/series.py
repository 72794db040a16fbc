"""Find the series in a study folder and choose the one Readout reads.

Selection rule (`select_series`):

1. Candidates are CT series that are not localizers and hold at least 3 slices.
2. Among axial candidates, take the one with the thinnest slices; ties go to the series
   with more slices, then to the lower SeriesNumber.
3. Without an axial candidate, take the thinnest candidate of another orientation
   (same ties) and warn that no axial series was found.
4. Without any candidate, refuse and list what the folder holds.

Slice thickness is the median SliceThickness of the series' images, or the median distance
between their positions where SliceThickness is missing; a series with neither ranks last.
`load_study_volume` tries candidates in this order until one loads.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from engines.volume import Volume, VolumeError, load_series, orientation_of_normal

_MIN_SLICES = 3
# Enough to group, describe and rank a series without reading whole headers.
_SUMMARY_TAGS = [
    "SOPClassUID",
    "Modality",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "ImageType",
    "Rows",
    "NumberOfFrames",
    "SliceThickness",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
]


@dataclass(frozen=True)
class SeriesInfo:
    """What the headers of one series say, enough to choose between series.

    Attributes
    ----------
    series_instance_uid:
        The series UID; empty for files that had none (grouped by number, modality and
        description instead).
    slices:
        Image planes excluding localizers (frames count for multi-frame images).
    orientation:
        ``axial``, ``coronal``, ``sagittal``, ``oblique``, or ``unknown`` without images.
    slice_thickness_mm:
        Median SliceThickness, else median position spacing, else ``None``.
    localizer:
        True when every image of the series is a localizer.
    """

    series_instance_uid: str
    series_number: int | None
    modality: str
    description: str
    paths: tuple[Path, ...]
    slices: int
    orientation: str
    slice_thickness_mm: float | None
    localizer: bool
    warnings: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """How a person finds the series in a viewer: number, modality and description."""
        number = "?" if self.series_number is None else self.series_number
        return f"series {number} ({self.modality} '{self.description}')"


@dataclass(frozen=True)
class Selection:
    """The series chosen for reading, in one sentence why, and every series that was found."""

    series: SeriesInfo
    reason: str
    warnings: tuple[str, ...] = ()
    found: tuple[SeriesInfo, ...] = ()


def find_series(folder: Path) -> list[SeriesInfo]:
    """Every DICOM series under ``folder`` (searched recursively), ordered by SeriesNumber.

    Only headers are read; files that are not DICOM are ignored. Files without a
    SeriesInstanceUID are grouped by SeriesNumber, Modality and SeriesDescription.
    """
    groups: dict[tuple, list[tuple[Path, Dataset]]] = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_SUMMARY_TAGS)
        except Exception:  # not DICOM or unreadable: a folder walk meets READMEs and DICOMDIRs
            continue
        uid = str(ds.get("SeriesInstanceUID") or "").strip()
        key = (uid,) if uid else ("", ds.get("SeriesNumber"), ds.get("Modality"), ds.get("SeriesDescription"))
        groups.setdefault(key, []).append((path, ds))
    found = [_summarize(key[0], files) for key, files in groups.items()]
    return sorted(found, key=lambda s: (_or_inf(s.series_number), s.series_instance_uid))


def select_series(series: list[SeriesInfo]) -> Selection:
    """The series to read by the module's selection rule (see the module docstring).

    Raises
    ------
    VolumeError
        If no series is a CT volume candidate; the message lists what was found.
    """
    ranked = _ranked(series)
    if not ranked:
        raise VolumeError(_nothing_to_read(series))
    return _selection(ranked[0], series, failures=[])


def load_study_volume(
    folder: Path,
    series_instance_uid: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Volume, Selection]:
    """Load the requested series, or the best series by the selection rule, from ``folder``.

    Without a UID, a candidate that fails to load is passed over for the next one in rule
    order, and the selection's warnings say why.

    Returns
    -------
    tuple[Volume, Selection]
        The loaded volume and which series it is, why, and what to tell the user.

    Raises
    ------
    VolumeError
        If the requested UID is absent, nothing is a candidate, or every candidate fails
        to load (then the first candidate's error).
    """
    series = find_series(folder)
    if not series:
        raise VolumeError(f"no DICOM files found in {folder}")
    if series_instance_uid is not None:
        match = [s for s in series if s.series_instance_uid == series_instance_uid]
        if not match:
            found = "; ".join(f"{s.series_instance_uid} {s.label}" for s in series)
            raise VolumeError(f"series {series_instance_uid} is not in {folder} (found: {found})")
        chosen = match[0]
        selection = Selection(chosen, f"series {series_instance_uid} was requested", chosen.warnings, tuple(series))
        return load_series(chosen.paths, progress), selection

    ranked = _ranked(series)
    if not ranked:
        raise VolumeError(_nothing_to_read(series))
    failures: list[tuple[SeriesInfo, VolumeError]] = []
    for candidate in ranked:
        try:
            volume = load_series(candidate.paths, progress)
        except VolumeError as exc:
            failures.append((candidate, exc))
            continue
        return volume, _selection(candidate, series, failures)
    raise failures[0][1]


def _summarize(uid: str, files: list[tuple[Path, Dataset]]) -> SeriesInfo:
    first = files[0][1]
    images = [ds for _, ds in files if ds.get("Rows")]
    scans = [ds for ds in images if not _is_localizer(ds)]
    orientations = Counter(orientation_of_normal(n) for n in map(_normal, scans) if n is not None)
    warnings = []
    if not uid:
        warnings.append(
            f"{len(files)} file(s) have no SeriesInstanceUID; grouped them by SeriesNumber, "
            f"Modality and SeriesDescription"
        )
    if len(orientations) > 1:
        counts = ", ".join(f"{n} {name}" for name, n in orientations.most_common())
        warnings.append(f"images of several orientations ({counts})")
    return SeriesInfo(
        series_instance_uid=uid,
        series_number=_integer(first.get("SeriesNumber")),
        modality=str(first.get("Modality") or ""),
        description=str(first.get("SeriesDescription") or ""),
        paths=tuple(path for path, _ in files),
        slices=sum(_integer(ds.get("NumberOfFrames")) or 1 for ds in scans),
        orientation=orientations.most_common(1)[0][0] if orientations else "unknown",
        slice_thickness_mm=_thickness(scans),
        localizer=bool(images) and not scans,
        warnings=tuple(warnings),
    )


def _is_localizer(ds: Dataset) -> bool:
    value = ds.get("ImageType") or ()
    return "LOCALIZER" in [v.strip().upper() for v in ([value] if isinstance(value, str) else value)]


def _first_frame(ds: Dataset, keyword: str) -> Dataset:
    """Where a multi-frame image keeps ``keyword`` for its first frame; ``ds`` itself otherwise."""
    for sequence in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(sequence)
        if groups and groups[0].get(keyword):
            return groups[0].get(keyword)[0]
    return ds


def _normal(ds: Dataset) -> np.ndarray | None:
    try:
        iop = np.array(
            [float(v) for v in _first_frame(ds, "PlaneOrientationSequence").ImageOrientationPatient]
        )
        normal = np.cross(iop[:3], iop[3:])
    except (AttributeError, TypeError, ValueError):
        return None
    return normal if np.linalg.norm(normal) > 0.5 else None


def _thickness(scans: list[Dataset]) -> float | None:
    thicknesses = []
    for ds in scans:
        value = _first_frame(ds, "PixelMeasuresSequence").get("SliceThickness")
        try:
            if value not in (None, "") and float(value) > 0:
                thicknesses.append(float(value))
        except (TypeError, ValueError):
            continue
    if thicknesses:
        return float(np.median(thicknesses))
    normals = [n for n in map(_normal, scans) if n is not None]
    try:
        distances = sorted(
            float(np.dot([float(v) for v in ds.ImagePositionPatient], normals[0])) for ds in scans
        )
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    gaps = [b - a for a, b in zip(distances, distances[1:], strict=False) if b - a > 0.01]
    return float(np.median(gaps)) if gaps else None


def _ranked(series: list[SeriesInfo]) -> list[SeriesInfo]:
    """Candidates in the order of the selection rule (axial first)."""
    candidates = [s for s in series if s.modality == "CT" and not s.localizer and s.slices >= _MIN_SLICES]

    def rank(s: SeriesInfo) -> tuple:
        return (
            s.orientation != "axial",
            _or_inf(s.slice_thickness_mm),
            -s.slices,
            _or_inf(s.series_number),
            s.series_instance_uid,
        )

    return sorted(candidates, key=rank)


def _selection(
    chosen: SeriesInfo, series: list[SeriesInfo], failures: list[tuple[SeriesInfo, VolumeError]]
) -> Selection:
    thickness = (
        "thickness unknown" if chosen.slice_thickness_mm is None else f"{chosen.slice_thickness_mm:g} mm"
    )
    which = "axial CT series" if chosen.orientation == "axial" else f"CT series ({chosen.orientation})"
    readable = " that loads" if failures else ""
    reason = f"thinnest {which}{readable} ({thickness}, {chosen.slices} slices) of {len(series)} series"
    warnings = [f"{failed.label} could not be read: {exc}" for failed, exc in failures]
    if chosen.orientation != "axial":
        loadable = "loadable " if failures else ""
        warnings.append(
            f"no {loadable}axial CT series; reading {chosen.label}, which is {chosen.orientation}"
        )
    return Selection(chosen, reason, tuple(warnings) + chosen.warnings, tuple(series))


def _nothing_to_read(series: list[SeriesInfo]) -> str:
    found = "; ".join(f"{s.label}: {s.slices} slice(s){', localizer' if s.localizer else ''}" for s in series)
    return (
        f"no CT series with at least {_MIN_SLICES} slices that is not a localizer; found {found or 'nothing'}"
    )


def _integer(value: object) -> int | None:
    """An IS attribute as int; None when absent, blank or malformed."""
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _or_inf(value: float | None) -> float:
    return math.inf if value is None else value
