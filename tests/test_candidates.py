"""Finding candidates: finding-map regions as boxes in the prompt."""

from __future__ import annotations

import numpy as np
import torch

from engines.candidates import (LIMIT, REACH, TOKENS, MapCandidate, candidate_boxes, map_candidates, map_peak, snap_box,
                                type_token, with_candidates)
from engines.preprocess import BINS, FINDING_GRID
from engines.prompts import MAP_TOPICS, MAP_TYPES
from engines.tokenizer import Tokenizer

LUNG_TYPES = ("nodule", "mass")


def _map_with_blobs(*blobs: tuple[tuple[slice, slice, slice], float]) -> np.ndarray:
    probability = np.full(FINDING_GRID, 0.1, dtype=np.float32)
    for where, value in blobs:
        probability[where] = value
    return probability


def test_each_region_becomes_a_covering_box_in_answer_order():
    probability = _map_with_blobs(((slice(20, 23), slice(10, 14), slice(40, 45)), 0.9),
                                  ((slice(4, 6), slice(30, 33), slice(8, 10)), 0.7))
    scale = [BINS // n for n in FINDING_GRID]
    assert [c.box for c in candidate_boxes(probability[None], ("nodule",))] == [
        (4 * scale[0], 30 * scale[1], 8 * scale[2], 6 * scale[0], 33 * scale[1], 10 * scale[2]),
        (20 * scale[0], 10 * scale[1], 40 * scale[2], 23 * scale[0], 14 * scale[1], 45 * scale[2]),
    ]


def test_a_topics_maps_merge_and_each_region_takes_the_type_that_fills_it():
    small = (slice(20, 22), slice(10, 12), slice(40, 42))
    large = (slice(4, 9), slice(30, 38), slice(8, 16))
    nodule = _map_with_blobs((small, 0.9), (large, 0.6))
    mass = _map_with_blobs((small, 0.3), (large, 0.95))
    found = candidate_boxes(np.stack([nodule, mass]), LUNG_TYPES)
    assert [c.type for c in found] == ["mass", "nodule"]  # sorted by start corner: the large region first
    # One region where both maps fire, not two boxes for the same place; the nodule map peaks
    # higher at a corner, but the mass map fills the region.
    corner = (slice(4, 5), slice(30, 31), slice(8, 9))
    nodule = _map_with_blobs((large, 0.3), (corner, 0.99))
    both = candidate_boxes(np.stack([nodule, _map_with_blobs((large, 0.9))]), LUNG_TYPES)
    assert len(both) == 1 and both[0].type == "mass"


def test_only_the_strongest_regions_above_the_threshold_are_kept():
    blobs = [((slice(2 + 6 * i, 4 + 6 * i), slice(5, 8), slice(5, 8)), 0.55 + 0.1 * i) for i in range(LIMIT + 1)]
    probability = _map_with_blobs(*blobs, ((slice(28, 30), slice(50, 52), slice(50, 52)), 0.45))
    boxes = candidate_boxes(probability[None], ("nodule",))
    assert len(boxes) == LIMIT
    weakest_start = 2 * BINS // FINDING_GRID[0]
    assert all(c.box[0] != weakest_start for c in boxes)
    assert candidate_boxes(np.zeros((1, *FINDING_GRID), dtype=np.float32), ("nodule",)) == []


def test_candidates_go_before_each_prompt_of_a_topic_and_none_for_a_question():
    tokenizer = Tokenizer()
    probability = _map_with_blobs(((slice(10, 12), slice(20, 24), slice(30, 33)), 0.9))
    logits = torch.full((2, len(MAP_TYPES), *FINDING_GRID), -5.0)
    liver = MAP_TYPES.index("hypodense lesion")
    assert MAP_TOPICS[liver] == 3
    logits[1, liver] = torch.logit(torch.from_numpy(probability))
    prompts = [tokenizer.topic_prompt("liver"), tokenizer.topic_prompt("lungs"), tokenizer.question_prompt("Is there a pleural effusion?")]
    longest = max(map(len, prompts))
    prompt = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    boxes = map_candidates(logits, rows=torch.tensor([1, 1, 1]), topic=torch.tensor([3, 0, -1]))
    assert boxes == [candidate_boxes(probability[None], ("hypodense lesion",)), [], []]
    out = with_candidates(prompt, boxes, tokenizer)
    width = TOKENS * LIMIT
    assert out.shape == (3, width + longest)
    assert torch.equal(out[:, width:], prompt)
    assert out[0, :width].tolist() == [0] * (width - TOKENS) + tokenizer.encode_box(boxes[0][0].box) + [tokenizer.index["hypodense"]]
    assert not out[1, :width].any() and not out[2, :width].any()


def test_every_finding_type_has_a_word_the_reports_use():
    tokenizer = Tokenizer()
    words = {tokenizer.vocab[type_token(kind, tokenizer)] for kind in MAP_TYPES}
    assert len(words) == len(MAP_TYPES) and "<unk>" not in words


def test_a_decoded_box_snaps_to_the_region_it_points_at():
    boxes = [(10, 10, 10, 20, 20, 20), (30, 30, 30, 34, 34, 34)]
    regions = [MapCandidate(box, "nodule") for box in boxes]
    assert REACH == 2.0  # the cases below sit on either side of it
    # Centre (12, 13, 22): 0.3, 0.2 and 0.7 of the first region's size from its centre.
    assert snap_box((11, 12, 21, 13, 14, 23), regions) == boxes[0]
    # Centre 39 on every axis: 1.75 sizes from the small region's centre, 2.4 from the large one's.
    assert snap_box((38, 38, 38, 40, 40, 40), regions) == boxes[1]
    far = (45, 45, 45, 46, 46, 46)  # 3.4 and 3.05 sizes away
    assert snap_box(far, regions) == far and snap_box(far, []) == far


def test_map_peak_reads_the_types_map_over_every_cell_the_box_touches():
    probability = np.zeros((len(MAP_TYPES), *FINDING_GRID), dtype=np.float32)
    scale = [BINS // n for n in FINDING_GRID]
    nodule = MAP_TYPES.index("nodule")
    probability[nodule, 10, 20, 30] = 0.9
    probability[MAP_TYPES.index("mass"), 10, 20, 30] = 0.4
    # A box thinner than a cell, inside cell (10, 20, 30): that cell still counts.
    inside = (10 * scale[0], 20 * scale[1], 30 * scale[2], 10 * scale[0] + 1, 20 * scale[1] + 1, 30 * scale[2] + 1)
    assert map_peak(probability, "nodule", inside) == np.float32(0.9)
    assert map_peak(probability, "mass", inside) == np.float32(0.4)
    # A box that ends where the cell starts does not touch it.
    before = (0, 0, 0, 10 * scale[0], BINS, BINS)
    assert map_peak(probability, "nodule", before) == 0.0
    assert map_peak(probability, "lesion", inside) == 0.0  # no map for a type the reports do not name
