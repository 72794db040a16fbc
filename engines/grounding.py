"""Consensus grounding over sampled rollouts, after MedVR's inference transfer (arXiv 2604.08203).

The model reads a study N times at temperature > 0. Each rollout states findings with boxes; a
finding is kept only where more than half of the rollouts put a box of that type in the same
place (the hallucination control), and its box is the voxel-wise majority of theirs. Confidence
is agreement x mean IoU with that box. Coordinate-token entropy flags boxes worth a zoomed re-look.

Boxes live in the model's quantized grid, not the Volume: integer bins ``[0, bins)`` per axis,
half-open ``(k0, r0, c0, k1, r1, c1)``. Pure NumPy; no model code here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BinBox = tuple[int, int, int, int, int, int]


@dataclass(frozen=True)
class Candidate:
    """One finding as one rollout stated it.

    ``entropy`` is the mean entropy (nats) of the six coordinate-token distributions of the box
    as decoded; ``from_map`` says the box was then snapped to a finding-map region.
    """

    rollout: int
    type: str
    text: str
    box: BinBox
    entropy: float
    from_map: bool = False


@dataclass(frozen=True)
class ConsensusFinding:
    """A finding that a majority of rollouts agree on.

    ``text`` is the sentence of the member whose box best matches the consensus ``box``;
    ``support`` counts distinct rollouts, ``agreement`` is ``support / n_rollouts``,
    ``confidence`` is ``agreement * mean_iou`` and ``entropy`` is the members' mean entropy.
    """

    type: str
    text: str
    box: BinBox
    support: int
    agreement: float
    mean_iou: float
    confidence: float
    entropy: float
    members: tuple[Candidate, ...]


def _check_box(box: Sequence[int], bins: int, what: str) -> None:
    if len(box) != 6:
        raise ValueError(f"{what}: a box needs 6 bin indices, got {len(box)}")
    for axis, lo, hi in zip("krc", box[:3], box[3:]):
        if not 0 <= lo < hi <= bins:
            raise ValueError(f"{what} {tuple(box)}: need 0 <= {axis}0 < {axis}1 <= bins={bins}")


def _volume(box: Sequence[int]) -> int:
    return (box[3] - box[0]) * (box[4] - box[1]) * (box[5] - box[2])


def iou3d(a: Sequence[int], b: Sequence[int]) -> float:
    """Intersection over union of two half-open boxes; 0 when they do not overlap.

    Parameters
    ----------
    a, b
        Boxes ``(k0, r0, c0, k1, r1, c1)`` with ``k0 < k1`` etc.

    Returns
    -------
    float
        IoU in ``[0, 1]``.
    """
    inter = 1
    for lo_a, lo_b, hi_a, hi_b in zip(a[:3], b[:3], a[3:], b[3:]):
        side = min(hi_a, hi_b) - max(lo_a, lo_b)
        if side <= 0:
            return 0.0
        inter *= side
    return inter / (_volume(a) + _volume(b) - inter)


def vote_box(boxes: Sequence[BinBox], bins: int) -> BinBox | None:
    """The bounding box of the voxels that a strict majority of ``boxes`` cover.

    Only the union's bounding box is rasterized, so cost follows the boxes, not ``bins ** 3``.

    Parameters
    ----------
    boxes
        Half-open boxes in bin space.
    bins
        Bins per axis; every box must lie in ``[0, bins)``.

    Returns
    -------
    tuple of int or None
        The majority box, or ``None`` when no voxel is covered by more than half of the boxes
        (including when ``boxes`` is empty).

    Raises
    ------
    ValueError
        If a box is malformed or outside the grid.
    """
    for box in boxes:
        _check_box(box, bins, "vote_box")
    if not boxes:
        return None
    origin = np.min([box[:3] for box in boxes], axis=0)
    end = np.max([box[3:] for box in boxes], axis=0)
    counts = np.zeros(end - origin, dtype=np.int32)
    for box in boxes:
        k0, r0, c0 = np.asarray(box[:3]) - origin
        k1, r1, c1 = np.asarray(box[3:]) - origin
        counts[k0:k1, r0:r1, c0:c1] += 1
    kept = 2 * counts > len(boxes)
    if not kept.any():
        return None
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(kept.any(axis=other))
        lo.append(int(origin[axis] + present[0]))
        hi.append(int(origin[axis] + present[-1] + 1))
    return (lo[0], lo[1], lo[2], hi[0], hi[1], hi[2])


def _medoid(boxes: Sequence[BinBox]) -> BinBox:
    """The box with the highest mean IoU to the others (first on ties)."""
    if len(boxes) == 1:
        return boxes[0]
    scores = [sum(iou3d(a, b) for j, b in enumerate(boxes) if j != i) for i, a in enumerate(boxes)]
    return boxes[int(np.argmax(scores))]


def _cluster_box(boxes: Sequence[BinBox], bins: int) -> BinBox:
    voted = vote_box(boxes, bins)
    return voted if voted is not None else _medoid(boxes)


class _Cluster:
    """Candidates of one type from distinct rollouts, with their current majority box.

    ``slots`` maps a rollout to the index of its member in the shared ``candidates`` list.
    """

    def __init__(self, candidates: Sequence[Candidate], seed: int, bins: int) -> None:
        self.candidates = candidates
        self.bins = bins
        self.slots: dict[int, int] = {candidates[seed].rollout: seed}
        self.box: BinBox = candidates[seed].box

    def members(self) -> list[Candidate]:
        """The members in rollout order."""
        return [self.candidates[self.slots[r]] for r in sorted(self.slots)]

    def put(self, index: int) -> int | None:
        """Take candidate ``index`` into its rollout's slot; returns the index it displaced."""
        rollout = self.candidates[index].rollout
        displaced = self.slots.get(rollout)
        self.slots[rollout] = index
        self.box = _cluster_box([m.box for m in self.members()], self.bins)
        return displaced

    def prefers(self, index: int) -> bool:
        """Whether candidate ``index`` fits the other rollouts better than its rollout's member.

        Judged against the majority of the *other* rollouts so the holder's own vote does not
        decide; with no other rollouts the holder stays.
        """
        candidate = self.candidates[index]
        holder = self.candidates[self.slots[candidate.rollout]]
        others = [m.box for m in self.members() if m.rollout != candidate.rollout]
        if not others:
            return False
        reference = _cluster_box(others, self.bins)
        return iou3d(candidate.box, reference) > iou3d(holder.box, reference)


