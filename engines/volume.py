"""A CT series as a volume: HU voxels indexed [k, r, c] with their patient geometry.

`k` counts slices sorted ascending by ImagePositionPatient projected on the slice normal
(row direction x column direction), `r` is the image row and `c` the image column.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array
from pydicom.uid import (
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    LegacyConvertedEnhancedCTImageStorage,
    generate_uid,
)


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


# --- Loading a series -------------------------------------------------------------------------

#: HU written where PixelPaddingValue marks voxels outside the reconstructed field.
PADDING_HU = -1024

_MIN_SLICES = 3
_NATIVE_LITTLE_ENDIAN = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
_MULTI_FRAME_CT = (EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage)
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_SAME_POSITION_MM = 0.01  # two images closer than this along the normal show the same slice
_TILT_LIMIT_DEG = 0.5
_QUIET_SPACING = 0.01  # relative deviation from the median slice spacing accepted silently
_TOLERATED_SPACING = 0.10  # ... accepted with a warning; beyond it the series is refused
_WHOLE_GAP = 0.15  # a gap within this of a multiple of the median spacing means missing slices


@dataclass(frozen=True)
class _NativePixels:
    """Where uncompressed little-endian pixel data of one slice sits in its file."""

    offset: int
    length: int


@dataclass(frozen=True, eq=False)
class _Slice:
    """One image plane found in pass 1: a single-frame instance or one frame of a multi-frame."""

    path: Path
    header: Dataset
    frame: int | None
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    slope: float
    intercept: float
    native: _NativePixels | None

    @property
    def name(self) -> str:
        return self.path.name if self.frame is None else f"{self.path.name} frame {self.frame}"

    @property
    def sop_uid(self) -> str:
        return str(self.header.SOPInstanceUID)

    @property
    def order(self) -> tuple[str, int]:
        """Deterministic tie-break between images of one position."""
        return self.sop_uid, self.frame or 0


class _Unusable(Exception):
    """A file that is DICOM but cannot contribute a slice; the message says why."""


def load_series(paths: Sequence[Path], progress: Callable[[int, int], None] | None = None) -> Volume:
    """Assemble the CT volume held by the files of one series.

    Pass 1 reads headers only, excludes what does not belong (unreadable files, repeated
    instances, localizers, derived images mixed into originals, odd orientations or sizes),
    sorts the slices along the slice normal and checks they form a regular stack. Pass 2
    decodes pixels slice by slice into one preallocated array.

    Parameters
    ----------
    paths:
        The series' files, in any order.
    progress:
        Called as ``progress(done, total)`` after each slice is decoded.

    Returns
    -------
    Volume
        HU voxels with their affine; ``warnings`` lists everything excluded or tolerated.

    Raises
    ------
    VolumeError
        If the files do not make one regular CT volume; the message names the problem
        (not a CT series, not a volume, gantry tilt, missing slices, irregular slice
        spacing, unreadable files ...) and the files involved.
    """
    warnings: list[str] = []
    read = _read_headers([Path(p) for p in paths], warnings)
    slices = _usable_slices(read, warnings)
    normal = _normal(slices[0])
    stack = _sorted_stack(slices, normal, warnings)
    step, spacing_notes = _check_stack(stack, normal)

    hu, failed = _decode(stack, progress)
    if failed:
        names = _listing([f"{stack[k].name} ({why})" for k, why in failed])
        warnings.append(f"dropped {len(failed)} slice(s) whose pixels could not be decoded: {names}")
        lost = {k for k, _ in failed}
        keep = [k for k in range(len(stack)) if k not in lost]
        stack = [stack[k] for k in keep]
        try:
            step, spacing_notes = _check_stack(stack, normal)
        except VolumeError as exc:
            them = "it" if len(failed) == 1 else "them"
            raise VolumeError(f"{names} could not be decoded, and without {them}: {exc}") from None
        hu = hu[keep]  # a second copy of the volume, but only after a decode failure
    warnings.extend(spacing_notes)

    first = stack[0]
    affine = np.eye(4)
    affine[:3, 0] = step
    affine[:3, 1] = first.orientation[3:] * first.pixel_spacing[0]
    affine[:3, 2] = first.orientation[:3] * first.pixel_spacing[1]
    affine[:3, 3] = first.position
    sources: dict[int, Dataset] = {}
    for s in stack:
        sources.setdefault(id(s.header), s.header)
    return Volume(
        hu=hu,
        affine=affine,
        sop_instance_uids=tuple(s.sop_uid for s in stack),
        frame_numbers=tuple(s.frame for s in stack),
        sources=tuple(sources.values()),
        study_instance_uid=str(first.header.StudyInstanceUID),
        series_instance_uid=str(first.header.SeriesInstanceUID),
        frame_of_reference_uid=str(first.header.FrameOfReferenceUID),
        warnings=tuple(warnings),
    )


# --- Pass 1: headers ----------------------------------------------------------------------------


def _read_headers(paths: list[Path], warnings: list[str]) -> list[tuple[Path, Dataset, _NativePixels | None]]:
    """Headers of the readable files, sorted by path so every later choice is deterministic."""
    if not paths:
        raise VolumeError("no files given for the series")
    read, skipped = [], []
    for path in sorted(paths):
        try:
            with open(path, "rb") as fp:
                ds = pydicom.dcmread(fp, stop_before_pixels=True)
                native = _native_pixels(fp, ds)
        except Exception as exc:  # pydicom raises many types for broken files; all mean "skip"
            skipped.append(f"{path.name} ({_reason(exc)})")
            continue
        if len(ds) == 0:
            skipped.append(f"{path.name} (nothing after the file meta information; truncated?)")
            continue
        read.append((path, ds, native))
    if not read:
        raise VolumeError(f"none of the {len(paths)} file(s) is readable DICOM: {_listing(skipped)}")
    if skipped:
        warnings.append(f"skipped {len(skipped)} unreadable file(s): {_listing(skipped)}")
    return read


def _native_pixels(fp: BinaryIO, ds: Dataset) -> _NativePixels | None:
    """Locate uncompressed little-endian Pixel Data right after a stop-before-pixels read.

    pydicom leaves ``fp`` at the start of the Pixel Data element; knowing its offset lets
    pass 2 read each slice straight from the file without parsing the header again.
    """
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    # Compressed data needs a decoder, and a deflated file's offsets are in the inflated
    # stream, not the file: both go through pydicom in pass 2.
    if syntax not in _NATIVE_LITTLE_ENDIAN:
        return None
    start = fp.tell()
    head = fp.read(12)
    if len(head) < 12 or struct.unpack("<HH", head[:4]) != (0x7FE0, 0x0010):
        return None
    if syntax == ImplicitVRLittleEndian:
        (length,) = struct.unpack("<I", head[4:8])
        offset = start + 8
    else:
        (length,) = struct.unpack("<I", head[8:12])
        offset = start + 12
    return _NativePixels(offset, length)


def _usable_slices(
    read: list[tuple[Path, Dataset, _NativePixels | None]], warnings: list[str]
) -> list[_Slice]:
    """Slices of the CT images that belong to the volume, each exclusion noted in ``warnings``."""
    modalities = Counter(str(ds.get("Modality") or "missing") for _, ds, _ in read)
    if "CT" not in modalities:
        raise VolumeError(f"not a CT series (modality {', '.join(sorted(modalities))})")
    other = [
        f"{path.name} ({ds.get('Modality') or 'no modality'})"
        for path, ds, _ in read
        if ds.get("Modality") != "CT"
    ]
    if other:
        warnings.append(f"excluded {len(other)} non-CT file(s): {_listing(other)}")
    read = [entry for entry in read if entry[1].get("Modality") == "CT"]

    unique, repeats, seen = [], [], {}
    for path, ds, native in read:
        uid = str(ds.get("SOPInstanceUID") or "").strip()
        if uid and uid in seen:
            repeats.append(f"{path.name} repeats {seen[uid].name}")
            continue
        seen[uid] = path
        unique.append((path, ds, native))
    if repeats:
        warnings.append(
            f"ignored {len(repeats)} file(s) repeating another file's SOP Instance UID, "
            f"kept the first of each: {_listing(repeats)}"
        )

    slices, images, broken = [], [], []
    for path, ds, native in unique:
        try:
            slices.extend(_slices_of(path, ds, native))
        except Exception as exc:  # _Unusable, or a malformed value pydicom or float() rejects
            broken.append(f"{path.name} ({_reason(exc)})")
        else:
            images.append((path, ds))
    if broken:
        warnings.append(f"skipped {len(broken)} file(s) without a usable image: {_listing(broken)}")
    if not slices:
        raise VolumeError(f"not a volume: no file holds a usable CT image ({_listing(broken)})")
    warnings.extend(_fill_blank_uids(images))

    localizers = [s for s in slices if "LOCALIZER" in _image_type(s.header)]
    if localizers:
        if len(localizers) == len(slices):
            raise VolumeError(f"not a volume: the series holds only localizer images ({len(slices)})")
        warnings.append(
            f"excluded {len(localizers)} localizer image(s): {_listing([s.name for s in localizers])}"
        )
        slices = [s for s in slices if "LOCALIZER" not in _image_type(s.header)]
    derived = [s for s in slices if _is_derived(s.header)]
    if derived and len(derived) < len(slices):
        warnings.append(
            f"excluded {len(derived)} derived or secondary image(s) mixed into the original "
            f"series: {_listing([s.name for s in derived])}"
        )
        slices = [s for s in slices if not _is_derived(s.header)]

    main = Counter(map(_geometry, slices)).most_common(1)[0][0]
    odd = [s for s in slices if _geometry(s) != main]
    if odd:
        warnings.append(
            f"excluded {len(odd)} image(s) whose orientation, size or pixel spacing differs "
            f"from the other {len(slices) - len(odd)}: {_listing([s.name for s in odd])}"
        )
        slices = [s for s in slices if _geometry(s) == main]
    return slices


def _geometry(s: _Slice) -> tuple:
    """What must agree between slices of one volume (rounded against float noise)."""
    return s.rows, s.columns, tuple(np.round(s.orientation, 3)), tuple(np.round(s.pixel_spacing, 3))


def _fill_blank_uids(images: list[tuple[Path, Dataset]]) -> list[str]:
    """Give blank or missing UIDs a value, as anonymized exports need, and say so.

    A blank study, series or frame-of-reference UID takes the value the other files agree
    on, else one derived from the patient and series attributes; a blank SOP Instance UID
    gets one derived from the file, so loading the same files twice gives the same UIDs.
    """
    notes = []
    first = images[0][1]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        blank = [ds for _, ds in images if not str(ds.get(keyword) or "").strip()]
        if not blank:
            continue
        given = Counter(str(ds.get(keyword) or "").strip() for _, ds in images)
        del given[""]
        if given:
            uid = given.most_common(1)[0][0]
        else:
            attributes = ("PatientID", "StudyDate", "StudyTime", "SeriesNumber", "SeriesDescription")
            uid = generate_uid(
                entropy_srcs=["readout-blank-uid", keyword] + [str(first.get(a, "")) for a in attributes]
            )
        for ds in blank:
            setattr(ds, keyword, uid)
        notes.append(f"{len(blank)} file(s) have no {keyword}; gave them {uid}")
    blank_sop = [(path, ds) for path, ds in images if not str(ds.get("SOPInstanceUID") or "").strip()]
    for path, ds in blank_sop:
        position = str(ds.get("ImagePositionPatient", ""))
        ds.SOPInstanceUID = generate_uid(
            entropy_srcs=["readout-blank-uid", path.name, position, str(ds.get("InstanceNumber", ""))]
        )
    if blank_sop:
        notes.append(
            f"{len(blank_sop)} file(s) have no SOPInstanceUID; gave them generated UIDs that "
            f"the archive does not know: {_listing([path.name for path, _ in blank_sop])}"
        )
    return notes


def _slices_of(path: Path, ds: Dataset, native: _NativePixels | None) -> list[_Slice]:
    """The image planes of one instance: one for single-frame, one per frame for enhanced CT."""
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows <= 0 or columns <= 0:
        raise _Unusable("no Rows/Columns, not an image")
    frames = int(ds.get("NumberOfFrames") or 1)
    multi_frame = ds.get("SOPClassUID") in _MULTI_FRAME_CT or "PerFrameFunctionalGroupsSequence" in ds
    if frames > 1 and not multi_frame:
        raise _Unusable("multi-frame image without per-frame positions")
    frame_bytes = rows * columns * 2
    if not (
        native is not None
        and native.length >= frames * frame_bytes
        and ds.get("BitsAllocated") == 16
        and ds.get("SamplesPerPixel", 1) == 1
    ):
        native = None

    slices = []
    for index in range(frames):
        if multi_frame:
            position = _group(ds, index, "PlanePositionSequence")
            orientation = _group(ds, index, "PlaneOrientationSequence")
            measures = _group(ds, index, "PixelMeasuresSequence")
            transform = _group(ds, index, "PixelValueTransformationSequence") or ds
        else:
            position = orientation = measures = transform = ds
        iop = _numbers(orientation, "ImageOrientationPatient", 6)
        row_norm, col_norm = np.linalg.norm(iop[:3]), np.linalg.norm(iop[3:])
        if abs(row_norm - 1) > 0.01 or abs(col_norm - 1) > 0.01 or abs(iop[:3] @ iop[3:]) > 0.01:
            raise _Unusable("ImageOrientationPatient is not two perpendicular unit vectors")
        spacing = _numbers(measures, "PixelSpacing", 2)
        if np.any(spacing <= 0):
            raise _Unusable("PixelSpacing is not positive")
        slices.append(
            _Slice(
                path=path,
                header=ds,
                frame=index + 1 if multi_frame else None,
                position=_numbers(position, "ImagePositionPatient", 3),
                orientation=np.concatenate([iop[:3] / row_norm, iop[3:] / col_norm]),
                pixel_spacing=(float(spacing[0]), float(spacing[1])),
                rows=rows,
                columns=columns,
                slope=float(transform.get("RescaleSlope", 1)),
                intercept=float(transform.get("RescaleIntercept", 0)),
                native=None
                if native is None
                else _NativePixels(native.offset + index * frame_bytes, frame_bytes),
            )
        )
    return slices


def _group(ds: Dataset, index: int, keyword: str) -> Dataset | None:
    """The item of a functional group for frame ``index``: per-frame if present, else shared."""
    for sequence, item in (
        ("PerFrameFunctionalGroupsSequence", index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        groups = ds.get(sequence)
        if groups and len(groups) > item and groups[item].get(keyword):
            return groups[item].get(keyword)[0]
    return None


def _numbers(ds: Dataset | None, keyword: str, count: int) -> np.ndarray:
    """``count`` finite numbers from a multi-valued attribute, or `_Unusable` naming it."""
    value = None if ds is None else ds.get(keyword)
    try:
        numbers = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        raise _Unusable(f"no valid {keyword}") from None
    if numbers.shape != (count,) or not np.all(np.isfinite(numbers)):
        raise _Unusable(f"no valid {keyword}")
    return numbers


def _image_type(ds: Dataset) -> tuple[str, ...]:
    value = ds.get("ImageType") or ()
    return tuple(v.strip().upper() for v in ([value] if isinstance(value, str) else value))


def _is_derived(ds: Dataset) -> bool:
    image_type = _image_type(ds)
    sop_class = str(ds.get("SOPClassUID", ""))
    return (
        (bool(image_type) and image_type[0] == "DERIVED")
        or "SECONDARY" in image_type
        or sop_class == _SECONDARY_CAPTURE
        or sop_class.startswith(_SECONDARY_CAPTURE + ".")
    )


def _normal(s: _Slice) -> np.ndarray:
    normal = np.cross(s.orientation[:3], s.orientation[3:])
    return normal / np.linalg.norm(normal)


def _sorted_stack(slices: list[_Slice], normal: np.ndarray, warnings: list[str]) -> list[_Slice]:
    """Slices ascending along ``normal``, one per position (the lowest SOP Instance UID wins)."""
    ordered = sorted(slices, key=lambda s: (float(s.position @ normal), s.order))
    stack: list[_Slice] = []
    doubles = []
    for s in ordered:
        if stack and float((s.position - stack[-1].position) @ normal) < _SAME_POSITION_MM:
            kept, dropped = sorted([stack[-1], s], key=lambda x: x.order)
            stack[-1] = kept
            doubles.append(f"{dropped.name} (kept {kept.name})")
        else:
            stack.append(s)
    if doubles:
        warnings.append(
            f"dropped {len(doubles)} image(s) at a position another image already holds, keeping "
            f"the lower SOP Instance UID: {_listing(doubles)}"
        )
    return stack


def _check_stack(stack: list[_Slice], normal: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The k step vector of a regular stack, plus notes on tolerated spacing variation."""
    n = len(stack)
    if n < _MIN_SLICES:
        raise VolumeError(f"not a volume: {n} usable slice(s), at least {_MIN_SLICES} are needed")
    positions = np.array([s.position for s in stack])
    span = positions[-1] - positions[0]
    along = float(span @ normal)
    tilt = float(np.degrees(np.arccos(min(1.0, along / np.linalg.norm(span)))))
    if tilt > _TILT_LIMIT_DEG:
        raise VolumeError(
            f"gantry tilt of {tilt:.1f} degrees: slices shift within the image plane as they "
            f"advance, so they do not stack into a box; use a series reconstructed without tilt"
        )
    distances = positions @ normal
    line = positions[0] + np.outer((distances - distances[0]) / along, span)
    offsets = np.linalg.norm(positions - line, axis=1)
    worst = int(np.argmax(offsets))
    if offsets[worst] > 0.5 * min(stack[0].pixel_spacing):
        raise VolumeError(
            f"slices are not stacked in a line: {stack[worst].name} lies {offsets[worst]:.2f} mm "
            f"off the line through the first and last slices"
        )
    gaps = np.diff(distances)
    median = float(np.median(gaps))
    deviation = float(np.max(np.abs(gaps - median))) / median
    if deviation > _TOLERATED_SPACING:
        raise VolumeError(_spacing_problem(stack, gaps, median, normal))
    notes = []
    if deviation > _QUIET_SPACING:
        notes.append(
            f"slice spacing varies from {gaps.min():.2f} to {gaps.max():.2f} mm; the volume "
            f"assumes an even {along / (n - 1):.3f} mm"
        )
    return span / (n - 1), notes


