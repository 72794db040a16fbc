"""A stored study as the rules see it, read through Orthanc's REST API.

Works with any ``get_json(path)``: the runner's HTTP client, or the plugin's in-process calls.
Readout's own outputs (SR and SEG series it wrote) are set apart: they never count as the
study's images, which is what keeps a stored report from triggering another read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dicom_sr.content import MANUFACTURER
from orthanc_plugin.rules import SeriesInfo, StudyInfo

GetJson = Callable[[str], Any]
OUTPUT_MODALITIES = ("SR", "SEG")


@dataclass(frozen=True)
class StoredStudy:
    """A study's source images (for the rules) and the outputs Readout already wrote into it."""

    info: StudyInfo
    study_instance_uid: str
    fingerprint: str  # changes when source images are added or removed, not when outputs are
    output_series: tuple[str, ...]  # Orthanc ids of Readout's own series

    @property
    def has_sources(self) -> bool:
        return bool(self.info.series)


def _number(series: dict) -> tuple[int, str]:
    try:
        return int(series["MainDicomTags"].get("SeriesNumber", "0") or 0), series["ID"]
    except ValueError:
        return 0, series["ID"]


def read_study(get_json: GetJson, study_id: str) -> StoredStudy:
    """Fetch a study's tags and series (one request per series for its first instance's tags)."""
    study = get_json(f"/studies/{study_id}")
    sources: list[SeriesInfo] = []
    outputs: list[str] = []
    source_instances: list[str] = []
    first_tags: dict[str, Any] = {}
    for series in sorted(get_json(f"/studies/{study_id}/series"), key=_number):
        instances = series.get("Instances", [])
        if not instances:
            continue
        tags = dict(get_json(f"/instances/{instances[0]}/tags?simplify"))
        tags.update({k: v for k, v in series["MainDicomTags"].items() if v != ""})
        if tags.get("Modality") in OUTPUT_MODALITIES and tags.get("Manufacturer") == MANUFACTURER:
            outputs.append(series["ID"])
            continue
        first_tags = first_tags or tags
        sources.append(SeriesInfo(orthanc_id=series["ID"], tags=tags, instances=len(instances)))
        source_instances += instances
    study_tags = {**first_tags, **study.get("PatientMainDicomTags", {}), **study.get("MainDicomTags", {})}
    study_tags["ModalitiesInStudy"] = "\\".join(sorted({s.tags.get("Modality", "") for s in sources} - {""}))
    fingerprint = hashlib.sha256("\n".join(sorted(source_instances)).encode()).hexdigest()[:16]
    return StoredStudy(
        info=StudyInfo(orthanc_id=study_id, tags=study_tags, series=tuple(sources)),
        study_instance_uid=study["MainDicomTags"].get("StudyInstanceUID", ""),
        fingerprint=fingerprint,
        output_series=tuple(outputs),
    )