def _cluster_type(candidates: Sequence[Candidate], bins: int, match_iou: float) -> list[_Cluster]:
    """Greedy clustering of one type's candidates, taken in the given (lowest entropy) order.

    A candidate joins the cluster it overlaps most (IoU with its box >= ``match_iou``) whose
    slot for its rollout is free, or takes the slot if it fits the other rollouts better than
    the holder; otherwise it seeds a cluster. A displaced holder is placed again, never back
    into that cluster and never displacing in turn, so each candidate causes at most one
    displacement and the loop ends.
    """
    clusters: list[_Cluster] = []
    barred: dict[int, set[int]] = {}  # candidate index -> clusters it was displaced from
    queue: list[tuple[int, bool]] = [(n, True) for n in range(len(candidates))]
    while queue:
        n, may_displace = queue.pop(0)
        box, rollout = candidates[n].box, candidates[n].rollout
        overlaps = [(iou3d(box, cluster.box), i) for i, cluster in enumerate(clusters)]
        # Best overlap first; equal overlaps go to the older cluster.
        reachable = sorted(
            (-overlap, i)
            for overlap, i in overlaps
            if overlap >= match_iou and i not in barred.get(n, ())
        )
        for _, i in reachable:
            cluster = clusters[i]
            if rollout in cluster.slots and not (may_displace and cluster.prefers(n)):
                continue
            displaced = cluster.put(n)
            if displaced is not None:
                barred.setdefault(displaced, set()).add(i)
                # Placed next, before later candidates, so the order stays entropy-first.
                queue.insert(0, (displaced, False))
            break
        else:
            clusters.append(_Cluster(candidates, n, bins))
    return clusters


def _finding(cluster: _Cluster, n_rollouts: int, bins: int) -> ConsensusFinding:
    members = tuple(cluster.members())
    box = _cluster_box([m.box for m in members], bins)
    ious = [iou3d(m.box, box) for m in members]
    # Best match wins; among equals the more certain (lower entropy) sentence.
    best = max(range(len(members)), key=lambda i: (ious[i], -members[i].entropy, -i))
    agreement = len(members) / n_rollouts
    mean_iou = float(np.mean(ious))
    return ConsensusFinding(
        type=members[0].type,
        text=members[best].text,
        box=box,
        support=len(members),
        agreement=agreement,
        mean_iou=mean_iou,
        confidence=agreement * mean_iou,
        entropy=float(np.mean([m.entropy for m in members])),
        members=members,
    )


