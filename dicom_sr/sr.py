"""TID 1500 Imaging Measurement Report in a Comprehensive 3D SR, grouped by anatomical topic.

Groups, each with a tracking identifier whose text says what it is:

- a boxed finding ``lungs: nodule 1``: a planar group (TID 1410) with the finding type and
  site, the sentence, certainty and size, and a closed rectangle on the box's key slice;
  plus a volumetric group (TID 1411) with the same tracking UID referencing its SEG segment;
- a finding without a box: a whole-image group (TID 1501) with the same content items;
- a topic without findings ``heart: normal`` (or ``heart: summary``): a TID 1501 group with
  the topic's sentence;
- an answer ``question: Is there ...?``: a TID 1501 group whose Finding text is the answer
  (planar, with its rectangle, when the answer points at a box).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_sr import codes as readout_codes
from dicom_sr.content import (
    CHARACTER_SET,
    MANUFACTURER,
    OutputIds,
    boxed_findings,
    contributing_equipment,
    image_library_view,
    tracking_label,
    writable_sources,
)
from dicom_sr.uids import device_uid
from engines.results import Box, StudyResult
from engines.volume import Volume

SR_SERIES_NUMBER = 9901

_Group = (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)


def write_report(
    result: StudyResult,
    volume: Volume,
    segmentation: hd.seg.Segmentation | None = None,
    *,
    rule: str = "manual",
    read: int = 1,
    predecessor: Dataset | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR of ``result`` over ``volume``, referencing ``segmentation``'s segments.

    ``read`` numbers the reads of this study by ``rule`` (see ``OutputIds``); ``predecessor`` is
    the SR of the previous read, listed in PredecessorDocumentsSequence.

    Raises
    ------
    engines.results.FindingsError
        If a box does not fit the volume.
    ValueError
        If findings have boxes but no segmentation is given.
    """
    result.check_fits(volume.shape)
    boxed = boxed_findings(result)
    if boxed and segmentation is None:
        raise ValueError("findings have boxes: pass the SEG written for them (write_segmentation)")
    ids = OutputIds(volume.study_instance_uid, rule, result.engine, read)
    sources = writable_sources(volume.sources)
    by_uid = {ds.SOPInstanceUID: ds for ds in sources}
    algorithm = hd.sr.AlgorithmIdentification(name=result.engine.name, version=result.engine.version)
    segment_of = {id(b.finding): b.segment_number for b in boxed}

    key_images: dict[str, None] = {}  # the images the report draws on, in order

    def rectangle(box: Box) -> hd.sr.ImageRegion:
        k = box.key_slice
        ds = by_uid[volume.sop_instance_uids[k]]
        key_images[ds.SOPInstanceUID] = None
        frame = volume.frame_numbers[k]
        _, r0, c0, _, r1, c1 = box.voxel
        # DICOM image coordinates put pixel (r, c) between (c, r) and (c + 1, r + 1), so the
        # half-open box edges are the rectangle's corners exactly.
        corners = np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=float)
        return hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=corners,
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=ds.SOPClassUID,
                referenced_sop_instance_uid=ds.SOPInstanceUID,
                referenced_frame_numbers=[frame] if frame is not None else None,
            ),
        )

    def measurements(confidence: float | None, size_mm: float | None) -> list[hd.sr.Measurement]:
        items = []
        if confidence is not None:
            items.append(hd.sr.Measurement(codes.DCM.CertaintyOfFinding, round(confidence * 100, 2), codes.UCUM.Percent))
        if size_mm is not None:
            items.append(hd.sr.Measurement(codes.SCT.Diameter, float(size_mm), codes.UCUM.Millimeter))
        return items

    groups: list[_Group] = []
    for topic in result.topics:
        site = readout_codes.topic_site(topic.topic)
        for number, finding in enumerate(topic.findings, start=1):
            label = tracking_label(topic.topic, finding.type, number)
            common = dict(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=ids.tracking_uid(label), identifier=label),
                finding_type=readout_codes.finding_type_code(finding.type),
                finding_sites=_sites(site, finding.location),
                algorithm_id=algorithm,
            )
            items = measurements(finding.confidence, finding.size_mm)
            if finding.box is None:
                groups.append(_with_text(hd.sr.MeasurementsAndQualitativeEvaluations(**common, measurements=items), finding.text))
                continue
            groups.append(
                _with_text(
                    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                        **common,
                        referenced_region=rectangle(finding.box),
                        measurements=items,
                        geometric_purpose=codes.SCT.BoundedBy,
                    ),
                    finding.text,
                )
            )
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    **common,
                    referenced_segment=hd.sr.ReferencedSegment(
                        sop_class_uid=segmentation.SOPClassUID,  # type: ignore[union-attr]
                        sop_instance_uid=segmentation.SOPInstanceUID,  # type: ignore[union-attr]
                        segment_number=segment_of[id(finding)],
                        source_series=hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid),
                    ),
                    measurements=measurements(finding.confidence, None),
                )
            )
        if not topic.findings:
            label = tracking_label(topic.topic, "normal" if topic.normal else "summary")
            groups.append(
                _with_text(
                    hd.sr.MeasurementsAndQualitativeEvaluations(
                        tracking_identifier=hd.sr.TrackingIdentifier(uid=ids.tracking_uid(label), identifier=label),
                        finding_type=readout_codes.NORMAL_FINDING if topic.normal else None,
                        finding_sites=_sites(site, None),
                        algorithm_id=algorithm,
                    ),
                    topic.summary,
                )
            )

    for number, answer in enumerate(result.answers, start=1):
        label = f"question: {answer.question}"
        common = dict(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=ids.tracking_uid(f"answer {number}"), identifier=label),
            algorithm_id=algorithm,
            measurements=measurements(answer.confidence, None),
        )
        if answer.box is None:
            group: _Group = hd.sr.MeasurementsAndQualitativeEvaluations(**common)
        else:
            group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                **common, referenced_region=rectangle(answer.box), geometric_purpose=codes.SCT.BoundedBy
            )
        groups.append(_with_text(group, answer.answer))

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(result.engine.name),
            name=f"Readout {result.engine.name} {result.engine.version}",
            manufacturer_name=MANUFACTURER,
            model_name=result.engine.name,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_procedure(sources[0]),
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
        # The library lists the images the report draws on (TID 1500 wants one: the first
        # source image when it draws on none); every source image is evidence anyway. Listing
        # all of them cost ~15 ms per slice in highdicom's deep copies.
        referenced_images=[image_library_view(by_uid[uid]) for uid in key_images or [sources[0].SOPInstanceUID]],
    )
    evidence: list[Dataset] = [*sources, *([segmentation] if segmentation is not None else [])]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=ids.uid("sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=ids.uid("sr-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[contributing_equipment(result.engine)],
        previous_versions=[predecessor] if predecessor is not None else None,
        series_description=f"Readout AI report ({result.engine.name})"[:64],
    )
    sr.SpecificCharacterSet = CHARACTER_SET
    return sr


def _sites(site: object, location: str | None) -> Sequence[hd.sr.FindingSite] | None:
    if site is None:
        return None
    return [hd.sr.FindingSite(site, laterality=readout_codes.laterality(location))]  # type: ignore[arg-type]


def _with_text(group: _Group, text: str) -> _Group:
    """Append the sentence as a Finding TEXT item (TID 1410 row 17 / TID 1501 row 12)."""
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(name=codes.DCM.Finding, value=text, relationship_type="CONTAINS")
    )
    return group


def _procedure(source: Dataset) -> hd.sr.CodedConcept:
    """The imaging procedure from the study's ProcedureCodeSequence, else CT (unspecified region)."""
    for item in source.get("ProcedureCodeSequence", []):
        if item.get("CodeValue") and item.get("CodingSchemeDesignator") and item.get("CodeMeaning"):
            return hd.sr.CodedConcept(item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning)
    return hd.sr.CodedConcept.from_code(codes.LN.CTUnspecifiedBodyRegion)
