"""Train the demo model on phantoms generated on the fly (`readout train`).

Settings sit at the top. Progress (0 → 1, by steps or by the time limit, whichever is further)
drives two stages, each with its own warm-up and cosine learning rate. First the encoder's
finding maps alone ("detect"). Then the encoder is frozen and the decoder learns to read it,
through Photon's phases: no pruning, then soft (visual values scaled by p), then hard dropping
with the surrogate gradient (a share of those steps unpruned, so the model still reads every
token); the retention band from the soft phase on, the robustness regularizer (corrupted volumes
→ maximal answer entropy) from the soft phase, the flip regularizer late in the hard phase.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from engines.candidates import map_candidates, with_candidates
from engines.checkpoint import load_checkpoint, save_checkpoint
from engines.model import Encoded, ModelConfig, ReadoutVLM
from engines.phantom import NORMAL_SENTENCES, TOPICS, render_phantom
from engines.preprocess import BINS, FINDING_GRID, box_to_bins, crop_extent, prepare
from engines.prompts import FOCAL_TYPES, MAP_TYPES, question_region, region_topic, topic_region
from engines.results import StudyResult
from engines.scheduler import kept_ratio, retention_band_loss
from engines.tokenizer import MAX_ANSWER_TOKENS, Tokenizer

# --- settings ---------------------------------------------------------------------------------
TRAIN_SEED_BASE = 10_000_000  # training phantoms: seeds from here up; evaluation uses 9001..., validation 8000...
VALIDATION_SEEDS = range(8000, 8012)
# A decoder step's examples; the rest of each batch is replayed from recent volumes. A step's time
# grows with its volumes (1.9 s at 6, 3.7 s at 12, bf16 on the 2-core CPU): half the batch buys
# twice the updates.
VOLUMES_PER_STEP = 6
# The maps learn from smaller batches, so they get more updates in the same time: at 12 volumes a
# step (about 10.5 s) a 105-minute run gave them 243, and the small lesions' maps (liver, bone)
# were the weakest. One new phantom a step is what the worker renders in that time.
MAP_VOLUMES_PER_STEP = 6
NEW_VOLUMES_PER_MAP_STEP = 1
# The worker needs 1.5-2 s of one core to render a phantom, about a decoder step's time, and the
# cores are shared: the decoder takes a new phantom every other step (each still seen about 12 times).
DECODER_STEPS_PER_NEW_VOLUME = 2
REPLAY = 256
LEARNING_RATE = 1e-3
# Photon's threshold MLP starts saturated (theta ~ 0.006); it needs a larger step to move.
THRESHOLD_LR_SCALE = 20.0
# The finding maps' read-outs of the input (`finding_fine`, `finding_lesions`) start at zero and are
# small: the shipped weights' lesion read-out learnt in 146 steps at 1e-2, alone. At 1e-3 it would
# need most of a two-hour run.
READ_OUT_LR_SCALE = 10.0
READ_OUTS = ("finding_fine.", "finding_lesions.")
WARMUP = 0.03  # of each stage
# First the encoder learns to see findings on its own (its finding maps), then, frozen, the decoder
# learns to read them. A joint step spends most of its time on the encoder (forward and backward over
# 19 volumes); frozen, each phantom is encoded once and replayed from that cache. In 105 minutes from
# fresh weights the decoder got 536 steps of about 6 s against 318 joint ones of 14 s, and F1 rose
# from 0.15 to 0.58 (bench/RESULTS.md).
DETECT_UNTIL = 0.45
# Photon's phases, as shares of the decoder's stage. Under the linear sparsity term, hard dropping from
# 0.55 left 63% of the tokens kept after a 105-minute run; the hinge (below) brings the kept share under
# its target within some 50 hard steps, so the hard phase starts late and the decoder reads more steps
# unpruned or softly pruned first.
SOFT_FROM, HARD_FROM, FLIP_FROM = 0.3, 0.55, 0.75
# Steps of the soft and hard phases that run without pruning, so the model still reads every token
# well: scheduling off must stay a fair baseline, not a mode the model has forgotten.
UNPRUNED_SHARE = 0.4
NORMAL_SHARE = 0.15  # extra all-normal phantoms, so "normal" is well learnt
# Volumes that also yield a zoomed crop example, and how often a crop centres on a finding of each
# focal type relative to a nodule or mass. The crops teach the second, zoomed look. With the fourth
# run's weights (bench/RESULTS.md) the maps saw 8 of 9 bone lesions >= 8 mm on phantoms 8100-8139,
# the full-volume read stated one, and the looks rescued only 2 of the rest. Drawn uniformly from
# 60% of the volumes, 12% of the phantoms gave a crop centred on a bone lesion; these settings, 21%.
CROP_SHARE = 0.75
CROP_TYPE_WEIGHT = {"lytic lesion": 5.0, "sclerotic lesion": 5.0, "hypodense lesion": 1.5}
CORRUPT_SHARE = 0.15
ROBUST_WEIGHT, FLIP_WEIGHT = 0.05, 0.1
# In the hard phase, a hinge on each prompt's kept share above KEEP_TARGET. A linear term (0.05 x the
# mean kept share) left the fifth run keeping 67% at inference: the batch mean it pushed down fell on
# corrupted volumes and crops, already far below, while full clean volumes stayed near 0.68.
KEEP_TARGET, OVER_TARGET_WEIGHT = 0.45, 0.5
# The model's finding head learns, per cell of its finding grid and finding type, whether a finding
# of that type lies there (from the phantom's finding map); its probabilities guide the decoder.
FINDING_MAP_WEIGHT = 1.0
POSITIVE_WEIGHT_CAP = 200.0
CELL_FILL = 0.25  # share of a finding-grid cell a finding must fill to mark it
# Soft Dice per volume and finding type beside the voxel-wise loss: a small lesion's few cells weigh as
# much as an effusion's hundreds, so small findings are learnt too.
DICE_WEIGHT = 1.0
# Whether a volume holds a finding of a type at all, read off its map's highest cell. Rarity-weighted
# cells make a map fire wherever its finding could be (every apex, every heart); this term makes
# that highest cell answer for the whole volume, so a candidate (`candidates.THRESHOLD`) means "found".
PRESENCE_WEIGHT = 1.0
# The same for each finding: its own highest cell learns that it is there. The per-type term above
# is met by a map's strongest region alone (a large nodule, or a vessel), so a smaller nodule beside
# it went unseen: on phantoms 8100-8159 the maps of 826c80d peaked at 0.04 or less on all 9 nodules
# of 8-15 mm, and found 12 of the 15 of 17-29 mm.
FINDING_PRESENCE_WEIGHT = 1.0
# Coordinate tokens are few among the report's words but carry the grounding: weigh them up.
COORDINATE_WEIGHT = 3.0


@dataclass
class Sequence:
    volume: int  # index into the example's volumes
    region: str
    prompt: list[int]
    answer: list[int]


@dataclass
class Example:
    """One phantom's training material: its volume(s) and the sequences asked of them."""

    images: list[np.ndarray]  # uint8 [CHANNELS, D, H, W]
    spacings: list[tuple[float, float, float]]
    regions: list[dict[str, np.ndarray]]
    sequences: list[Sequence]
    corrupted: list[bool]
    finding_maps: list[np.ndarray]  # per volume, uint8 [MAP_TYPES, *FINDING_GRID]: the finding's number where one lies
    # From the decoder's stage on: its volumes through the frozen encoder, and its first volume corrupted.
    encoded: Encoded | None = None
    encoded_corrupted: Encoded | None = None