def consensus(
    candidates: Sequence[Candidate],
    n_rollouts: int,
    bins: int,
    *,
    min_agreement: float = 0.5,
    match_iou: float = 0.1,
) -> list[ConsensusFinding]:
    """Findings that more than ``min_agreement`` of the rollouts agree on, with majority boxes.

    Candidates are grouped by type and clustered across rollouts (one member per rollout per
    cluster, a rollout's repeats of one box counted once); clusters whose share of rollouts does
    not exceed ``min_agreement`` are dropped.

    Parameters
    ----------
    candidates
        Every finding of every rollout, rollouts numbered ``0 .. n_rollouts - 1``.
    n_rollouts
        How many rollouts were sampled, including those that stated nothing.
    bins
        Bins per axis of the box grid.
    min_agreement
        Share of rollouts a finding must strictly exceed (0.5: 3 of 5, 3 of 4).
    match_iou
        Least IoU with a cluster's current box for a candidate to join it.

    Returns
    -------
    list of ConsensusFinding
        Sorted by type, then confidence descending; the same for any order of ``candidates``.

    Raises
    ------
    ValueError
        If ``n_rollouts < 1``, a rollout index is out of range or a box is outside the grid.
    """
    if n_rollouts < 1:
        raise ValueError(f"n_rollouts must be at least 1, got {n_rollouts}")
    for c in candidates:
        if not 0 <= c.rollout < n_rollouts:
            raise ValueError(f"candidate rollout {c.rollout} outside 0..{n_rollouts - 1}")
        _check_box(c.box, bins, f"candidate of rollout {c.rollout}")
    # A total order on content makes the result independent of the input order.
    ordered = sorted(candidates, key=lambda c: (c.entropy, c.rollout, c.type, c.box, c.text))
    # A rollout that states one finding twice (same type, same box) said it once: the repeats of
    # several rollouts would otherwise make a second cluster, one finding reported twice (on
    # phantoms 8100-8159, 12 of the 24 false findings).
    first: dict[tuple, Candidate] = {}
    for c in ordered:
        first.setdefault((c.rollout, c.type, c.box), c)
    ordered = list(first.values())
    findings = []
    for kind in sorted({c.type for c in ordered}):
        of_type = [c for c in ordered if c.type == kind]
        for cluster in _cluster_type(of_type, bins, match_iou):
            if len(cluster.slots) / n_rollouts > min_agreement:
                findings.append(_finding(cluster, n_rollouts, bins))
    findings.sort(key=lambda f: (f.type, -f.confidence, f.box))
    return findings


def majority_answer(answers: Sequence[str]) -> tuple[str, float]:
    """The most common answer and its share; ties go to the answer given first.

    Answers are compared as given, so callers normalize them (case, whitespace) first.

    Raises
    ------
    ValueError
        If ``answers`` is empty.
    """
    if not answers:
        raise ValueError("majority_answer needs at least one answer")
    counts = Counter(answers)
    # max returns the first maximal item, and Counter keeps first-occurrence order.
    answer = max(counts, key=counts.__getitem__)
    return answer, counts[answer] / len(answers)


def token_entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy in nats of each probability row along the last axis; zero entries add nothing.

    Parameters
    ----------
    probs
        Probabilities, shape ``(..., vocab)``.

    Returns
    -------
    numpy.ndarray
        Shape ``probs.shape[:-1]``.

    Raises
    ------
    ValueError
        If any probability is negative.
    """
    p = np.asarray(probs, dtype=np.float64)
    if (p < 0).any():
        raise ValueError("token_entropy: probabilities must not be negative")
    logs = np.log(np.where(p > 0, p, 1.0))
    return -(p * logs).sum(axis=-1)


def needs_regrounding(finding: ConsensusFinding, threshold: float) -> bool:
    """Whether the finding's box tokens were uncertain enough (entropy > threshold) to re-look."""
    return finding.entropy > threshold
