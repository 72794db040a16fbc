"""`readout eval`'s scoring on constructed truth and predictions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from engines.evaluation import Tally
from engines.results import Box, EngineInfo, Finding, StudyResult, TopicResult


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