def _spacing_problem(stack: list[_Slice], gaps: np.ndarray, median: float, normal: np.ndarray) -> str:
    """Name missing slices when every wide gap is a whole number of spacings, else irregularity."""
    ratios = gaps / median
    wide = ratios > 1 + _TOLERATED_SPACING
    whole = np.abs(ratios - np.round(ratios)) <= _WHOLE_GAP
    if not np.any(ratios < 1 - _TOLERATED_SPACING) and np.all(whole[wide]):
        axis = int(np.argmax(np.abs(normal)))
        holes = []
        for i in np.flatnonzero(wide):
            count = int(round(ratios[i]))
            step = (stack[i + 1].position - stack[i].position) / count
            at = ", ".join(f"{stack[i].position[axis] + j * step[axis]:.2f}" for j in range(1, count))
            holes.append(f"{'xyz'[axis]} = {at} mm (between {stack[i].name} and {stack[i + 1].name})")
        return f"missing slices: expected one every {median:.2f} mm but none at {'; '.join(holes)}"
    return (
        f"irregular slice spacing: gaps between neighbouring slices range from {gaps.min():.2f} "
        f"to {gaps.max():.2f} mm (median {median:.2f} mm)"
    )


# --- Pass 2: pixels -----------------------------------------------------------------------------


