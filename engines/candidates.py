"""Finding candidates: the connected regions of the encoder's finding maps, shown to the decoder.

A topic's maps (one per finding type it has) are merged by taking their highest probability;
each region of that above `THRESHOLD` becomes a box of coordinate bins, typed by the map with
the highest mean inside it. The strongest `LIMIT` regions, in the order the answers list findings,
go before the topic's prompt as ``<box> k0 r0 c0 k1 r1 c1 type`` tokens (``type`` the first word
of the type's name, `type_token`). The decoder can then read a finding's place and likely kind off the prompt
rather than work them out from 512 visual tokens, each far larger than a small lesion; it still
decides from the image which candidates are findings (most are not: the heart always lights up,
and a vessel can look like a nodule). At inference each decoded box is snapped to the region it
points at (`snap_box`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from engines.preprocess import BINS
from engines.prompts import MAP_TOPICS, MAP_TYPES
from engines.tokenizer import Tokenizer

LIMIT = 3  # phantoms have at most three findings per topic
THRESHOLD = 0.5
# How far (in region sizes, centre to centre, per axis) a decoded box may point. On phantoms
# 8100-8159 consensus F1 was 0.08 at 1, 0.19 at 2 and 0.20 at 3.
REACH = 2.0
TOKENS = 8  # per candidate: <box>, six bins, the type's word


@dataclass(frozen=True)
class MapCandidate:
    """One finding-map region: its half-open bin box and the finding type whose map fills it most."""

    box: tuple[int, ...]
    type: str


def candidate_boxes(probability: np.ndarray, types: tuple[str, ...], limit: int = LIMIT,
                    threshold: float = THRESHOLD) -> list[MapCandidate]:
    """The ``limit`` strongest regions of one topic's finding maps [types, D, H, W], sorted as
    answers are (by start corner)."""
    merged = probability.max(0)
    labels, count = ndimage.label(merged > threshold)
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    peaks = np.asarray(ndimage.maximum(merged, labels, index))
    # Typed by the map with the highest mean over the region: several maps can saturate at its peak
    # (a nodule map fires inside a mass too), but only the right one fills it.
    mean_per_type = np.stack([ndimage.mean(p, labels, index) for p in probability])  # [types, count]
    slices = ndimage.find_objects(labels)
    shape = merged.shape
    found = []
    for i in np.argsort(-peaks, kind="stable")[:limit]:
        s = slices[i]
        box = (tuple(s[a].start * BINS // shape[a] for a in range(3))
               + tuple(-(-s[a].stop * BINS // shape[a]) for a in range(3)))
        found.append(MapCandidate(box, types[int(np.argmax(mean_per_type[:, i]))]))
    return sorted(found, key=lambda c: c.box)


def map_candidates(finding_logits: torch.Tensor, rows: torch.Tensor, topic: torch.Tensor) -> list[list[MapCandidate]]:
    """Per prompt, the candidates of its topic's finding maps (none for topic -1).

    ``finding_logits`` [V, finding types, D, H, W] are the encoded volumes' maps (`MAP_TYPES`);
    ``rows`` and ``topic`` [B] give the volume each prompt reads and its report topic.
    """
    pairs = list(zip(rows.tolist(), topic.tolist()))
    probability = torch.sigmoid(finding_logits.detach().float()).cpu().numpy()
    maps = {t: [i for i, owner in enumerate(MAP_TOPICS) if owner == t] for _, t in pairs}
    found = {(v, t): candidate_boxes(probability[v][maps[t]], tuple(MAP_TYPES[i] for i in maps[t]))
             for v, t in set(pairs) if t >= 0}
    return [found.get(pair, []) for pair in pairs]


def with_candidates(prompt: torch.Tensor, found: list[list[MapCandidate]], tokenizer: Tokenizer) -> torch.Tensor:
    """Put each prompt's candidates (`map_candidates`) before it: [B, TOKENS * LIMIT + P], 0 (padding) where fewer."""
    width = TOKENS * LIMIT
    ids = np.zeros((prompt.shape[0], width), dtype=np.int64)
    for i, candidates in enumerate(found):
        tokens = [token for c in candidates for token in (*tokenizer.encode_box(c.box), type_token(c.type, tokenizer))]
        ids[i, width - len(tokens):] = tokens
    return torch.cat([torch.from_numpy(ids).to(prompt.device), prompt], dim=1)


def type_token(kind: str, tokenizer: Tokenizer) -> int:
    """The token naming a finding type: its first word as the reports write it ("Cardiomegaly (...")."""
    word = kind.split()[0]
    return tokenizer.index[word] if word in tokenizer.index else tokenizer.index[word.capitalize()]


def snap_box(box: tuple[int, ...], candidates: list[MapCandidate]) -> tuple[int, ...]:
    """The candidate region a decoded box points at, or the box itself where it points at none.

    A box points at a region when its centre is at most `REACH` region sizes from the region's
    centre along every axis; of several, the nearest relative to size wins. The decoder says what a
    finding is and roughly where (a few bins off); the finding map's region says where it ends.
    Rollouts that mean the same region then give the same box, which consensus rewards.
    """
    def distance(region: tuple[int, ...]) -> float:
        return max(abs(box[a] + box[a + 3] - region[a] - region[a + 3]) / 2 / (region[a + 3] - region[a])
                   for a in range(3))

    nearest = min((c.box for c in candidates), key=distance, default=None)
    return nearest if nearest is not None and distance(nearest) <= REACH else box


def map_peak(probability: np.ndarray, kind: str, box: tuple[int, ...]) -> float:
    """The highest probability of ``kind``'s finding map [`MAP_TYPES`, D, H, W] inside a half-open
    bin box: whether the encoder's own detector sees that finding there (0 for a type without a map)."""
    if kind not in MAP_TYPES:
        return 0.0
    grid = probability.shape[1:]
    # Every cell the box touches, at least one per axis.
    cells = tuple(slice(box[a] * grid[a] // BINS, max(box[a] * grid[a] // BINS + 1, -(-box[a + 3] * grid[a] // BINS)))
                  for a in range(3))
    return float(probability[MAP_TYPES.index(kind)][cells].max())
