"""bench/gpu_medgemma.py at toy sizes on the CPU: it runs, measures every phase of every path,
shares one prefix prefill among the topics, prunes to the requested shares, and records nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engines.medgemma_decode import SLOT_CHUNK

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_medgemma.py"
RESULTS = ROOT / "bench" / "RESULTS.md"
PHASES = ("vision_s", "prefill_s", "decode_s", "total_s")

pytestmark = pytest.mark.slow  # a subprocess that imports torch and transformers: ~10 s


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpu-medgemma") / "figures.json"
    before = RESULTS.read_bytes() if RESULTS.exists() else None
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    # The time budget guards a GPU lease; here it would skip stages whenever the machine is busy.
    proc = subprocess.run([sys.executable, str(SCRIPT), "--toy", "--device", "cpu", "--budget-s", "1200",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = RESULTS.read_bytes() if RESULTS.exists() else None
    data = json.loads(out.read_text())
    data["_stdout"], data["_results_unchanged"] = proc.stdout, before == after
    return data


def test_the_toy_run_completes_without_errors(toy):
    assert toy["complete"] and toy["toy"]
    assert toy["errors"] == [], toy["errors"]
    assert toy["image_tokens"] == toy["shapes"]["slices"] * 16


def test_the_vision_probe_times_the_default_kernel_and_other_batches(toy):
    probe = toy["vision_probe"]
    assert probe["slices"] == toy["shapes"]["slices"]
    assert probe["by_kernel_s"]["default"] > 0  # the others may refuse on a CPU; each says so
    assert all(v.startswith("refused") if isinstance(v, str) else v > 0 for v in probe["by_kernel_s"].values())
    assert set(probe["default_kernel_by_batch_s"]) == {"8", "32", str(probe["slices"])}
    assert all(v > 0 for v in probe["default_kernel_by_batch_s"].values())
    assert "Vision encode of" in toy["_stdout"]


def test_every_path_reports_every_phase(toy):
    stages = toy["stages"]
    for key in ("naive", "b", "c50", "c25"):
        for phase in PHASES:
            value = stages[key][phase]
            assert math.isfinite(value) and value >= 0, (key, phase, value)
        # The naive path's decode is a difference of two timed generate calls: on a toy model and a
        # busy machine the noise can exceed it, and the bench then reports 0 (never negative).
        assert stages[key]["decode_ms_per_step"] > 0 or key == "naive" and stages[key]["decode_ms_per_step"] == 0
    for key in ("b", "c50", "c25"):
        batch8 = stages[key]["batch8"]
        assert batch8["batch"] == toy["shapes"]["topics"] + toy["shapes"]["questions"] == 8
        assert batch8["static_ms_per_step"] > 0 and not batch8["sampled"]
    rollouts = stages["b"]["batch8_rollouts"]
    assert rollouts["batch"] == 8 * toy["shapes"]["rollouts"] and rollouts["sampled"] and rollouts["static_ms_per_step"] > 0
    assert stages["b"]["decode_impl"] == "static cache, eager"  # no CUDA graph on the CPU
    # The engine's decoder keeps a window's slots on sliding layers; on global ones the prefix once, the rest per row.
    slots = stages["b"]["static_slots"]
    assert slots["groups"] == 1 and toy["prefix_tokens"] <= slots["shared"] < toy["prefix_tokens"] + SLOT_CHUNK
    assert max(toy["topic_tokens"]) <= slots["full_attention"] < max(toy["topic_tokens"]) + SLOT_CHUNK
    c25 = stages["c25"]["batch8"]["static_slots"]  # each prompt kept its own image tokens: one copy per prompt
    assert c25["groups"] == 8 and c25["full_attention"] == 0
    assert slots["sliding_attention"] <= SLOT_CHUNK < toy["prefix_tokens"]  # the toy model's window (16), padded


def test_topics_share_one_prefix_prefill(toy):
    topics = toy["shapes"]["topics"]
    readout = toy["stages"]["b"]["counts_per_study"]
    assert readout == {"vision_encodes": 1, "prefix_prefills": 1, "prompt_rows": topics}
    naive = toy["stages"]["naive"]["counts_per_study"]
    assert naive == {"vision_encodes": topics, "prefix_prefills": topics}
    assert toy["stages"]["naive"]["generated_tokens"] == [toy["shapes"]["new_tokens"]] * topics


@pytest.mark.parametrize("key, share", [("c50", 0.5), ("c25", 0.25), ("c50_shared", 0.5), ("c25_shared", 0.25)])
def test_pruning_keeps_the_requested_share(toy, key, share):
    stage = toy["stages"][key]
    image = toy["image_tokens"]
    assert len(stage["kept_ratio"]) == toy["shapes"]["topics"]
    for kept in stage["kept_ratio"]:
        assert abs(kept - share) <= 1 / image + 1e-9
    assert toy["stages"]["b"]["kept_ratio"] is None
    assert stage["counts_per_study"]["prefix_prefills"] == 1
    # The pruned rows hold the text, the kept image tokens and the longest prompt.
    text = toy["prefix_tokens"] - image
    longest = max(toy["topic_tokens"])
    assert stage["context_slots"] == text + math.ceil(share * image) + longest


def test_the_engines_decoder_matches_hf_generate(toy):
    checks = toy["checks"]
    decoder = checks["decoder"]
    assert decoder["first_topic_equals_generate"] and decoder["tokens_matching_generate"] == decoder["steps"] == 8
    assert decoder["max_entropy_diff_vs_generate"] < 1e-4 and decoder["graph"] is False
    shared = checks["shared_keep_one_prompt"]
    assert shared["max_logit_diff"] < 1e-4 and shared["kept"] == shared["engine_kept"]


def test_targets_are_judged_and_nothing_is_recorded(toy):
    names = [row["target"] for row in toy["targets"]]
    assert any("2.5 s" in n for n in names) and any("10 ms" in n for n in names) and any("3x" in n for n in names)
    assert all(row["pass"] in (True, False) for row in toy["targets"])
    verdicts = [line for line in toy["_stdout"].splitlines() if line.startswith(("PASS: ", "MISS: "))]
    assert len(verdicts) == len(toy["targets"])
    assert "| (b) Readout" in toy["_stdout"]
    assert toy["_results_unchanged"], "a --toy run must not write bench/RESULTS.md"


def test_a_saved_run_renders_without_the_model(toy, tmp_path):
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({k: v for k, v in toy.items() if not k.startswith("_")}))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--from-json", str(saved), "--no-record"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| target | value | result |" in proc.stdout and "(c) (b) + pruning, 25% kept" in proc.stdout
    assert "| b (static cache, eager, sampled) | 40 |" in proc.stdout  # the batch 8 x 5 rollouts row


def test_the_decode_profile_lists_the_costliest_operations(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_decode_profile.py"), "--toy"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    titles = [line for line in proc.stdout.splitlines() if " ms of CPU operator time" in line]
    assert [t.split(":")[0] for t in titles] == ["Prefix prefill (b)", "Prompts' prefill on it, 5 topics (b)",
                                                 "One decode step, batch 8 (b), eager"]
    step = proc.stdout.split("One decode step")[1]
    rows = [line for line in step.splitlines() if line.startswith("| aten::")]
    assert len(rows) >= 10 and any("aten::bmm" in r or "aten::matmul" in r for r in rows)  # the step's own attention
    assert (tmp_path / "gpu_decode_profile.txt").read_text().strip() == proc.stdout.strip()
