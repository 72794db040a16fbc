"""The MedGemma engine through Readout's CLI and writers: the SR and SEG are conformant.

A tiny random Gemma 3 (tests/tiny_gemma.py) stands in for the real checkpoint and goes through
the same loading path; its text is noise, so the SEG path is also checked with hand-written
rollouts mapped through the engine's own consensus and box mapping.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_sr.conformance import dciodvfy_errors, dsrdump_errors
from dicom_sr.seg import write_segmentation
from dicom_sr.sr import write_report
from engines.medgemma import (
    MedGemmaEngine,
    Rollout,
    Sampled,
    load_medgemma,
)
from engines.phantom import TOPICS
from engines.report import ReadRequest
from engines.results import StudyResult
from engines.series import load_study_volume


@pytest.mark.slow
def test_readout_run_with_medgemma_writes_a_conformant_sr(tiny_folder: Path, make_phantom_study, tmp_path: Path) -> None:
    study = make_phantom_study(4)
    command = [sys.executable, "-m", "orthanc_plugin.cli", "run", str(study / "dicom"), "--out", str(tmp_path),
               "--engine", "medgemma", "--model-path", str(tiny_folder), "--rollouts", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    findings = json.loads((tmp_path / "findings.json").read_text())
    assert findings["engine"]["name"] == "medgemma" and [t["topic"] for t in findings["topics"]] == list(TOPICS)
    assert dciodvfy_errors(tmp_path / "sr.dcm") == [] and dsrdump_errors(tmp_path / "sr.dcm") == []
    if (tmp_path / "seg.dcm").exists():  # random weights rarely write a valid box
        assert dciodvfy_errors(tmp_path / "seg.dcm") == []
    assert "Timings: preprocess" in result.stdout


def test_medgemma_boxes_become_a_conformant_seg_and_sr(tiny_folder: Path, make_phantom_study, tmp_path: Path) -> None:
    volume, _ = load_study_volume(make_phantom_study(4) / "dicom")
    engine = MedGemmaEngine(*load_medgemma(tiny_folder))
    layout, _ = engine.prepare(volume.hu)
    nodule = ('A 9 mm nodule in the right upper lobe. ```json\n'
              '[{"box_2d": [300, 250, 360, 310], "label": "nodule", "slice": 30}]\n```')
    effusion = 'Small left pleural effusion. [{"box_2d": [500, 600, 800, 900], "label": "pleural effusion", "slice": 20}]'
    sampled = Sampled(layout, {"lungs": [Rollout(nodule)] * 3, "pleura": [Rollout(effusion)] * 3}, None, {}, {})
    request = ReadRequest(topics=("lungs", "pleura"), questions=(), rollouts=3)
    topics, answers = engine.assemble(sampled, request)
    result = StudyResult(volume.series_instance_uid, engine.info, topics, answers)
    boxes = [f.box.voxel for t in result.topics for f in t.findings]
    assert len(boxes) == 2
    k = layout.selected[29]
    assert boxes[0][0] == k and boxes[0][3] > k  # SLICE 30 is the 30th slice the model saw

    seg = write_segmentation(result, volume, rule="medgemma-test")
    sr = write_report(result, volume, seg, rule="medgemma-test")
    seg.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert len(seg.SegmentSequence) == 2
    assert dciodvfy_errors(tmp_path / "seg.dcm") == [] and dciodvfy_errors(tmp_path / "sr.dcm") == []
    assert dsrdump_errors(tmp_path / "sr.dcm") == []


def test_an_uncertain_box_is_redrawn_on_a_zoomed_crop(tiny_folder: Path, monkeypatch) -> None:
    import numpy as np

    from engines.medgemma import _zoom_region
    from engines.results import Box, Finding

    engine = MedGemmaEngine(*load_medgemma(tiny_folder))
    hu = np.zeros((40, 128, 128), dtype=np.int16)
    first = Finding(type="nodule", text="Nodule.", box=Box((18, 60, 60, 22, 76, 76)), extra={"high_box_entropy": True})
    region = _zoom_region(first.box.voxel, hu.shape)
    assert region == (14, 28, 28, 26, 108, 108)  # grown by at least 4 slices and 32 pixels, inside the volume
    seen = {}

    def sample(crop, request):  # the re-look's answer, as the model would give it on the crop
        seen["shape"], seen["topics"] = crop.shape, request.topics
        layout, _ = engine.prepare(crop)
        answer = 'Nodule. [{"box_2d": [400, 400, 560, 560], "label": "nodule", "slice": 6}]'
        return Sampled(layout, {"lungs": [Rollout(answer)] * request.rollouts}, None, {}, {})

    monkeypatch.setattr(engine, "sample", sample)
    engine._reground(hu, "lungs", first, ReadRequest(topics=("lungs",), questions=(), rollouts=3))
    assert seen == {"shape": (12, 80, 80), "topics": ("lungs",)}
    assert first.extra["regrounded"] and first.extra["box_before_regrounding"] == [18, 60, 60, 22, 76, 76]
    k0, r0, c0, k1, r1, c1 = first.box.voxel
    assert (k0, k1) == (14 + 5, 14 + 6)  # SLICE 6 of the crop
    assert 28 + 32 <= r0 < r1 <= 28 + 45 and 28 + 32 <= c0 < c1 <= 28 + 45  # 0.4..0.56 of the 80-pixel crop