def finding_maps(phantom, extent) -> np.ndarray:
    """Per finding type (`MAP_TYPES`), the cells of `FINDING_GRID` over ``extent`` that a finding of the type fills,
    each marked with the finding's number (its label in the phantom's finding map, from 1; 0: no finding).

    A cell counts when the finding fills at least `CELL_FILL` of it; every finding inside the
    extent marks at least its fullest cell, so none is lost however small (a 5-mm bone lesion).
    """
    map_of = [MAP_TYPES.index(f.type) for t in phantom.truth.topics for f in t.findings]  # finding n: map_of[n - 1]
    out = np.zeros((len(MAP_TYPES), *FINDING_GRID), dtype=np.uint8)
    k, r, c = np.nonzero(phantom.finding_map)
    labels = phantom.finding_map[k, r, c]
    cell, inside, cell_voxels = [], np.ones(len(k), bool), 1.0
    for axis, index in enumerate((k, r, c)):
        lo, hi, n = extent[axis], extent[axis + 3], FINDING_GRID[axis]
        i = np.floor((index + 0.5 - lo) / (hi - lo) * n).astype(np.intp)
        inside &= (i >= 0) & (i < n)
        cell.append(i)
        cell_voxels *= (hi - lo) / n
    flat = np.ravel_multi_index([i[inside] for i in cell], FINDING_GRID)
    labels = labels[inside]
    for label in np.unique(labels):
        counts = np.bincount(flat[labels == label], minlength=out[0].size)
        filled = counts / cell_voxels >= CELL_FILL
        filled[counts.argmax()] = True
        out[map_of[label - 1]].reshape(-1)[filled] = label
    return out


