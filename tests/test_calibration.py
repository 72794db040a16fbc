"""Choosing a trained model's decision thresholds on development phantoms."""

from __future__ import annotations

import json
import shutil

import pytest

from engines.calibration import DEV_NORMAL_SEEDS, DEV_SEEDS, GRID, calibrate_checkpoint, choose
from engines.checkpoint import SHIPPED
from engines.registry import create_engine
from engines.report import Thresholds
from engines.training import TRAIN_SEED_BASE, VALIDATION_SEEDS
from orthanc_plugin.cli import main


def _score(min_agreement, map_confirm, map_sure, f1_8mm, normal_with_findings=0.0) -> dict:
    return {"min_agreement": min_agreement, "map_confirm": map_confirm, "map_sure": map_sure,
            "f1_8mm": f1_8mm, "normal_with_findings": normal_with_findings}


def test_the_best_point_wins_unless_it_gives_normal_studies_findings():
    scores = [_score(0.3, 0.8, 0.95, 0.80), _score(0.1, 0.7, 0.9, 0.86), _score(0.1, 0.6, 0.85, 0.9, 0.1)]
    assert choose(scores) == Thresholds(0.1, 0.7, 0.9)


def test_of_equal_points_the_strictest_listed_first_wins():
    assert all(list(values) == sorted(values, reverse=True) for values in GRID.values())
    assert choose([_score(0.3, 0.8, 0.95, 0.8), _score(0.1, 0.8, 0.95, 0.8)]) == Thresholds()


def test_when_every_point_gives_normal_studies_findings_the_best_still_wins():
    assert choose([_score(0.3, 0.8, 0.95, 0.7, 0.2), _score(0.1, 0.6, 0.85, 0.8, 0.3)]) == Thresholds(0.1, 0.6, 0.85)


def test_the_development_phantoms_are_used_nowhere_else():
    evaluation = range(9001, 10_000)
    for dev in (DEV_SEEDS, DEV_NORMAL_SEEDS):
        assert not set(dev) & (set(VALIDATION_SEEDS) | set(evaluation)) and dev.stop <= TRAIN_SEED_BASE


@pytest.mark.slow
def test_calibrating_weights_records_thresholds_the_engine_then_uses(tmp_path):
    for suffix in (".safetensors", ".json"):
        shutil.copy(SHIPPED.with_suffix(suffix), tmp_path / f"demo{suffix}")
    (tmp_path / "MODEL_CARD.md").write_text("before\n")
    done = []
    meta = calibrate_checkpoint(tmp_path / "demo", range(8100, 8102), range(8400, 8401), lambda n, total: done.append((n, total)))
    assert done[-1] == (3, 3)
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["thresholds"] == meta["thresholds"]
    assert saved["calibration"]["phantoms"] == [8100, 8101] and saved["calibration"]["normal_phantoms"] == [8400, 8400]
    assert saved["calibration"]["chosen_f1_8mm"] >= saved["calibration"]["default_f1_8mm"] or \
        saved["calibration"]["default_normal_with_findings"] > 0.05
    assert create_engine("demo", weights=tmp_path / "demo").thresholds == Thresholds(**saved["thresholds"])
    assert "decision thresholds" in (tmp_path / "MODEL_CARD.md").read_text()


def test_readout_calibrate_calibrates_the_weights_it_names_with_a_progress_bar(monkeypatch, tmp_path, capsys):
    calls = []

    def fake(stem, seeds=DEV_SEEDS, normal_seeds=DEV_NORMAL_SEEDS, progress=None):  # the real one's signature
        calls.append((stem, seeds, normal_seeds))
        progress(1, 1)
        return {"thresholds": {"min_agreement": 0.1}, "calibration": {"wall_time_s": 1.0}}

    monkeypatch.setattr("engines.calibration.calibrate_checkpoint", fake)
    assert main(["calibrate", "--weights", str(tmp_path / "demo")]) == 0
    assert calls == [(tmp_path / "demo", DEV_SEEDS, DEV_NORMAL_SEEDS)] and '"min_agreement": 0.1' in capsys.readouterr().out