def _decode(
    stack: list[_Slice], progress: Callable[[int, int], None] | None
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """HU of every slice in k order, and ``(k, reason)`` for slices that failed to decode.

    The output is int16 when every rescale is integral; a slice whose HU leave the int16
    range switches it to float32 (exact, but a brief third copy of the volume in memory).
    """
    n, rows, columns = len(stack), stack[0].rows, stack[0].columns
    integral = all(s.slope.is_integer() and s.intercept.is_integer() for s in stack)
    out = np.empty((n, rows, columns), np.int16 if integral else np.float32)
    failed = []
    reader = _PixelReader()
    for k, s in enumerate(stack):
        try:
            stored = reader.stored(s, out[k])
            if stored.shape != (rows, columns):
                raise ValueError(f"decoded {stored.shape} pixels, header says {(rows, columns)}")
            if not _rescale_into(out[k], stored, s):
                stored = stored.copy()  # it may live in the int16 array about to be replaced
                out = out.astype(np.float32)
                _rescale_into(out[k], stored, s)
        except Exception as exc:  # decoders raise many types; one bad slice is reported, not fatal
            failed.append((k, _reason(exc)))
        if progress is not None:
            progress(k + 1, n)
    return out, failed


class _PixelReader:
    """Stored values of one slice at a time.

    Uncompressed little-endian 16-bit slices are read straight from their file offset (into
    the output slot itself when it has their type); everything else goes through pydicom's
    decoders, keeping the last instance read so a multi-frame file is read once.
    """

    def __init__(self) -> None:
        self._path: Path | None = None
        self._dataset: Dataset | None = None

    def stored(self, s: _Slice, slot: np.ndarray) -> np.ndarray:
        if s.native is not None:
            return self._read_native(s, slot)
        if s.path != self._path:
            self._dataset = pydicom.dcmread(s.path)
            self._path = s.path
        return pixel_array(self._dataset, index=None if s.frame is None else s.frame - 1)

    @staticmethod
    def _read_native(s: _Slice, slot: np.ndarray) -> np.ndarray:
        signed = s.header.get("PixelRepresentation") == 1
        dtype = np.dtype("<i2" if signed else "<u2")
        stored = slot if slot.dtype == dtype else np.empty((s.rows, s.columns), dtype)
        with open(s.path, "rb") as fp:
            fp.seek(s.native.offset)
            got = fp.readinto(memoryview(stored).cast("B"))
        if got != stored.nbytes:
            raise ValueError(f"pixel data truncated: {got} of {stored.nbytes} bytes")
        bits = int(s.header.get("BitsStored") or 16)
        if bits < 16:
            # Bits above BitsStored are not pixel data: sign-extend or mask them away.
            if signed:
                stored <<= 16 - bits
                stored >>= 16 - bits
            else:
                stored &= (1 << bits) - 1
        return stored


def _rescale_into(target: np.ndarray, stored: np.ndarray, s: _Slice) -> bool:
    """Write the slice's HU into ``target`` (which may be ``stored`` itself).

    Padding voxels, matched on stored values, become `PADDING_HU`. Returns False, leaving
    ``stored`` intact, when ``target`` is int16 and the HU would not fit in it.
    """
    padding = _padding_mask(stored, s.header)
    if target.dtype == np.int16:
        low, high = int(stored.min()) * s.slope + s.intercept, int(stored.max()) * s.slope + s.intercept
        if min(low, high) < -32768 or max(low, high) > 32767:
            return False
        # Integer arithmetic wraps modulo 2**16 on the way into int16, so as the final
        # values fit, they come out exact.
        if s.slope != 1:
            np.multiply(stored, np.int64(s.slope), out=target, casting="unsafe")
            np.add(target, np.int64(s.intercept), out=target, casting="unsafe")
        else:
            np.add(stored, np.int64(s.intercept), out=target, casting="unsafe")
    else:
        target[...] = stored * s.slope + s.intercept
    if padding is not None:
        target[padding] = PADDING_HU
    return True


def _padding_mask(stored: np.ndarray, header: Dataset) -> np.ndarray | None:
    """Voxels whose stored value is PixelPaddingValue or within PixelPaddingRangeLimit of it."""
    padding = header.get("PixelPaddingValue")
    if padding is None:
        return None
    limit = header.get("PixelPaddingRangeLimit", padding)
    return (stored >= min(padding, limit)) & (stored <= max(padding, limit))


def _listing(items: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def _reason(exc: BaseException) -> str:
    """One short line from an exception, for a warning or error message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
