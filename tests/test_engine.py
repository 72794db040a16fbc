"""The demo engine with the shipped weights: reproducible, and `readout run` writes valid DICOM."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dicom_sr.conformance import dciodvfy_errors, dsrdump_errors
from engines.checkpoint import SHIPPED, CheckpointError, load_checkpoint
from engines.phantom import render_phantom
from engines.registry import EngineError, create_engine
from engines.grounding import Candidate
from engines.preprocess import BINS, FINDING_GRID, bins_to_box, box_to_bins, prepare
from engines.prompts import MAP_TYPES
from engines.candidates import MapCandidate
from engines.report import ReadRequest, Relook, Sampled, Thresholds, finding_type
from engines.results import Box, Finding, StudyResult, TopicResult
from engines.tokenizer import MAX_ANSWER_TOKENS
from engines.volume import Volume
from orthanc_plugin.cli import main
from tests.data.record_demo_reference import greedy_read

REFERENCE = Path(__file__).parent / "data" / "demo_reference.json"
DEFAULT = Thresholds()


def test_shipped_weights_reproduce_the_recorded_output():
    now, recorded = greedy_read(), json.loads(REFERENCE.read_text())
    # Float rounding differs between CPUs: a token whose rho sits on theta may flip, nothing more.
    for prompt, share in recorded["kept_ratio"].items():
        assert abs(now["kept_ratio"][prompt] - share) <= 3 / 512, prompt
    assert {k: v for k, v in now.items() if k != "kept_ratio"} == {k: v for k, v in recorded.items() if k != "kept_ratio"}


def test_shipped_weights_fit_the_size_limit_and_say_how_they_were_made():
    model, meta = load_checkpoint()
    weights = Path(__file__).resolve().parents[1] / "engines" / "weights" / "demo.safetensors"
    assert weights.stat().st_size <= 30 * 1024 * 1024
    assert meta["training"]["steps"] > 0 and meta["config"]["schedule_layer"] == meta["config"]["decoder_layers"] // 4
    assert sum(p.numel() for p in model.parameters()) > 1_000_000


def test_missing_weights_and_unknown_engine_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="model weights not found"):
        load_checkpoint(tmp_path / "nothing")
    with pytest.raises(EngineError, match="unknown engine 'gpt'; available: demo"):
        create_engine("gpt")


def test_a_relook_returns_a_box_inside_the_volume():
    engine = create_engine("demo")
    phantom = render_phantom(9003, findings={"lungs": ["mass"], "pleura": [], "heart": [], "liver": [], "bones": []})
    spacing = (phantom.slice_spacing_mm, phantom.pixel_spacing_mm, phantom.pixel_spacing_mm)
    [mass] = phantom.truth.topics[0].findings
    [look] = engine.relook(phantom.hu, spacing, [("lungs", "mass", mass.box.voxel)])
    if look is not None:  # the re-look may find nothing; what it returns must be a valid box and a mass
        assert finding_type(look.text) == "mass"
        k0, r0, c0, k1, r1, c1 = look.box
        assert 0 <= k0 < k1 <= phantom.hu.shape[0] and 0 <= r0 < r1 <= phantom.hu.shape[1]
        assert 0 <= c0 < c1 <= phantom.hu.shape[2]


def test_boxes_the_finding_map_grounded_are_not_relooked():
    engine = create_engine("demo")
    phantom = render_phantom(9005)
    spacing = (phantom.slice_spacing_mm, phantom.pixel_spacing_mm, phantom.pixel_spacing_mm)
    request = ReadRequest(questions=(), entropy_threshold=0.0)  # every focal finding is a re-look candidate
    topics, _ = engine.assemble(engine.sample(phantom.hu, spacing, request), phantom.hu, spacing, request)
    findings = [f for t in topics for f in t.findings]
    assert any(f.extra["box_from_map"] for f in findings)
    for f in findings:
        if f.extra["box_from_map"]:
            assert not f.extra["regrounded"] and list(f.box.voxel) == f.extra["box_before_regrounding"]


def test_a_read_counts_the_steps_it_decoded():
    """bench/engine.py divides decode time by them: reads of different answer lengths then compare."""
    engine = create_engine("demo")
    phantom = render_phantom(9003, findings={"lungs": ["mass"], "pleura": [], "heart": [], "liver": [], "bones": []})
    spacing = (phantom.slice_spacing_mm, phantom.pixel_spacing_mm, phantom.pixel_spacing_mm)
    yes_no = ReadRequest(topics=(), questions=("Is there a pleural effusion?",), rollouts=2, temperature=0.0)
    report = ReadRequest(topics=("lungs",), questions=(), rollouts=2, temperature=0.0)
    short = engine.sample(phantom.hu, spacing, yes_no).decode_steps
    long = engine.sample(phantom.hu, spacing, report).decode_steps
    # A yes or no and its end; a sentence, six coordinates and the end.
    assert 2 <= short < 8 < long <= MAX_ANSWER_TOKENS


def test_a_finding_needs_two_rollouts_and_its_finding_map_or_one_and_a_sure_map():
    engine = create_engine("demo")
    engine.thresholds = DEFAULT  # whatever the shipped weights were calibrated to
    phantom = render_phantom(22, normal=True)
    spacing = (phantom.slice_spacing_mm, phantom.pixel_spacing_mm, phantom.pixel_spacing_mm)
    request = ReadRequest(topics=("lungs",), questions=(), reground=False)
    box = (20, 20, 20, 26, 28, 28)
    probability = np.zeros((len(MAP_TYPES), *FINDING_GRID), dtype=np.float32)
    grid = [slice(box[a] * FINDING_GRID[a] // BINS, box[a + 3] * FINDING_GRID[a] // BINS) for a in range(3)]
    probability[(MAP_TYPES.index("nodule"), *grid)] = DEFAULT.map_confirm + 0.05

    def found(rollouts: int, kind: str, map_check: bool = True) -> list:
        stated = [Candidate(r, kind, f"A {kind} in the right upper lobe.", box, 0.1, True) for r in range(rollouts)]
        sampled = Sampled(prepare(phantom.hu, spacing), phantom.hu.shape, {"lungs": stated}, {"lungs": []}, {},
                          {"lungs": 0.3}, probability)
        topics, _ = engine.assemble(sampled, phantom.hu, spacing, replace(request, map_check=map_check))
        return topics[0].findings

    [nodule] = found(2, "nodule")
    assert nodule.extra["agreement"] == 0.4 and nodule.extra["map_probability"] == pytest.approx(DEFAULT.map_confirm + 0.05)
    assert found(1, "nodule") == []  # one rollout of five is no consensus
    assert found(5, "mass") == []  # every rollout, but the mass map sees nothing there
    assert [f.type for f in found(2, "mass", map_check=False)] == ["mass"]  # the ablation: consensus alone
    assert found(1, "mass", map_check=False) == []
    probability[(MAP_TYPES.index("nodule"), *grid)] = DEFAULT.map_sure + 0.01
    probability[(MAP_TYPES.index("pneumothorax"), *grid)] = DEFAULT.map_sure + 0.01
    assert [f.type for f in found(1, "nodule")] == ["nodule"]  # a focal lesion the map is sure of
    assert found(1, "pneumothorax") == []  # not focal: still two rollouts
    assert found(1, "nodule", map_check=False) == []  # without the check, no map can stand in for a rollout
    # A calibrated model's thresholds: one rollout and a fainter map suffice.
    probability[(MAP_TYPES.index("pneumothorax"), *grid)] = 0.65
    engine.thresholds = Thresholds(min_agreement=0.1, map_confirm=0.6)
    assert [f.type for f in found(1, "pneumothorax")] == ["pneumothorax"]


def test_weights_that_carry_calibrated_thresholds_give_the_engine_them(tmp_path):
    for suffix in (".safetensors", ".json"):
        (tmp_path / f"demo{suffix}").write_bytes(SHIPPED.with_suffix(suffix).read_bytes())
    meta = json.loads((tmp_path / "demo.json").read_text())
    meta.pop("thresholds", None)
    (tmp_path / "demo.json").write_text(json.dumps(meta))
    assert create_engine("demo", weights=tmp_path / "demo").thresholds == DEFAULT
    meta["thresholds"] = {"min_agreement": 0.1, "map_confirm": 0.7, "map_sure": 0.9}
    (tmp_path / "demo.json").write_text(json.dumps(meta))
    assert create_engine("demo", weights=tmp_path / "demo").thresholds == Thresholds(0.1, 0.7, 0.9)
    meta["thresholds"] = {"min_agreement": 0.1, "map_confim": 0.7}  # a hand edit's typo
    (tmp_path / "demo.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="map_confim"):
        create_engine("demo", weights=tmp_path / "demo")


def test_a_pneumothorax_takes_its_box_and_depth_from_its_air():
    engine = create_engine("demo")
    phantom = render_phantom(9010, findings={"lungs": [], "pleura": ["pneumothorax"], "heart": [], "liver": [], "bones": []})
    spacing = (phantom.slice_spacing_mm, phantom.pixel_spacing_mm, phantom.pixel_spacing_mm)
    [truth] = phantom.truth.topics[1].findings
    model_input = prepare(phantom.hu, spacing)
    box = box_to_bins(truth.box.voxel, model_input.extent)
    probability = np.zeros((len(MAP_TYPES), *FINDING_GRID), dtype=np.float32)
    probability[MAP_TYPES.index("pneumothorax")] = DEFAULT.map_confirm + 0.05
    stated = [Candidate(r, "pneumothorax", "Right pneumothorax, 99 mm.", box, 0.1, True) for r in range(2)]
    sampled = Sampled(model_input, phantom.hu.shape, {"pleura": stated}, {"pleura": []}, {}, {"pleura": 0.3}, probability)
    topics, _ = engine.assemble(sampled, phantom.hu, spacing, ReadRequest(topics=("pleura",), questions=()))
    [found] = topics[0].findings
    assert found.extra["box_from_image"] and found.size_mm == pytest.approx(truth.size_mm, abs=1)
    assert found.text == f"Right pneumothorax, {found.size_mm:.0f} mm."


def test_a_map_region_the_rollouts_passed_over_gets_a_second_look(monkeypatch):
    engine = create_engine("demo")
    phantom = render_phantom(22, normal=True)
    spacing = (phantom.slice_spacing_mm, phantom.pixel_spacing_mm, phantom.pixel_spacing_mm)
    stated_box, passed_box, faint_box = (20, 20, 20, 26, 28, 28), (40, 20, 20, 46, 28, 28), (20, 40, 40, 26, 46, 46)
    probability = np.zeros((len(MAP_TYPES), *FINDING_GRID), dtype=np.float32)
    for box, p in ((stated_box, DEFAULT.map_sure + 0.01), (passed_box, DEFAULT.map_confirm + 0.05), (faint_box, DEFAULT.map_confirm - 0.1)):
        cells = [slice(box[a] * FINDING_GRID[a] // BINS, box[a + 3] * FINDING_GRID[a] // BINS) for a in range(3)]
        probability[(MAP_TYPES.index("nodule"), *cells)] = p
    regions = [MapCandidate(box, "nodule") for box in (stated_box, passed_box, faint_box)]
    sampled = Sampled(prepare(phantom.hu, spacing), phantom.hu.shape,
                      {"lungs": [Candidate(0, "nodule", "A 12 mm solid nodule in the right upper lobe.", stated_box, 0.1, True)]},
                      {"lungs": []}, {}, {"lungs": 0.3}, probability, regions={"lungs": regions})
    looked: list = []

    def relook(volume_hu, spacing_mm, targets):
        looked.extend(targets)
        return [Relook("14 mm solid nodule in the left lower lobe.", tuple(v + 1 for v in box), 0.2) for _, _, box in targets]

    monkeypatch.setattr(engine, "relook", relook)
    request = ReadRequest(topics=("lungs",), questions=())
    topics, _ = engine.assemble(sampled, phantom.hu, spacing, request)
    # Only the confirmed region no standing finding meets: the stated one stands, the faint one is below the map's bar.
    passed_voxel = bins_to_box(passed_box, sampled.model_input.extent, phantom.hu.shape)
    assert looked == [("lungs", "nodule", passed_voxel)]
    second = [f for f in topics[0].findings if f.extra["second_look"]]
    assert [(f.text, f.box.voxel, f.extra["agreement"]) for f in second] == [
        ("14 mm solid nodule in the left lower lobe.", passed_voxel, 0.2)]
    assert len(topics[0].findings) == 2
    # The looks are greedy: another assemble of the same read (eval's ablations, calibration) reuses them.
    looked.clear()
    again, _ = engine.assemble(sampled, phantom.hu, spacing, request)
    assert looked == [] and again == topics
    for off in (replace(request, reground=False), replace(request, map_check=False)):
        looked.clear()
        topics, _ = engine.assemble(sampled, phantom.hu, spacing, off)
        assert looked == [] and not any(f.extra["second_look"] for t in topics for f in t.findings)


def test_a_finding_is_put_on_the_side_of_the_body_its_box_lies_on(monkeypatch):
    engine = create_engine("demo")
    hu = np.full((20, 40, 80), -1000.0)
    hu[:, 5:35, 5:75] = 40  # the body: its middle is column 40
    # Voxel [k, r, c, 1] to LPS mm: c along +x, towards the patient's left.
    affine = np.array([[0, 0, 0.8, 0], [0, 0.8, 0, 0], [2.5, 0, 0, 0], [0, 0, 0, 1]])
    volume = Volume(hu, affine, (), (), (), "1.2.3", "1.2.3.4", "1.2.3.5")
    patient_right, patient_left = Box((5, 10, 10, 10, 20, 30)), Box((5, 10, 50, 10, 20, 70))
    stated = {
        "lungs": [Finding("nodule", "12 mm solid nodule in the left lower lobe.", 12, "left lower lobe", 0.4, patient_right),
                  Finding("nodule", "9 mm solid nodule in the right middle lobe.", 9, "right middle lobe", 0.4, patient_left),
                  Finding("mass", "31 mm mass in the right 149.", 31, "right 149", 0.4, patient_right)],
        "pleura": [Finding("pneumothorax", "Right pneumothorax, 30 mm.", 30, "right pleural space", 0.6, patient_left)],
        "liver": [Finding("hypodense lesion", "10 mm hypodense lesion in the right hepatic lobe.", 10,
                          "right hepatic lobe", 0.6, patient_left)],
    }
    monkeypatch.setattr(engine, "sample", lambda *_: SimpleNamespace(kept_ratio={}, timings={}))
    monkeypatch.setattr(engine, "assemble", lambda *_: ([TopicResult(t, False, fs) for t, fs in stated.items()], []))
    result = engine.run(volume, ReadRequest(questions=()))
    said = {f.text: f.location for t in result.topics for f in t.findings}
    assert said == {"12 mm solid nodule in the right lower lobe.": "right lower lobe",
                    "9 mm solid nodule in the left upper lobe.": "left upper lobe",  # the lingula
                    "Left pneumothorax, 30 mm.": "left pleural space",
                    "31 mm mass in the right lung.": "right lung",  # the decoder named no lobe
                    "10 mm hypodense lesion in the right hepatic lobe.": "right hepatic lobe"}  # a liver's lobe is no side


def test_a_lung_lesion_takes_the_lobe_its_box_lies_in(monkeypatch):
    engine = create_engine("demo")
    hu = np.full((60, 100, 120), -1000.0)
    hu[:, 10:90, 5:115] = 40
    for first, last in ((15, 55), (65, 105)):  # two lungs, their domes at slice 20, apices at 55
        hu[20:56, 20:80, first:last] = -850
        hu[10:20, 20:80, first + 15:last - 15] = -850
    affine = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [2.5, 0, 0, 0], [0, 0, 0, 1]])
    volume = Volume(hu, affine, (), (), (), "1.2.3", "1.2.3.4", "1.2.3.5")
    low_at_the_back, high_in_front = Box((22, 70, 30, 24, 74, 34)), Box((50, 22, 80, 52, 26, 84))
    stated = {"lungs": [Finding("nodule", "12 mm solid nodule in the right upper lobe.", 12, "right upper lobe", 0.4, low_at_the_back),
                        Finding("nodule", "9 mm solid nodule in the left lower lobe.", 9, "left lower lobe", 0.4, high_in_front)]}
    monkeypatch.setattr(engine, "sample", lambda *_: SimpleNamespace(kept_ratio={}, timings={}))
    monkeypatch.setattr(engine, "assemble", lambda *_: ([TopicResult(t, False, fs) for t, fs in stated.items()], []))
    said = [f.location for t in engine.run(volume, ReadRequest(questions=())).topics for f in t.findings]
    assert said == ["right lower lobe", "left upper lobe"]


@pytest.mark.slow
def test_readout_run_writes_findings_sr_seg_and_key_images(make_phantom_study, tmp_path, capsys):
    study = make_phantom_study(9005, {"lungs": ["mass"], "pleura": ["pleural effusion"], "heart": ["cardiomegaly"],
                                      "liver": [], "bones": []})
    # One sampled rollout per prompt: every sampled finding its map confirms survives, so the SEG and PNG paths run.
    code = main(["run", str(study / "dicom"), "--out", str(tmp_path), "--rollouts", "1",
                 "--question", "Is there a pleural effusion?"])
    assert code == 0
    result = StudyResult.load(tmp_path / "findings.json")
    assert [t.topic for t in result.topics] == ["lungs", "pleura", "heart", "liver", "bones"]
    assert [a.question for a in result.answers] == ["Is there a pleural effusion?"]
    assert set(result.extra["timings"]) == {"encode_s", "schedule_s", "decode_s", "measure_s", "reground_s"}
    assert dciodvfy_errors(tmp_path / "sr.dcm") == [] and dsrdump_errors(tmp_path / "sr.dcm") == []
    boxed = [f for t in result.topics for f in t.findings if f.box]
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == len(boxed)
    if boxed:
        assert dciodvfy_errors(tmp_path / "seg.dcm") == []
    out = capsys.readouterr().out
    assert out.index("LUNGS") < out.index("BONES") < out.index("QUESTIONS") < out.index("SR:")


def test_run_refuses_an_empty_request(make_phantom_study, tmp_path, capsys):
    study = make_phantom_study(22, normal=True)
    assert main(["run", str(study / "dicom"), "--out", str(tmp_path), "--topics", ""]) == 2
    assert "nothing to read" in capsys.readouterr().err
    assert main(["run", str(study / "dicom"), "--out", str(tmp_path), "--rollouts", "0"]) == 2