def _uint8(image: np.ndarray) -> np.ndarray:
    return np.round(image * 255).astype(np.uint8)


def topic_items(truth: StudyResult, topic: str, extent) -> list[tuple[str, tuple[int, ...] | None]]:
    """The answer for one topic: its findings in position order with boxes, or its normal sentence."""
    for result in truth.topics:
        if result.topic == topic:
            if result.normal or not result.findings:
                return [(result.text or NORMAL_SENTENCES[topic], None)]
            findings = sorted(result.findings, key=lambda f: f.box.voxel if f.box else ())
            return [(f.text, box_to_bins(f.box.voxel, extent) if f.box else None) for f in findings]
    return [(NORMAL_SENTENCES[topic], None)]


def make_example(seed: int, tokenizer: Tokenizer) -> Example:
    """Render phantom ``seed`` and build its sequences: 5 topics, 3 questions, maybe a crop."""
    rng = random.Random(seed)
    phantom = render_phantom(seed, normal=rng.random() < NORMAL_SHARE)
    spacing = (phantom.slice_spacing_mm, phantom.pixel_spacing_mm, phantom.pixel_spacing_mm)
    full = prepare(phantom.hu, spacing)
    truth = phantom.truth
    images, spacings, regions, corrupted = [full.image], [full.grid_spacing_mm], [full.regions], [False]
    maps = [finding_maps(phantom, full.extent)]
    sequences = [
        Sequence(0, topic_region(t), tokenizer.topic_prompt(t), tokenizer.encode_answer(topic_items(truth, t, full.extent)))
        for t in TOPICS
    ]
    for answer in truth.answers:
        box = box_to_bins(answer.box.voxel, full.extent) if answer.box else None
        sequences.append(Sequence(0, question_region(answer.question), tokenizer.question_prompt(answer.question),
                                  tokenizer.encode_answer([(answer.answer, box)])))

    focal = [(t.topic, f) for t in truth.topics for f in t.findings if f.type in FOCAL_TYPES and f.box]
    if rng.random() < CROP_SHARE:
        crop = _crop_example(phantom.hu, spacing, truth, focal, rng, tokenizer)
        if crop is not None:
            inp, seq = crop
            maps.append(finding_maps(phantom, inp.extent))
            images.append(inp.image)
            spacings.append(inp.grid_spacing_mm)
            regions.append(inp.regions)
            corrupted.append(False)
            sequences.append(Sequence(1, seq.region, seq.prompt, seq.answer))
    return Example([_uint8(i) for i in images], spacings, regions, sequences, corrupted, maps)


def _crop_example(hu, spacing, truth: StudyResult, focal, rng: random.Random, tokenizer: Tokenizer):
    """A zoomed crop around a focal finding (or, sometimes, around nothing) with its topic's answer."""
    shape = hu.shape
    if focal and rng.random() < 0.8:
        topic, finding = rng.choices(focal, weights=[CROP_TYPE_WEIGHT.get(f.type, 1.0) for _, f in focal])[0]
        extent = list(crop_extent(finding.box.voxel, spacing, shape, margin_mm=rng.uniform(6, 20), min_size_mm=rng.uniform(40, 64)))
        for axis in range(3):  # jitter, keeping the finding's centre inside
            size = extent[axis + 3] - extent[axis]
            shift = rng.uniform(-0.2, 0.2) * size
            extent[axis] += shift
            extent[axis + 3] += shift
    else:
        topic = rng.choice(TOPICS)
        size = [48.0 / s for s in spacing]
        centre = [rng.uniform(0.2, 0.8) * n for n in shape]
        extent = [centre[a] - size[a] / 2 for a in range(3)] + [centre[a] + size[a] / 2 for a in range(3)]
    inside = []
    for result in truth.topics:
        if result.topic != topic:
            continue
        for f in sorted(result.findings, key=lambda f: f.box.voxel if f.box else ()):
            if f.box is None:
                continue
            centre = [(f.box.voxel[a] + f.box.voxel[a + 3]) / 2 for a in range(3)]
            if all(extent[a] <= centre[a] < extent[a + 3] for a in range(3)):
                inside.append((f.text, box_to_bins(f.box.voxel, extent)))
    items = inside or [(NORMAL_SENTENCES[topic], None)]
    inp = prepare(hu, spacing, extent)
    return inp, Sequence(1, topic_region(topic), tokenizer.topic_prompt(topic), tokenizer.encode_answer(items))


