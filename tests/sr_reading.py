"""Read a Readout SR back with highdicom into plain dicts, for round-trip tests."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
from pydicom.sr.codedict import codes


def _texts(group) -> list[str]:
    return [
        item.TextValue
        for item in group[0].ContentSequence
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.Finding.value
    ]


def _measure(group, name) -> float | None:
    found = group.get_measurements(name=name)
    return float(found[0].value) if found else None


def read_groups(path: Path) -> dict[str, dict]:
    """Groups keyed by tracking identifier text; a finding's planar and volumetric groups merge."""
    content = hd.sr.srread(path).content
    groups: dict[str, dict] = {}
    kinds = (
        ("planar", content.get_planar_roi_measurement_groups()),
        ("volumetric", content.get_volumetric_roi_measurement_groups()),
        ("image", content.get_image_measurement_groups()),
    )
    for kind, found in kinds:
        for group in found:
            entry = groups.setdefault(group.tracking_identifier, {"tracking_uid": group.tracking_uid})
            assert entry["tracking_uid"] == group.tracking_uid, "one label, two tracking UIDs"
            entry.setdefault("kinds", []).append(kind)
            if group.finding_type is not None:
                entry["type_code"] = group.finding_type.value
            sites = group.finding_sites
            if sites:
                entry["site_code"] = sites[0].value.value
                entry["laterality_code"] = sites[0].laterality.value if sites[0].laterality else None
            certainty = _measure(group, codes.DCM.CertaintyOfFinding)
            if certainty is not None:
                entry["certainty_percent"] = certainty
            diameter = _measure(group, codes.SCT.Diameter)
            if diameter is not None:
                entry["diameter_mm"] = diameter
            texts = _texts(group)
            if texts:
                entry["text"] = texts[0]
            if kind == "planar":
                roi = group.roi
                entry["rectangle"] = roi.value.tolist()
                entry["graphic_type"] = roi.GraphicType
                entry["key_sop_uid"] = roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                purposes = group.get_qualitative_evaluations(name=codes.DCM.GeometricPurposeOfRegion)
                entry["purpose_codes"] = [p.value.value for p in purposes]
            if kind == "volumetric":
                [entry["segment_number"]] = group.referenced_segment.referenced_segment_numbers
                entry["seg_sop_uid"] = group.referenced_segment.referenced_sop_instance_uid
    return groups
