"""Finding candidates: finding-map regions as boxes in the prompt."""

from __future__ import annotations

import numpy as np
import torch

from engines.candidates import LIMIT, REACH, candidate_boxes, map_candidates, snap_box, with_candidates
from engines.preprocess import BINS, FINDING_GRID
from engines.tokenizer import Tokenizer


def _map_with_blobs(*blobs: tuple[tuple[slice, slice, slice], float]) -> np.ndarray:
    probability = np.full(FINDING_GRID, 0.1, dtype=np.float32)
    for where, value in blobs:
        probability[where] = value
    return probability


def test_each_region_becomes_a_covering_box_in_answer_order():
    probability = _map_with_blobs(((slice(20, 23), slice(10, 14), slice(40, 45)), 0.9),
                                  ((slice(4, 6), slice(30, 33), slice(8, 10)), 0.7))
    scale = [BINS // n for n in FINDING_GRID]
    assert candidate_boxes(probability) == [
        (4 * scale[0], 30 * scale[1], 8 * scale[2], 6 * scale[0], 33 * scale[1], 10 * scale[2]),
        (20 * scale[0], 10 * scale[1], 40 * scale[2], 23 * scale[0], 14 * scale[1], 45 * scale[2]),
    ]


def test_only_the_strongest_regions_above_the_threshold_are_kept():
    blobs = [((slice(2 + 6 * i, 4 + 6 * i), slice(5, 8), slice(5, 8)), 0.55 + 0.1 * i) for i in range(LIMIT + 1)]
    probability = _map_with_blobs(*blobs, ((slice(28, 30), slice(50, 52), slice(50, 52)), 0.45))
    boxes = candidate_boxes(probability)
    assert len(boxes) == LIMIT
    weakest_start = 2 * BINS // FINDING_GRID[0]
    assert all(box[0] != weakest_start for box in boxes)
    assert candidate_boxes(np.zeros(FINDING_GRID, dtype=np.float32)) == []


def test_candidates_go_before_each_prompt_of_a_topic_and_none_for_a_question():
    tokenizer = Tokenizer()
    probability = _map_with_blobs(((slice(10, 12), slice(20, 24), slice(30, 33)), 0.9))
    logits = torch.full((2, 5, *FINDING_GRID), -5.0)
    logits[1, 3] = torch.logit(torch.from_numpy(probability))
    prompts = [tokenizer.topic_prompt("liver"), tokenizer.topic_prompt("lungs"), tokenizer.question_prompt("Is there a pleural effusion?")]
    longest = max(map(len, prompts))
    prompt = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    boxes = map_candidates(logits, rows=torch.tensor([1, 1, 1]), topic=torch.tensor([3, 0, -1]))
    assert boxes == [candidate_boxes(probability), [], []]
    out = with_candidates(prompt, boxes, tokenizer)
    width = 7 * LIMIT
    assert out.shape == (3, width + longest)
    assert torch.equal(out[:, width:], prompt)
    assert out[0, :width].tolist() == [0] * (width - 7) + tokenizer.encode_box(boxes[0][0])
    assert not out[1, :width].any() and not out[2, :width].any()


def test_a_decoded_box_snaps_to_the_region_it_points_at():
    regions = [(10, 10, 10, 20, 20, 20), (30, 30, 30, 34, 34, 34)]
    assert REACH == 2.0  # the cases below sit on either side of it
    # Centre (12, 13, 22): 0.3, 0.2 and 0.7 of the first region's size from its centre.
    assert snap_box((11, 12, 21, 13, 14, 23), regions) == regions[0]
    # Centre 39 on every axis: 1.75 sizes from the small region's centre, 2.4 from the large one's.
    assert snap_box((38, 38, 38, 40, 40, 40), regions) == regions[1]
    far = (45, 45, 45, 46, 46, 46)  # 3.4 and 3.05 sizes away
    assert snap_box(far, regions) == far and snap_box(far, []) == far