class PhantomStream(IterableDataset):
    """Endless training examples; each worker renders its own disjoint range of seeds."""

    def __init__(self, tokenizer: Tokenizer, base: int = TRAIN_SEED_BASE) -> None:
        self.tokenizer = tokenizer
        self.base = base

    def __iter__(self) -> Iterator[Example]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        torch.set_num_threads(1)
        seed = self.base + worker * 1_000_000
        while True:
            try:
                yield make_example(seed, self.tokenizer)
            except RuntimeError:  # the phantom generator found no room for a finding: next seed
                pass
            seed += 1


def corrupt(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """One of Photon's corruptions: shuffled slices (and rows), few slices or rows kept, noise, zeros."""
    image = image.copy()
    kind = rng.random()
    d, h = image.shape[1], image.shape[2]
    if kind < 0.16:
        image = image[:, np.random.permutation(d)]
    elif kind < 0.32:
        image = image[:, np.random.permutation(d)][:, :, np.random.permutation(h)]
    elif kind < 0.48:
        image[:, np.random.rand(d) > 0.2] = 0
    elif kind < 0.64:
        image[:, :, np.random.rand(h) > 0.1] = 0
    elif kind < 0.8:
        image = np.random.randint(0, 256, image.shape, dtype=np.uint8)
    else:
        image[:] = 0
    return image


@dataclass
class Batch:
    image: torch.Tensor | None  # None when the volumes come encoded (`cached_encoding`)
    spacing: torch.Tensor
    sequence_volume: torch.Tensor
    region: torch.Tensor
    prompt: torch.Tensor
    answer: torch.Tensor  # [S, A], 0-padded
    corrupted: torch.Tensor  # [S] bool per sequence
    finding_maps: torch.Tensor  # [V, finding types, *FINDING_GRID] uint8: finding numbers (`finding_maps`)
    topic: torch.Tensor  # [S] report topic index of each sequence's region, -1 for any
    volume_corrupted: torch.Tensor  # [V]


def collate(examples: list[Example], device: torch.device, corrupt_share: float = 0.0, rng: random.Random | None = None,
            images: bool = True) -> Batch:
    """One batch of ``examples``; each one's first volume corrupted with chance ``corrupt_share``.

    ``images=False`` leaves the images out: the volumes come encoded (`cached_encoding`).
    """
    volumes, spacings, seq_volume, regions, prompts, answers, corrupted, maps = [], [], [], [], [], [], [], []
    for ex in examples:
        offset = len(spacings)
        maps += ex.finding_maps
        for image, spacing, region, broken in zip(ex.images, ex.spacings, ex.regions, ex.corrupted):
            broken = broken or (rng is not None and len(spacings) == offset and rng.random() < corrupt_share)
            if images:
                volumes.append(corrupt(image, rng) if broken and rng is not None else image)
            spacings.append(spacing)
            regions.append(region)
            corrupted.append(broken)
        for seq in ex.sequences:
            v = offset + seq.volume
            seq_volume.append(v)
            prompts.append(seq.prompt)
            answers.append(seq.answer[:MAX_ANSWER_TOKENS])
    regions_flat = [regions[v] for v in seq_volume]
    seq_regions = [r[name].reshape(-1) for r, name in zip(regions_flat, [s.region for ex in examples for s in ex.sequences])]
    longest_prompt = max(map(len, prompts))
    longest_answer = max(map(len, answers))
    prompt = torch.tensor([[0] * (longest_prompt - len(p)) + p for p in prompts])
    padded = torch.tensor([a + [0] * (longest_answer - len(a)) for a in answers])
    return Batch(
        image=_image_tensor(volumes, device) if images else None,
        spacing=torch.tensor(spacings, dtype=torch.float32, device=device),
        sequence_volume=torch.tensor(seq_volume, device=device),
        region=torch.from_numpy(np.stack(seq_regions)).float().to(device),
        prompt=prompt.to(device),
        answer=padded.to(device),
        corrupted=torch.tensor([corrupted[v] for v in seq_volume], device=device),
        finding_maps=torch.from_numpy(np.stack(maps)).to(device),
        volume_corrupted=torch.tensor(corrupted, device=device),
        topic=torch.tensor([region_topic(s.region) for ex in examples for s in ex.sequences], device=device),
    )


def _image_tensor(images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).to(device, non_blocking=True).float().div_(255)


@torch.no_grad()
def cached_encoding(model: ReadoutVLM, examples: list[Example], batch: Batch, rng: random.Random) -> Encoded:
    """The batch's volumes through the frozen encoder, each example encoded once and kept on it
    (its first volume also corrupted, once, for the batches that ask for that)."""
    device = batch.spacing.device
    tokens, logits, v = [], [], 0
    for ex in examples:
        if ex.encoded is None:
            ex.encoded = model.encode(_image_tensor(ex.images, device), torch.tensor(ex.spacings, device=device))
        if batch.volume_corrupted[v]:
            if ex.encoded_corrupted is None:
                ex.encoded_corrupted = model.encode(_image_tensor([corrupt(ex.images[0], rng)], device),
                                                    torch.tensor(ex.spacings[:1], device=device))
            tokens += [ex.encoded_corrupted.tokens, ex.encoded.tokens[1:]]
            logits += [ex.encoded_corrupted.finding_logits, ex.encoded.finding_logits[1:]]
        else:
            tokens.append(ex.encoded.tokens)
            logits.append(ex.encoded.finding_logits)
        v += len(ex.images)
    return Encoded(torch.cat(tokens), torch.cat(logits))


def _stage_progress(progress: float, detect_until: float) -> float:
    """Progress (0 → 1) within the current stage: the finding maps', then the decoder's."""
    return progress / detect_until if progress < detect_until else (progress - detect_until) / (1 - detect_until)


def _phase(progress: float, detect_until: float = DETECT_UNTIL) -> str:
    if progress < detect_until:
        return "detect"
    stage = _stage_progress(progress, detect_until)
    if stage < SOFT_FROM:
        return "off"
    return "soft" if stage < HARD_FROM else "hard"


def _learning_rate(stage_progress: float) -> float:
    if stage_progress < WARMUP:
        return LEARNING_RATE * stage_progress / WARMUP
    return LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * min(1.0, (stage_progress - WARMUP) / (1 - WARMUP))))


