"""Finding candidates: the connected regions of the encoder's finding maps, shown to the decoder.

Each region of a topic's finding map above `THRESHOLD` becomes a box of coordinate bins; the
strongest `LIMIT` of them, in the order the answers list findings, go before the topic's prompt
as ``<box> k0 r0 c0 k1 r1 c1`` tokens. The decoder can then read a finding's place off the
prompt rather than work out six coordinates from 512 visual tokens; it still decides from the
image which candidates are findings (most are not: the heart always lights up, and a vessel can
look like a nodule). At inference each decoded box is snapped to the region it points at
(`snap_box`).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from engines.preprocess import BINS
from engines.tokenizer import Tokenizer

LIMIT = 3  # phantoms have at most three findings per topic
THRESHOLD = 0.5
# How far (in region sizes, centre to centre, per axis) a decoded box may point. On phantoms
# 8100-8159 consensus F1 was 0.08 at 1, 0.19 at 2 and 0.20 at 3.
REACH = 2.0


def candidate_boxes(probability: np.ndarray, limit: int = LIMIT, threshold: float = THRESHOLD) -> list[tuple[int, ...]]:
    """The half-open bin boxes of the ``limit`` strongest regions of one finding map [D, H, W],
    sorted as answers are (by start corner)."""
    labels, count = ndimage.label(probability > threshold)
    if count == 0:
        return []
    peaks = np.asarray(ndimage.maximum(probability, labels, np.arange(1, count + 1)))
    slices = ndimage.find_objects(labels)
    shape = probability.shape
    boxes = []
    for index in np.argsort(-peaks, kind="stable")[:limit]:
        s = slices[index]
        boxes.append(tuple(s[a].start * BINS // shape[a] for a in range(3))
                     + tuple(-(-s[a].stop * BINS // shape[a]) for a in range(3)))
    return sorted(boxes)


def map_candidates(finding_logits: torch.Tensor, rows: torch.Tensor, topic: torch.Tensor) -> list[list[tuple[int, ...]]]:
    """Per prompt, the candidate boxes of its topic's finding map (none for topic -1).

    ``finding_logits`` [V, topics, D, H, W] are the encoded volumes' maps; ``rows`` and ``topic``
    [B] give the volume each prompt reads and its report topic.
    """
    pairs = list(zip(rows.tolist(), topic.tolist()))
    probability = torch.sigmoid(finding_logits.detach().float()).cpu().numpy()
    boxes = {pair: candidate_boxes(probability[pair]) for pair in set(pairs) if pair[1] >= 0}
    return [boxes.get(pair, []) for pair in pairs]


def with_candidates(prompt: torch.Tensor, boxes: list[list[tuple[int, ...]]], tokenizer: Tokenizer) -> torch.Tensor:
    """Put each prompt's candidate boxes (`map_candidates`) before it: [B, 7 * LIMIT + P], 0 (padding) where fewer."""
    width = 7 * LIMIT
    ids = np.zeros((prompt.shape[0], width), dtype=np.int64)
    for i, found in enumerate(boxes):
        tokens = [token for box in found for token in tokenizer.encode_box(box)]
        ids[i, width - len(tokens):] = tokens
    return torch.cat([torch.from_numpy(ids).to(prompt.device), prompt], dim=1)


def snap_box(box: tuple[int, ...], candidates: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The candidate region a decoded box points at, or the box itself where it points at none.

    A box points at a region when its centre is at most `REACH` region sizes from the region's
    centre along every axis; of several, the nearest relative to size wins. The decoder says what a
    finding is and roughly where (a few bins off); the finding map's region says where it ends.
    Rollouts that mean the same region then give the same box, which consensus rewards.
    """
    def distance(region: tuple[int, ...]) -> float:
        return max(abs(box[a] + box[a + 3] - region[a] - region[a + 3]) / 2 / (region[a + 3] - region[a])
                   for a in range(3))

    nearest = min(candidates, key=distance, default=None)
    return nearest if nearest is not None and distance(nearest) <= REACH else box
