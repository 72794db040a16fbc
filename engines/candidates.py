"""Finding candidates: the connected regions of the encoder's finding maps, shown to the decoder.

Each region of a topic's finding map above `THRESHOLD` becomes a box of coordinate bins; the
strongest `LIMIT` of them, in the order the answers list findings, go before the topic's prompt
as ``<box> k0 r0 c0 k1 r1 c1`` tokens. The decoder then reads a finding's place off the prompt
and copies its box instead of regressing six coordinates from 512 visual tokens, and it still
decides from the image which candidates are findings (most are not: the heart always lights
up, and a vessel can look like a nodule).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from engines.preprocess import BINS
from engines.tokenizer import Tokenizer

LIMIT = 3  # phantoms have at most three findings per topic
THRESHOLD = 0.5


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


def with_candidates(prompt: torch.Tensor, finding_logits: torch.Tensor, rows: torch.Tensor, topic: torch.Tensor,
                    tokenizer: Tokenizer) -> torch.Tensor:
    """Put each prompt's candidate boxes before it: [B, 7 * LIMIT + P], 0 (padding) where fewer.

    Parameters
    ----------
    prompt:
        [B, P] left-padded prompt ids.
    finding_logits:
        [V, topics, D, H, W] the encoded volumes' finding maps.
    rows, topic:
        [B] the volume each prompt reads and its report topic (-1: no topic, no candidates).
    """
    width = 7 * LIMIT
    ids = np.zeros((prompt.shape[0], width), dtype=np.int64)
    wanted = {(int(r), int(t)) for r, t in zip(rows.tolist(), topic.tolist()) if t >= 0}
    probability = torch.sigmoid(finding_logits.detach().float()).cpu().numpy()
    tokens = {}
    for row, t in wanted:
        boxes = candidate_boxes(probability[row, t])
        tokens[row, t] = [token for box in boxes for token in tokenizer.encode_box(box)]
    for i, (row, t) in enumerate(zip(rows.tolist(), topic.tolist())):
        found = tokens.get((row, t), [])
        ids[i, width - len(found):] = found
    return torch.cat([torch.from_numpy(ids).to(prompt.device), prompt], dim=1)
