"""Building blocks shared by the SR and SEG writers."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_sr import uids
from engines.results import EngineInfo, Finding, StudyResult

MANUFACTURER = "Readout"
# Outputs always carry UTF-8: sentences and inherited patient names may be non-ASCII.
CHARACTER_SET = "ISO_IR 192"


@dataclass(frozen=True)
class OutputIds:
    """UIDs of one read's outputs, derived from (study, rule, engine, engine version, read version).

    ``read`` counts the reads of the same study by the same rule: a study that receives new
    images is read again and its new outputs must not overwrite the old ones.
    """

    study_uid: str
    rule: str
    engine: EngineInfo
    read: int = 1

    def uid(self, kind: str) -> str:
        if self.read != 1:
            kind = f"{kind}@read{self.read}"
        return uids.output_uid(self.study_uid, self.rule, self.engine.name, self.engine.version, kind)

    def tracking_uid(self, label: str) -> str:
        return self.uid(f"tracking:{label}")


def writable_sources(sources: tuple[Dataset, ...]) -> list[Dataset]:
    """Copies of the source headers that highdicom accepts.

    A present-but-empty SpecificCharacterSet (seen in real scanner output) makes highdicom
    refuse the dataset; an empty value means the default repertoire, so it is dropped.
    """
    prepared = []
    for ds in sources:
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
            ds = copy.copy(ds)
            del ds.SpecificCharacterSet
        prepared.append(ds)
    return prepared


def image_library_view(ds: Dataset) -> Dataset:
    """``ds`` as highdicom's Image Library entry wants it.

    highdicom describes an image by its top-level PixelSpacing, orientation and position,
    which a multi-frame image keeps in its functional groups; this copy lifts them from the
    shared groups and the first frame, so the entry describes the image by its first frame.
    """
    if "PixelSpacing" in ds or "SharedFunctionalGroupsSequence" not in ds:
        return ds
    shared = ds.SharedFunctionalGroupsSequence[0]
    first = ds.PerFrameFunctionalGroupsSequence[0]

    def group(keyword: str) -> Dataset:
        return (first.get(keyword) or shared.get(keyword))[0]

    view = copy.copy(ds)
    measures = group("PixelMeasuresSequence")
    view.PixelSpacing = measures.PixelSpacing
    view.SliceThickness = measures.get("SliceThickness", ds.get("SliceThickness"))
    view.ImageOrientationPatient = group("PlaneOrientationSequence").ImageOrientationPatient
    view.ImagePositionPatient = group("PlanePositionSequence").ImagePositionPatient
    return view


def algorithm_identification(engine: EngineInfo) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=engine.name, family=codes.cid7162.ArtificialIntelligence, version=engine.version
    )


def contributing_equipment(engine: EngineInfo) -> hd.ContributingEquipment:
    """IHE AIR's record of the algorithm that produced the object."""
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=engine.name,
        software_versions=engine.version,
        contribution_description="AI read (synthetic-data models are not for clinical use)",
    )
    equipment.DeviceUID = uids.device_uid(engine.name)
    return equipment


def tracking_label(topic: str, kind: str, number: int | None = None) -> str:
    """Human-readable tracking identifier, e.g. ``lungs: nodule 1`` or ``heart: normal``."""
    return f"{topic}: {kind}" if number is None else f"{topic}: {kind} {number}"


@dataclass(frozen=True)
class BoxedFinding:
    """A finding that has a box, with the SEG segment number it gets."""

    segment_number: int
    topic: str
    label: str
    finding: Finding


def boxed_findings(result: StudyResult) -> list[BoxedFinding]:
    """Findings with boxes in report order; segment numbers follow this order from 1."""
    boxed = []
    for topic in result.topics:
        for number, finding in enumerate(topic.findings, start=1):
            if finding.box is not None:
                label = tracking_label(topic.topic, finding.type, number)
                boxed.append(BoxedFinding(len(boxed) + 1, topic.topic, label, finding))
    return boxed
