"""Synthetic chest / upper-abdomen CT phantoms with known findings, written as DICOM CT series."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

# Stored value = HU + 1024: a common scanner convention that keeps air at 0.
_RESCALE_INTERCEPT = -1024


def phantom_uid(seed: int, what: str) -> str:
    """A UID that is the same for every run with the same seed (2.25 root, UUID-derived)."""
    return generate_uid(prefix=None, entropy_srcs=["readout-phantom", str(seed), what])


def ct_series_datasets(
    hu: np.ndarray,
    pixel_spacing_mm: tuple[float, float],
    slice_spacing_mm: float,
    origin_mm: Sequence[float],
    *,
    seed: int,
    slice_thickness_mm: float | None = None,
    patient_name: str = "Phantom^Readout",
    series_description: str = "Chest/abdomen axial",
) -> list[Dataset]:
    """One axial, head-first-supine CT Image Storage dataset per slice of ``hu``.

    ``hu`` is indexed ``[k, r, c]`` with ``k`` ascending in patient z (feet to head);
    ``origin_mm`` is the LPS centre of voxel (0, 0, 0). Pixels are 16-bit signed with
    RescaleIntercept -1024. UIDs derive from ``seed`` so the same seed gives the same study.
    Instance numbers run head to feet, as most scanners number them.
    """
    if hu.ndim != 3:
        raise ValueError(f"hu must be 3-D [k, r, c], got shape {hu.shape}")
    n_slices, rows, cols = hu.shape
    stored = np.clip(hu.astype(np.int32) - _RESCALE_INTERCEPT, -32768, 32767).astype(np.int16)
    study_uid = phantom_uid(seed, "study")
    series_uid = phantom_uid(seed, "series")
    for_uid = phantom_uid(seed, "frame-of-reference")
    thickness = slice_spacing_mm if slice_thickness_mm is None else slice_thickness_mm

    datasets = []
    for k in range(n_slices):
        sop_uid = phantom_uid(seed, f"instance-{k}")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "090000"
        ds.AccessionNumber = f"PH{seed:08d}"
        ds.Modality = "CT"
        ds.Manufacturer = "Readout phantom"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT chest upper abdomen"
        ds.SeriesDescription = series_description
        ds.PatientName = patient_name
        ds.PatientID = f"PHANTOM-{seed}"
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = f"{thickness:.3f}"
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.InstanceNumber = n_slices - k
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        z = float(origin_mm[2]) + k * slice_spacing_mm
        ds.ImagePositionPatient = [f"{float(origin_mm[0]):.4f}", f"{float(origin_mm[1]):.4f}", f"{z:.4f}"]
        ds.SliceLocation = f"{z:.4f}"
        ds.PixelSpacing = [f"{pixel_spacing_mm[0]:.6f}", f"{pixel_spacing_mm[1]:.6f}"]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = _RESCALE_INTERCEPT
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.PixelData = stored[k].tobytes()
        datasets.append(ds)
    return datasets


def write_datasets(datasets: Sequence[Dataset], out_dir: Path) -> list[Path]:
    """Write each dataset as ``out_dir/CT{instance:04d}.dcm``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = out_dir / f"CT{int(ds.InstanceNumber):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