def _losses(model: ReadoutVLM, tokenizer: Tokenizer, batch: Batch, phase: str, flip: bool,
            encoded: Encoded | None = None) -> dict[str, torch.Tensor]:
    """The training losses of ``phase`` (`_phase`); ``detect`` trains the encoder's finding maps alone.

    With ``encoded`` (the volumes through a frozen encoder) only the decoder's losses.
    """
    losses = {}
    if encoded is None:
        encoded = model.encode(batch.image, batch.spacing)
        losses = _map_losses(encoded, batch)
    if phase == "detect":
        return losses
    # The candidates come from the model's own maps, as at inference: the decoder learns which to trust.
    boxes = map_candidates(encoded.finding_logits, batch.sequence_volume, batch.topic)
    prompt = with_candidates(batch.prompt, boxes, tokenizer)
    logits, prefix = model(encoded, batch.region, prompt, batch.answer, phase, rows=batch.sequence_volume,
                           topic=batch.topic)
    valid = batch.answer != 0
    clean = valid & ~batch.corrupted[:, None]
    ce = F.cross_entropy(logits.float().transpose(1, 2), batch.answer, reduction="none")
    weight = clean * torch.where(batch.answer >= model.config.vocab_size - BINS, COORDINATE_WEIGHT, 1.0)
    losses["ce"] = (ce * weight).sum() / weight.sum().clamp(min=1)
    with torch.no_grad():
        losses["accuracy"] = ((logits.argmax(-1) == batch.answer) & clean).sum() / clean.sum().clamp(min=1)
    broken = valid & batch.corrupted[:, None]
    if broken.any():
        logp = logits.float().log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        losses["robust"] = -ROBUST_WEIGHT * (entropy * broken).sum() / broken.sum()
    if prefix.p is not None:
        ratio = prefix.p.mean(-1) if phase == "soft" else kept_ratio(prefix.p, prefix.kept)
        losses["band"] = retention_band_loss(ratio)
        losses["kept"] = ratio.mean().detach()
        if phase == "hard":
            losses["sparsity"] = OVER_TARGET_WEIGHT * F.relu(ratio - KEEP_TARGET).mean()
    if flip:
        rows = torch.nonzero(~batch.corrupted).flatten()
        rows = rows[torch.randperm(len(rows), device=rows.device)[: max(2, len(rows) // 20)]]
        flipped, _ = model(encoded, batch.region[rows], prompt[rows], batch.answer[rows], "flip",
                           rows=batch.sequence_volume[rows], topic=batch.topic[rows])
        p_true = flipped.float().softmax(-1).gather(-1, batch.answer[rows][..., None]).squeeze(-1)
        mask = valid[rows]
        losses["flip"] = FLIP_WEIGHT * (-torch.log(1 - p_true + 1e-6) * mask).sum() / mask.sum()
    return losses


def _map_losses(encoded: Encoded, batch: Batch) -> dict[str, torch.Tensor]:
    """The finding maps' losses over the batch's uncorrupted volumes (none if every volume is corrupted)."""
    if batch.volume_corrupted.all():
        return {}
    logits_map = encoded.finding_logits[~batch.volume_corrupted].float()
    numbers = batch.finding_maps[~batch.volume_corrupted]
    target = (numbers > 0).float()
    # Findings cover few cells, a bone lesion's far fewer than an effusion's: weight each
    # type's positives by its own rarity, so that bone lesions are not ignored either.
    positives = target.sum((0, 2, 3, 4), keepdim=True)
    cells = target[:, :1].numel()
    pos_weight = ((cells - positives) / positives.clamp(min=1)).clamp(max=POSITIVE_WEIGHT_CAP)
    weight = torch.where(target > 0, pos_weight, 1.0)
    bce = (F.binary_cross_entropy_with_logits(logits_map, target, reduction="none") * weight).sum() / weight.sum()
    return {"finding_map": FINDING_MAP_WEIGHT * bce + DICE_WEIGHT * soft_dice_loss(logits_map, target),
            "presence": PRESENCE_WEIGHT * presence_loss(logits_map, target),
            "each_finding": FINDING_PRESENCE_WEIGHT * each_finding_loss(logits_map, numbers)}


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice, averaged over the (volume, type) maps that hold a finding; 0 if none does."""
    p = torch.sigmoid(logits).flatten(2)
    t = target.flatten(2)
    present = t.sum(-1) > 0
    if not present.any():
        return logits.sum() * 0
    dice = 2 * (p * t).sum(-1) / (p.sum(-1) + t.sum(-1)).clamp(min=1e-6)
    return 1 - dice[present].mean()


def presence_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of each (volume, type) map's highest cell against whether the volume holds that type."""
    return F.binary_cross_entropy_with_logits(logits.flatten(2).amax(-1), target.flatten(2).amax(-1))


def each_finding_loss(logits: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of each finding's highest cell against 1, averaged over findings (0 if none).

    ``numbers`` [V, types, ...] holds each cell's finding number (`finding_maps`; 0 for none).
    """
    flat, labels = logits.flatten(2), numbers.flatten(2).long()
    count = int(labels.max()) + 1
    if count == 1:
        return logits.sum() * 0
    peak = flat.new_full((*flat.shape[:2], count), -1e4).scatter_reduce(2, labels, flat, "amax")
    present = torch.zeros_like(peak, dtype=torch.bool).scatter_(2, labels, True)
    present[..., 0] = False
    return F.softplus(-peak[present]).mean()


def _parameter_groups(model: ReadoutVLM) -> list[dict]:
    """AdamW groups, each with its learning-rate ``scale``: the threshold MLP and the input read-outs
    learn faster (`THRESHOLD_LR_SCALE`, `READ_OUT_LR_SCALE`); matrices decay, other parameters do not."""
    groups = {key: {"params": [], "weight_decay": decay, "scale": scale} for key, decay, scale in (
        ("decay", 0.05, 1.0), ("other", 0.0, 1.0), ("threshold", 0.0, THRESHOLD_LR_SCALE),
        ("read_out", 0.0, READ_OUT_LR_SCALE), ("read_out_decay", 0.05, READ_OUT_LR_SCALE))}
    for name, parameter in model.named_parameters():
        if name.startswith("scheduler."):
            key = "threshold"
        elif name.startswith(READ_OUTS):
            key = "read_out_decay" if parameter.dim() >= 2 else "read_out"
        else:
            key = "decay" if parameter.dim() >= 2 else "other"
        groups[key]["params"].append(parameter)
    return [g for g in groups.values() if g["params"]]


def validation_examples(tokenizer: Tokenizer) -> list[Example]:
    return [make_example(seed, tokenizer) for seed in VALIDATION_SEEDS]


def train(out: Path, steps: int, device: str = "cpu", time_limit_s: float | None = None, workers: int | None = None,
          log: Callable[[str], None] = print, model_size: dict | None = None, init: Path | None = None,
          detect_share: float | None = None) -> dict:
    """Train a model; writes ``out/demo.safetensors``, ``out/demo.json`` and ``out/train_log.jsonl``.

    ``model_size`` overrides ModelConfig fields (e.g. a tiny model for tests). ``init`` starts from
    a saved checkpoint instead of fresh weights. ``detect_share`` is the share of the run that
    trains the finding maps alone: `DETECT_UNTIL` for fresh weights, none after ``init`` by default.
    """
    torch.manual_seed(0)
    rng = random.Random(0)
    tokenizer = Tokenizer()
    dev = torch.device(device)
    if init is None:
        model = ReadoutVLM(ModelConfig(vocab_size=len(tokenizer), **(model_size or {}))).to(dev)
    else:
        model, init_meta = load_checkpoint(init, device)
    detect_until = detect_share if detect_share is not None else DETECT_UNTIL if init is None else 0.0
    optimizer = torch.optim.AdamW(_parameter_groups(model), lr=LEARNING_RATE, betas=(0.9, 0.95))
    workers = max(1, (os.cpu_count() or 2) - 1) if workers is None else workers
    loader = iter(DataLoader(PhantomStream(tokenizer), batch_size=None, num_workers=workers, prefetch_factor=4,
                             persistent_workers=True))
    validation = validation_examples(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "train_log.jsonl").open("w")
    replay: deque[Example] = deque(maxlen=REPLAY)
    bfloat16 = _bfloat16_is_fast(dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bfloat16)
    started = time.time()
    seen = 0
    step = 0

    def facts() -> dict:
        """What the run has done so far and what it started from, for every checkpoint it writes."""
        done = {"steps": step, "volumes_rendered": seen, "wall_time_s": round(time.time() - started, 1),
                "device": _device_name(dev), "precision": "bfloat16 autocast" if bfloat16 else "float32",
                "machine": platform.platform(), "train_seeds_from": TRAIN_SEED_BASE,
                "validation_seeds": [VALIDATION_SEEDS.start, VALIDATION_SEEDS.stop - 1]}
        if init is not None:
            earlier = init_meta.get("training", {})
            done["started_from"] = {k: earlier.get(k) for k in ("steps", "wall_time_s", "device", "started_from")}
        return done

    while (progress := max(step / steps, (time.time() - started) / time_limit_s if time_limit_s else 0.0)) < 1.0:
        phase = _phase(progress, detect_until)
        frozen = phase != "detect"
        if frozen and next(model.stem.parameters()).requires_grad:
            for module in model.vision():
                module.requires_grad_(False)
        per_step = VOLUMES_PER_STEP if frozen else MAP_VOLUMES_PER_STEP
        if not replay:
            new = per_step
        elif frozen:
            new = int(step % DECODER_STEPS_PER_NEW_VOLUME == 0)
        else:
            new = NEW_VOLUMES_PER_MAP_STEP
        for _ in range(new):
            replay.append(next(loader))
            seen += 1
        examples = rng.sample(list(replay), min(per_step, len(replay)))
        if phase in ("soft", "hard") and rng.random() < UNPRUNED_SHARE:
            phase = "off"
        batch = collate(examples, dev, CORRUPT_SHARE if phase in ("soft", "hard") else 0.0, rng, images=not frozen)
        stage_progress = _stage_progress(progress, detect_until)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(stage_progress) * group["scale"]
        model.train()
        with autocast:
            encoded = cached_encoding(model, examples, batch, rng) if frozen else None
            losses = _losses(model, tokenizer, batch, phase, flip=frozen and stage_progress >= FLIP_FROM, encoded=encoded)
        total = sum(v for k, v in losses.items() if k not in ("accuracy", "kept"))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 25 == 0:
            record = {"step": step, "progress": round(progress, 4), "phase": phase, "volumes": seen,
                      "elapsed_s": round(time.time() - started, 1),
                      **{k: round(float(v.detach()), 4) for k, v in losses.items()}}
            if step % 100 == 0:
                record["validation"] = evaluate_loss(model, tokenizer, validation, dev, phase)
                save_checkpoint(model, out / "demo", {"partial": True, "progress": round(progress, 4),
                                                      "training": facts()})
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            log(json.dumps(record))
    done = facts()
    info = {"tokenizer": {"bins": tokenizer.bins, "size": len(tokenizer)},
            "training": {**done, "final_validation": evaluate_loss(model, tokenizer, validation, dev, "hard")}}
    (out / "MODEL_CARD.md").write_text(model_card(save_checkpoint(model, out / "demo", info)))
    return info


def model_card(info: dict, evaluation: str | None = None) -> str:
    """The model card shipped beside the weights, from the checkpoint's JSON (``config`` and all)."""
    t = info["training"]
    lines = [
        "# Readout demo model",
        "",
        "**Synthetic data only — not for clinical use.**",
        "",
        "A small 3D vision-language model (strided convolutional stem and transformer encoder over a 32x128x128",
        "grid with lung, mediastinal and bone windows of each cell's trilinear sample, highest and lowest HU, five",
        "HU-based anatomy masks, the holes in three of them, three density classes (gas, dense bone islands,",
        "fluid) and three round-spot filters (bright in lung, dark in soft tissue and bone, bright in bone),",
        "512 visual tokens, dense finding maps, one per finding type, at",
        "32x64x64; decoder with Photon token scheduling at a quarter of its depth, visual keys and values shared",
        "by every prompt of a volume) that writes topic-organized findings with boxes and answers questions",
        "about Readout's synthetic chest CT phantoms.",
        "",
        "| | |", "|---|---|",
        f"| data | phantoms rendered on the fly from seeds {t['train_seeds_from']} upwards (held out: validation "
        f"{t['validation_seeds'][0]}-{t['validation_seeds'][1]}, evaluation 9001-9999) |",
        f"| steps | {t['steps']} ({t['volumes_rendered']} phantoms rendered) |",
        f"| wall time | {t['wall_time_s']} s |",
        *([f"| this run | {t['note']} |"] if "note" in t else []),
        *([f"| started from | an earlier run's weights: {json.dumps(t['started_from'])} |"] if "started_from" in t else []),
        f"| device | {t['device']}{', ' + t['precision'] if 'precision' in t else ''} |",
        f"| machine | {t['machine']} |",
        f"| final validation (teacher-forced) | {json.dumps(t['final_validation'])} |",
        *([f"| decision thresholds | {json.dumps(info['thresholds'])}, calibrated on phantoms "
           f"{info['calibration']['phantoms'][0]}-{info['calibration']['phantoms'][1]} and normal ones "
           f"{info['calibration']['normal_phantoms'][0]}-{info['calibration']['normal_phantoms'][1]} "
           f"in {info['calibration']['wall_time_s']} s |"] if "calibration" in info else []),
        "",
        "Training: the finding maps alone first; then, with the encoder frozen (each phantom encoded once),",
        "the decoder through no pruning, then soft (visual values x p), then hard",
        f"dropping with Photon's surrogate gradient ({UNPRUNED_SHARE:.0%} of the soft and hard steps unpruned); retention band [0.3, 0.8],",
        f"a hinge on each prompt's kept share above {KEEP_TARGET:.0%} when hard (saliency min-max normalized up to its",
        f"{info['config'].get('saliency_top_quantile', 1.0):.0%} quantile),",
        "robustness (corrupted volumes -> maximal answer entropy) and flip regularizers;",
        "a finding head on the stem, a few convolutions over its second stage and over the input, and the encoder",
        "learns each type's finding map cell by cell from the phantoms' finding maps (positives weighted by their",
        "type's rarity, plus soft Dice per map, so small findings weigh as much as large ones; each map's highest",
        "cell also learns whether the volume holds that type at all, and each finding's own highest cell that",
        "it is there), and each token's highest",
        "probability for the prompt's topic guides the decoder's attention;",
        "the strongest regions of a topic's maps go before its prompt as typed candidate boxes (`engines.candidates`).",
    ]
    if evaluation:
        lines += ["", "## Evaluation", "", evaluation]
    return "\n".join(lines) + "\n"


@torch.no_grad()
def evaluate_loss(model: ReadoutVLM, tokenizer: Tokenizer, examples: list[Example], device: torch.device,
                  phase: str) -> dict:
    """Finding-map loss and (past the detect phase) teacher-forced loss, token accuracy and kept
    ratio on fixed held-out phantoms."""
    model.eval()
    batch = collate(examples, device)
    losses = _losses(model, tokenizer, batch, phase if phase != "soft" else "hard", flip=False)
    model.train()
    return {k: round(float(v), 4) for k, v in losses.items() if k in ("finding_map", "presence", "each_finding", "ce", "accuracy", "kept")}


def _bfloat16_is_fast(device: torch.device) -> bool:
    """Whether training steps run in bfloat16 autocast: on a GPU, and on a CPU whose oneDNN has bf16
    kernels (AVX512; this 2-core EPYC's map step 3.65 -> 2.8 s, decoder step 4.8 -> 3.7 s)."""
    return device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
