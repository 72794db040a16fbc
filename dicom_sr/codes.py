"""Coded concepts Readout writes: topic → finding site, finding type → code, laterality."""

from __future__ import annotations

import re

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

# Finding sites of the topics Readout's engines report. Topics outside this table are
# allowed (free vocabulary) and are written without a finding site.
TOPIC_SITES: dict[str, Code] = {
    "lungs": codes.SCT.Lung,
    "pleura": codes.SCT.Pleura,
    "heart": codes.SCT.Heart,
    "liver": codes.SCT.Liver,
    "bones": codes.SCT.BoneStructure,
    "mediastinum": codes.SCT.Mediastinum,
    "aorta": codes.SCT.Aorta,
    "kidneys": codes.SCT.Kidney,
    "spleen": codes.SCT.Spleen,
    "pancreas": codes.SCT.Pancreas,
    "lymph nodes": codes.SCT.LymphNode,
}

FINDING_TYPES: dict[str, Code] = {
    "nodule": codes.SCT.Nodule,
    "mass": codes.SCT.Mass,
    "pleural effusion": codes.SCT.PleuralEffusion,
    "pneumothorax": codes.SCT.Pneumothorax,
    "cardiomegaly": codes.SCT.Cardiomegaly,
    "pericardial effusion": codes.SCT.PericardialEffusion,
}

# Types with no fitting SNOMED CT concept in pydicom's tables ("lytic lesion", "hypodense
# lesion", ...) are coded as Lesion; the type's own words travel in the tracking identifier.
GENERIC_FINDING = codes.SCT.Lesion
NORMAL_FINDING = codes.SCT.Normal

# One display colour per topic (CIELab is what SEG wants; RGB here is the readable form).
TOPIC_COLORS: dict[str, tuple[int, int, int]] = {
    "lungs": (255, 193, 7),
    "pleura": (0, 188, 212),
    "heart": (233, 30, 99),
    "liver": (139, 195, 74),
    "bones": (156, 39, 176),
}
OTHER_TOPIC_COLOR = (255, 87, 34)


def finding_type_code(finding_type: str) -> Code:
    """The SNOMED CT code for a finding type, Lesion where none fits."""
    return FINDING_TYPES.get(finding_type.lower(), GENERIC_FINDING)


def topic_site(topic: str) -> Code | None:
    """The finding-site code of a topic, ``None`` for topics outside the table."""
    return TOPIC_SITES.get(topic.lower())


def laterality(location: str | None) -> Code | None:
    """Left, Right or Bilateral when the location phrase says so, else ``None``."""
    if not location:
        return None
    words = set(re.findall(r"[a-z]+", location.lower()))
    if "bilateral" in words or {"left", "right"} <= words:
        return codes.SCT.Bilateral
    if "left" in words:
        return codes.SCT.Left
    if "right" in words:
        return codes.SCT.Right
    return None


def topic_color(topic: str) -> tuple[int, int, int]:
    return TOPIC_COLORS.get(topic.lower(), OTHER_TOPIC_COLOR)
