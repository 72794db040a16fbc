"""`readout eval`'s scoring on constructed truth and predictions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from engines import evaluation
from engines.evaluation import Tally
from engines.report import ReadRequest, Thresholds
from engines.results import Answer, Box, EngineInfo, Finding, StudyResult, TopicResult


def _finding(kind: str, box: tuple[int, ...], size_mm: float) -> Finding:
    return Finding(kind, f"{size_mm:.0f} mm {kind}.", size_mm, box=Box(box))


def test_scores_per_truth_type_and_counts_unknown_types_apart() -> None:
    big, small = (10, 10, 10, 20, 20, 20), (40, 40, 40, 44, 44, 44)
    truth = StudyResult("1.2.3", EngineInfo("truth", "1"), [
        TopicResult("lungs", False, [_finding("nodule", big, 10), _finding("nodule", small, 5)]),
        TopicResult("bones", True, text="No bone lesion."),
    ])
    predicted = [
        TopicResult("lungs", False, [_finding("nodule", (11, 10, 10, 21, 20, 20), 10),
                                     _finding("lesion", (60, 60, 60, 64, 64, 64), 4)]),
        TopicResult("bones", True),
    ]
    tally = Tally()
    tally.add(SimpleNamespace(truth=truth), predicted, [], [0.4])
    summary = tally.summary()
    assert set(summary["per_type_f1"]) == {"nodule"}  # "lesion" is no type the truth holds
    assert summary["false_of_other_types"] == 1
    assert summary["f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1), abs=1e-4)  # the lesion is false, the 5-mm nodule missed
    assert summary["f1_8mm"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 0), abs=1e-4)  # the 5-mm miss does not count
    assert summary["per_type_f1"]["nodule"] == pytest.approx(2 / 3, abs=1e-4)
    assert summary["median_iou"] == pytest.approx(9 / 11, abs=1e-4)
    assert summary["normal_studies"] == 0 and summary["mean_kept_ratio"] == 0.4


class _TruthEngine:
    """Reads back each phantom's truth: all findings with five rollouts, the first topic's lost with one."""

    thresholds = Thresholds(min_agreement=0.5)  # calibrated weights: eval also scores the defaults

    def __init__(self) -> None:
        self.requests: list[ReadRequest] = []

    def sample(self, truth, spacing, request: ReadRequest):
        self.requests.append(request)
        return SimpleNamespace(truth=truth, kept_ratio={"lungs": 1.0 if not request.pruning else 0.4})

    def assemble(self, sampled, truth, spacing, request: ReadRequest, rollouts=None, thresholds=None):
        topics = list(truth.topics)
        if rollouts == 1:
            topics[0] = TopicResult(topics[0].topic, True)
        return topics, list(truth.answers)


def test_evaluate_reads_held_out_and_normal_phantoms_in_every_configuration(monkeypatch) -> None:
    rendered = []

    def fake_render(seed: int, normal: bool = False):
        rendered.append((seed, normal))
        nodule = TopicResult("lungs", False, [_finding("nodule", (10, 10, 10, 20, 20, 20), 12)])
        truth = StudyResult(str(seed), EngineInfo("truth", "1"), [TopicResult("lungs", True) if normal else nodule],
                            [Answer("Is there a pleural effusion?", "no")])
        return SimpleNamespace(seed=seed, hu=truth, truth=truth, slice_spacing_mm=2.0, pixel_spacing_mm=1.0)

    monkeypatch.setattr(evaluation, "render_phantom", fake_render)
    engine = _TruthEngine()
    rows = evaluation.evaluate(engine, n=4, seed=9001, ablation=True)
    assert rendered == [(9001, False), (9002, False), (9003, False), (9004, False), (9005, True)]
    assert set(rows) == {"consensus+regrounding", "default thresholds", "no regrounding", "1 rollout",
                         "scheduling off", "no map check", "no map check, 1 rollout"}
    assert rows["consensus+regrounding"]["f1"] == 1.0 and rows["consensus+regrounding"]["normal_studies"] == 1
    assert rows["1 rollout"]["recall"] == 0.0  # its reads lost the only topic with findings
    assert rows["consensus+regrounding"]["mean_kept_ratio"] == 0.4
    assert rows["scheduling off"]["mean_kept_ratio"] == 1.0  # read again, unpruned, with the phantom's seed
    assert [r.seed for r in engine.requests if not r.pruning] == [9001, 9002, 9003, 9004, 9005]
    assert rows["consensus+regrounding"]["yes_no_accuracy"] == 1.0
