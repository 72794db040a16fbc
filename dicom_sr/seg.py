"""DICOM SEG (BINARY) with one segment per boxed finding, frames aligned to the source slices."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from dicom_sr import codes as readout_codes
from dicom_sr.content import (
    CHARACTER_SET,
    MANUFACTURER,
    OutputIds,
    algorithm_identification,
    boxed_findings,
    contributing_equipment,
    writable_sources,
)
from engines.results import StudyResult
from engines.volume import Volume

SEG_SERIES_NUMBER = 9902


def write_segmentation(result: StudyResult, volume: Volume, *, rule: str = "manual",
                       read: int = 1) -> hd.seg.Segmentation | None:
    """The SEG of ``result``'s boxes over ``volume``, or ``None`` when no finding has a box.

    ``read`` numbers the reads of this study by ``rule`` (see ``dicom_sr.content.OutputIds``).

    Each boxed finding becomes one segment (label "topic type", the topic's colour, the same
    tracking UID as its SR group) whose voxels are exactly the box. Only frames that hold a
    box are written.

    Raises
    ------
    engines.results.FindingsError
        If a box does not fit the volume.
    """
    boxed = boxed_findings(result)
    if not boxed:
        return None
    result.check_fits(volume.shape)
    ids = OutputIds(volume.study_instance_uid, rule, result.engine, read)

    multiframe = volume.frame_numbers[0] is not None
    if multiframe:
        # A multi-frame source: SEG frames follow the source's own frame order.
        sources = writable_sources(volume.sources[:1])
        n_frames = int(sources[0].NumberOfFrames)
        plane_of_slice = [frame - 1 for frame in volume.frame_numbers]  # type: ignore[operator]
    else:
        used = sorted({k for b in boxed for k in range(b.finding.box.voxel[0], b.finding.box.voxel[3])})  # type: ignore[union-attr]
        by_uid = {ds.SOPInstanceUID: ds for ds in writable_sources(volume.sources)}
        sources = [by_uid[volume.sop_instance_uids[k]] for k in used]
        n_frames = len(used)
        plane_of_slice = [-1] * volume.shape[0]
        for plane, k in enumerate(used):
            plane_of_slice[k] = plane

    _, rows, cols = volume.shape
    mask = np.zeros((n_frames, rows, cols, len(boxed)), dtype=bool)
    for b in boxed:
        k0, r0, c0, k1, r1, c1 = b.finding.box.voxel  # type: ignore[union-attr]
        for k in range(k0, k1):
            mask[plane_of_slice[k], r0:r1, c0:c1, b.segment_number - 1] = True

    algorithm = algorithm_identification(result.engine)
    descriptions = []
    for b in boxed:
        site = readout_codes.topic_site(b.topic)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=b.segment_number,
                segment_label=f"{b.topic} {b.finding.type}"[:64],
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=readout_codes.finding_type_code(b.finding.type),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=ids.tracking_uid(b.label),
                tracking_id=b.label,
                anatomic_regions=[site] if site else None,
                display_color=hd.color.CIELabColor.from_rgb(*readout_codes.topic_color(b.topic)),
            )
        )

    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=ids.uid("seg-series"),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=ids.uid("seg-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=result.engine.name,
        software_versions=result.engine.version,
        device_serial_number=result.engine.name,
        series_description=f"Readout AI findings ({result.engine.name})"[:64],
        content_label="FINDINGS",
        content_description="AI finding boxes"[:64],
        omit_empty_frames=True,
        contributing_equipment=[contributing_equipment(result.engine)],
    )
    seg.SpecificCharacterSet = CHARACTER_SET
    return seg
