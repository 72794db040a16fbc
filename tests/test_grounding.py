"""Consensus grounding: IoU, majority boxes, clustering across rollouts, entropy and zoom crops."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engines.grounding import (
    Candidate,
    ConsensusFinding,
    consensus,
    iou3d,
    majority_answer,
    needs_regrounding,
    token_entropy,
    vote_box,
)

BINS = 64

# Four jittered reads of one nodule. Hand-computed majority (>= 3 of 4 votes): slice k=10 is
# missed only by B, so A, C, D still agree there; k=20 is covered by B alone. The same holds on
# r (C) and c (D), so the majority box is exactly A.
A = (10, 10, 10, 20, 20, 20)
B = (11, 10, 10, 21, 20, 20)  # IoU with A: 900 / 1100 = 9/11
C = (10, 11, 10, 20, 21, 20)  # 9/11
D = (10, 10, 12, 20, 20, 22)  # 800 / 1200 = 2/3
FAR = (40, 40, 40, 48, 48, 48)


def cand(
    rollout: int, box: tuple[int, ...], entropy: float = 0.5, kind: str = "nodule", text: str = ""
) -> Candidate:
    return Candidate(rollout, kind, text or f"rollout {rollout}", box, entropy)


def test_iou3d_by_hand() -> None:
    assert iou3d(A, A) == 1.0
    assert iou3d(A, FAR) == 0.0
    assert iou3d(A, (20, 10, 10, 30, 20, 20)) == 0.0  # touching faces share no voxel
    # Shifted by half its length on k: intersection 5*10*10 = 500, union 1500.
    assert iou3d(A, (15, 10, 10, 25, 20, 20)) == pytest.approx(1 / 3)
    assert iou3d(A, D) == pytest.approx(2 / 3)


def test_vote_box_majority_region_by_hand() -> None:
    p, q, r = (0, 0, 0, 4, 4, 4), (2, 2, 0, 6, 6, 4), (2, 0, 2, 6, 4, 6)
    # Pairwise overlaps (>= 2 of 3 votes): p&q k[2,4) r[2,4) c[0,4); p&r k[2,4) r[0,4) c[2,4);
    # q&r k[2,6) r[2,4) c[2,4). Their bounding box: k[2,6) r[0,4) c[0,4).
    assert vote_box([p, q, r], bins=8) == (2, 0, 0, 6, 4, 4)
    assert vote_box([A, B, C, D], BINS) == A


def test_vote_box_without_majority_is_none() -> None:
    assert vote_box([(0, 0, 0, 2, 2, 2), (4, 4, 4, 6, 6, 6)], bins=8) is None
    assert vote_box([], bins=8) is None


def test_vote_box_rasterizes_only_the_union() -> None:
    # A full 4096^3 grid would need hundreds of GiB; the union is 2^3 voxels.
    corner = (4090, 4090, 4090, 4092, 4092, 4092)
    assert vote_box([corner, corner], bins=4096) == corner


def test_vote_box_rejects_boxes_outside_the_grid() -> None:
    with pytest.raises(ValueError, match="bins=8"):
        vote_box([(0, 0, 0, 9, 2, 2)], bins=8)


def test_consensus_four_of_five_agree() -> None:
    candidates = [
        cand(0, A, 0.3, text="Nodule, best match."),
        cand(1, B, 0.2),
        cand(2, C, 0.4),
        cand(3, D, 0.1),  # most certain, but not the best match to the consensus box
        cand(4, FAR, 0.05),  # a lone read elsewhere
    ]
    (finding,) = consensus(candidates, n_rollouts=5, bins=BINS)
    assert finding.type == "nodule"
    assert finding.support == 4
    assert finding.agreement == pytest.approx(0.8)
    assert finding.box == A
    mean_iou = (1 + 9 / 11 + 9 / 11 + 2 / 3) / 4
    assert finding.mean_iou == pytest.approx(mean_iou)
    assert finding.confidence == pytest.approx(0.8 * mean_iou)
    assert finding.entropy == pytest.approx((0.3 + 0.2 + 0.4 + 0.1) / 4)
    assert finding.text == "Nodule, best match."
    assert [m.rollout for m in finding.members] == [0, 1, 2, 3]


def test_consensus_drops_a_finding_in_two_of_five_rollouts() -> None:
    candidates = [cand(r, A) for r in range(5)] + [cand(1, FAR), cand(3, FAR)]
    findings = consensus(candidates, n_rollouts=5, bins=BINS)
    assert [f.box for f in findings] == [A]


def test_consensus_needs_strictly_more_than_min_agreement() -> None:
    assert consensus([cand(0, A), cand(1, A)], n_rollouts=4, bins=BINS) == []
    (finding,) = consensus([cand(0, A), cand(1, A), cand(2, A)], n_rollouts=4, bins=BINS)
    assert finding.agreement == pytest.approx(0.75)


def test_two_lesions_of_one_type_stay_apart() -> None:
    jittered = (41, 40, 40, 49, 48, 48)
    candidates = [cand(r, A) for r in range(3)] + [cand(0, FAR), cand(1, FAR), cand(2, jittered)]
    findings = consensus(candidates, n_rollouts=3, bins=BINS)
    assert [f.box for f in findings] == [A, FAR]  # the exact one first: higher confidence
    assert [f.support for f in findings] == [3, 3]
    assert findings[0].confidence == pytest.approx(1.0)
    assert findings[1].confidence < 1.0


def test_different_types_never_merge() -> None:
    candidates = [cand(r, A, kind="nodule") for r in range(3)]
    candidates += [cand(r, A, kind="mass") for r in range(3)]
    findings = consensus(candidates, n_rollouts=5, bins=BINS)
    assert [(f.type, f.support) for f in findings] == [("mass", 3), ("nodule", 3)]
    assert all({m.type for m in f.members} == {f.type} for f in findings)


def test_a_rollout_with_two_boxes_in_one_cluster_counts_once() -> None:
    shifted = (12, 12, 12, 22, 22, 22)
    candidates = [
        cand(0, shifted, 0.1),  # seeds the cluster first (lowest entropy) ...
        cand(1, A, 0.2),
        cand(2, A, 0.3),
        cand(0, A, 0.4),  # ... but this box of rollout 0 fits rollouts 1 and 2 better
    ]
    (finding,) = consensus(candidates, n_rollouts=5, bins=BINS)
    assert finding.support == 3
    assert finding.agreement == pytest.approx(0.6)
    assert [m.rollout for m in finding.members] == [0, 1, 2]
    assert all(m.box == A for m in finding.members)


def test_a_rollout_repeating_a_finding_does_not_make_a_second_one() -> None:
    # Rollouts 0-2 each state the same nodule twice (the same snapped box): one finding, not two.
    candidates = [cand(r, A, 0.1 * r) for r in range(3)] + [cand(r, A, 0.5 + 0.1 * r) for r in range(3)]
    (finding,) = consensus(candidates, n_rollouts=5, bins=BINS, min_agreement=0.3)
    assert finding.support == 3
    assert [m.entropy for m in finding.members] == pytest.approx([0.0, 0.1, 0.2])  # the surer statement stays


def test_consensus_ignores_input_order() -> None:
    candidates = [cand(0, A, 0.3), cand(1, B, 0.2), cand(2, C, 0.4), cand(3, D, 0.1), cand(4, FAR)]
    assert consensus(candidates, 5, BINS) == consensus(candidates[::-1], 5, BINS)


def test_consensus_rejects_rollout_out_of_range() -> None:
    with pytest.raises(ValueError, match="rollout 5"):
        consensus([cand(5, A)], n_rollouts=5, bins=BINS)


def test_majority_answer_ties_go_to_first_answer() -> None:
    assert majority_answer(["no", "yes", "yes", "no"]) == ("no", 0.5)
    answer, share = majority_answer(["yes", "no", "no"])
    assert answer == "no"
    assert share == pytest.approx(2 / 3)


def test_token_entropy() -> None:
    probs = np.array([[0.25, 0.25, 0.25, 0.25], [0.0, 1.0, 0.0, 0.0]])
    entropy = token_entropy(probs)
    assert entropy.shape == (2,)
    assert entropy[0] == pytest.approx(math.log(4))
    assert entropy[1] == 0.0


def test_needs_regrounding_above_threshold() -> None:
    finding = ConsensusFinding("nodule", "", A, 3, 0.6, 1.0, 0.6, entropy=1.2, members=())
    assert needs_regrounding(finding, threshold=1.0)
    assert not needs_regrounding(finding, threshold=1.2)
