"""The demo engines: LLaVA-TA topic-guided reports and Photon questions, grounded MedVR-style.

One encoded volume serves every prompt; topics and questions run as one batch of
(prompts x rollouts) sequences. Each topic is generated from the image and its own prompt only,
never from another topic's text. A finding stands when at least two of the sampled rollouts
agree on it (MedVR's consensus gives its box) and the encoder's finding map of its type confirms
it inside that box (one rollout will do for a focal lesion the map is sure of). Zoomed re-looks
(the region cropped, re-encoded at the model's full grid resolution, the topic asked again) go
where the readers disagree: to a box whose coordinate tokens were uncertain (high entropy), and to
a lesion the map confirms but every rollout passed over, which stands if the re-look states it.
A lung lesion's size and type (nodule or mass) come from its measurement in the image."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
import torch

from engines.candidates import MapCandidate, map_candidates, map_peak, snap_box, with_candidates
from engines.decoding import Generation, generate
from engines.errors import EngineError
from engines.grounding import Candidate, ConsensusFinding, consensus, iou3d, majority_answer, needs_regrounding, vote_box
from engines.model import Encoded, ReadoutVLM
from engines.measure import (air_depth_mm, body_middle, bone_lesion_diameter_mm, cardiac_diameter_mm, fluid_depth_mm,
                             fluid_ml, free_air_pockets, hypodense_lesion_diameter_mm, lung_extents, lung_position,
                             patient_side, pleural_air_box, solid_lesion_diameter_mm, thoracic_diameter_mm)
from engines.phantom import (FINDING_TYPES, MASS_MIN_MM, NORMAL_SENTENCES, QUESTIONS, TOPICS, cardiomegaly_sentence,
                             lung_lesion_sentence, lung_lobe)
from engines.preprocess import BINS, ModelInput, bins_to_box, crop_extent, prepare
from engines.prompts import FOCAL_TYPES, question_region, region_topic, topic_region
from engines.results import Answer, Box, EngineInfo, Finding, StudyResult, TopicResult
from engines.tokenizer import MAX_ANSWER_TOKENS, Tokenizer
from engines.volume import Volume

# Raised whenever the same weights would report differently: 0.2.0 measures sizes, the heart and lobes in the image.
ENGINE_VERSION = "0.2.0"

# A finding needs the agreement of two readers: more than `min_agreement` of the rollouts (2 of 5) and
# the finding map of its type, whose peak inside the consensus box must reach `map_confirm`. The
# decoder often states a true bone lesion or pneumothorax in only two rollouts of five, and the
# maps alone fire on normal anatomy; together, on phantoms 8100-8159 plus 20 normals, F1 for
# findings >= 8 mm rose from 0.74 (3 of 5 rollouts, no map) to 0.79 and normal studies with a
# finding fell from 3 to 1 of 20. Where the map is sure of a focal lesion (`map_sure`), one rollout
# stating it is enough: the decoder leaves many true nodules and lytic lesions out of all but one
# rollout (on phantoms 8100-8259 plus 20 normals, F1 >= 8 mm 0.841 -> 0.870, lytic lesions 0.44 ->
# 0.68, nodules 0.64 -> 0.74, precision 0.955 -> 0.944, normal studies with a finding 1 of 20 both).
# These defaults were tuned on the shipped weights; a newly trained model is calibrated on
# development phantoms (`engines.calibration`) and carries its own in its JSON.


@dataclass(frozen=True)
class Thresholds:
    """When a consensus finding stands (see the comment above)."""

    min_agreement: float = 0.3
    map_confirm: float = 0.8
    map_sure: float = 0.95

# A focal lesion's map region that the prompt showed and the map confirms but that no finding which
# stands meets (IoU >= PASSED_IOU) gets a second, zoomed look, as an uncertain box does; it stands if
# the look states it there. On phantoms 8100-8259 plus 80 normals the looks stated 26 of the 37 such
# regions that were true lesions (bone lesions 14 of 17) and 5 of the 28 that were not, none on a
# normal study.
PASSED_IOU = 0.1
# The pericardial effusions the decoder stated that their map confirmed held 70-303 mL of fluid in
# their box (41 true ones, phantoms 8100-8259 plus 80 normals), the 10 false ones at most 3.2 mL
# (4 of them on normal studies, where they made 4 of the 11 studies given a finding).
PERICARDIAL_FLUID_ML = 20.0
# A heart is enlarged when it is wider than half the chest. Measured on the truth boxes of phantoms
# 8100-8111, the enlarged hearts' ratios were 0.63-0.69 (drawn 0.61-0.70).
CARDIOMEGALY_RATIO = 0.5

# Order matters: the first type whose words appear in a sentence names it.
_TYPE_WORDS = (
    ("pericardial effusion", "pericardial effusion"), ("pleural effusion", "pleural effusion"),
    ("pneumothorax", "pneumothorax"), ("cardiomegaly", "cardiomegaly"), ("nodule", "nodule"), ("mass", "mass"),
    ("hypodense lesion", "hypodense lesion"), ("lytic lesion", "lytic lesion"), ("sclerotic lesion", "sclerotic lesion"),
)


@dataclass(frozen=True)
class ReadRequest:
    """What to read and how: topics, questions and the sampling / grounding settings."""

    topics: tuple[str, ...] = TOPICS
    questions: tuple[str, ...] = QUESTIONS
    rollouts: int = 5
    temperature: float = 0.7
    pruning: bool = True
    reground: bool = True  # zoomed re-looks: at uncertain boxes and at map regions the rollouts passed over
    map_check: bool = True  # off: the rollouts' consensus alone decides (an ablation)
    entropy_threshold: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.topics and not self.questions:
            raise EngineError("nothing to read: the request names no topic and no question")
        if self.rollouts < 1:
            raise EngineError(f"rollouts must be at least 1, got {self.rollouts}")


@dataclass
class Sampled:
    """Raw rollouts of one read, before consensus (what `readout eval`'s ablations reuse)."""

    model_input: ModelInput
    shape: tuple[int, int, int]
    candidates: dict[str, list[Candidate]]  # per topic
    normal_texts: dict[str, list[str]]  # per topic: sentences of rollouts without a box
    answers: dict[str, list[tuple[str, tuple[int, ...] | None]]]  # per question, one per rollout
    kept_ratio: dict[str, float]  # per prompt
    finding_probability: np.ndarray  # the volume's finding maps [MAP_TYPES, D, H, W]
    timings: dict[str, float] = field(default_factory=dict)
    decode_steps: int = 0  # tokens decoded per row (the longest answer sets it for the batch)
    measured_s: float = 0.0  # measuring findings while sampling; `assemble` adds the pneumothoraces
    regions: dict[str, list[MapCandidate]] = field(default_factory=dict)  # per topic: the map regions its prompt showed
    # Zoomed re-looks by (topic, type, voxel box): greedy, so every `assemble` of this read can reuse them.
    looks: dict[tuple[str, str, tuple[int, ...]], Relook | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Relook:
    """What a zoomed re-look stated at a target: its sentence, its voxel box and the mean entropy of
    the box's coordinate tokens."""

    text: str
    box: tuple[int, ...]
    entropy: float


def finding_type(text: str) -> str:
    """The finding type a generated sentence names, ``lesion`` if none of the known ones."""
    lowered = text.lower()
    for words, kind in _TYPE_WORDS:
        if words in lowered:
            return kind
    return "lesion"


def _size_mm(text: str) -> float | None:
    match = re.search(r"(\d+(?:\.\d+)?) mm", text)
    return float(match.group(1)) if match else None


def read_finding(text: str, box_voxel: tuple[int, ...], volume_hu: np.ndarray, spacing_mm: Sequence[float],
                 measured: dict[tuple[str, tuple[int, ...]], float | None]) -> tuple[str, str] | None:
    """A decoded finding's type and sentence, or ``None`` where the image does not hold it
    (measurements kept in ``measured`` per kind and box).

    A lung lesion's type and sentence come from its size measured in the image
    (`solid_lesion_diameter_mm`): the decoder's stated sizes stray far, and size alone tells a
    nodule from a mass. Where no solid structure about 7 mm thick lies in the box there is no solid
    nodule to report: of the decoder's lung lesions that its map confirmed on phantoms 8100-8259
    and 80 normals, the 9 without one were all false (6 of them would have stood, 5 on normal
    studies) and the 89 true ones all had one. A pericardial effusion needs `PERICARDIAL_FLUID_ML`
    of fluid in its box (`fluid_ml`). A pleural effusion's depth is its fluid's (`fluid_depth_mm`:
    2.3 mm off on average on phantoms 8160-8199, where the decoder's were 6.1 mm off), a liver
    lesion's size the dark blob's (`hypodense_lesion_diameter_mm`: 1.9 mm off in the boxes the
    engine found on phantoms 8160-8189, where the decoder's were 9.7 mm off), a bone lesion's its
    lytic or sclerotic blob's (`bone_lesion_diameter_mm`: 0.4 mm off for 17 of the 18 the engine
    found on phantoms 8160-8199, none measured in the 18th, where the decoder's were 3.3 mm off). Cardiomegaly's
    sentence states the measured cardiothoracic ratio and transverse diameter (`cardiac_diameter_mm`
    over `thoracic_diameter_mm`: for the 10 the engine found on phantoms 8160-8199, 1.3 mm and 0.004
    off, where the decoder's diameters were 23 mm off); a heart not wider than `CARDIOMEGALY_RATIO`
    of the chest is not enlarged."""
    def measure(what: str, how: Callable[..., float | None]) -> float | None:
        if (what, box_voxel) not in measured:
            measured[what, box_voxel] = how(volume_hu, spacing_mm, box_voxel)
        return measured[what, box_voxel]

    kind = finding_type(text)
    if kind in FINDING_TYPES["lungs"]:
        size = measure("lung lesion", solid_lesion_diameter_mm)
        if size is None:
            return None
        kind = "mass" if size >= MASS_MIN_MM else "nodule"
        return kind, lung_lesion_sentence(kind, round(size), _location(text))
    if kind == "pericardial effusion" and measure(kind, fluid_ml) < PERICARDIAL_FLUID_ML:
        return None
    if kind == "cardiomegaly":
        diameter = measure(kind, cardiac_diameter_mm)
        if ("thorax", ()) not in measured:  # the chest's width is the volume's, whatever the box
            measured["thorax", ()] = thoracic_diameter_mm(volume_hu, spacing_mm)
        thorax = measured["thorax", ()]
        if not diameter or not thorax:
            return kind, text
        if diameter / thorax <= CARDIOMEGALY_RATIO:
            return None
        return kind, cardiomegaly_sentence(diameter / thorax, diameter)
    if kind in MEASURED_SIZES:
        size = measure(kind, MEASURED_SIZES[kind])
        return kind, _with_size(text, size) if size else text
    return kind, text


# Sizes the image gives better than the decoder; where it gives none, the decoder's words stand.
MEASURED_SIZES: dict[str, Callable[..., float | None]] = {
    "pleural effusion": fluid_depth_mm,
    "hypodense lesion": hypodense_lesion_diameter_mm,
    "lytic lesion": partial(bone_lesion_diameter_mm, sclerotic=False),
    "sclerotic lesion": partial(bone_lesion_diameter_mm, sclerotic=True),
}


def _with_size(text: str, size_mm: float) -> str:
    """``text`` with the first size it states ("N mm") set to ``size_mm``."""
    return re.sub(r"\d+(?:\.\d+)? mm", f"{round(size_mm)} mm", text, count=1)


def _location(text: str) -> str | None:
    match = re.search(r"in the (.+?)\.?$", text)
    if match:
        return match.group(1)
    side = re.match(r"(Left|Right) (pleural|pneumothorax)", text)
    return f"{side.group(1).lower()} pleural space" if side else None


# The decoder's words for a finding's side are sometimes wrong (on phantoms 8160-8189, 3 of 18 lung
# lesions and 1 of 13 pneumothoraces it found were put on the other side); its box is on the right one.
SIDED_TYPES = (*FINDING_TYPES["lungs"], *FINDING_TYPES["pleura"])
_LOBES = ("upper lobe", "middle lobe", "lower lobe")


def on_side(finding: Finding, side: str, lobe: str | None = None) -> Finding:
    """``finding`` with its sentence put on ``side`` (``"right"`` or ``"left"``). A lung lesion's
    sentence is rebuilt with ``lobe`` where it is known, else with the lobe the decoder named, or the
    lung where it named none it has (the left lung has no middle lobe: its counterpart, the lingula,
    belongs to the upper lobe)."""
    if finding.type in FINDING_TYPES["lungs"] and finding.size_mm is not None:
        part = next((lobe for lobe in _LOBES if lobe in (finding.location or "")), "lung")
        part = "upper lobe" if side == "left" and part == "middle lobe" else part
        text = lung_lesion_sentence(finding.type, round(finding.size_mm), lobe or f"{side} {part}")
    else:
        text = re.sub(r"\b(right|left)\b", lambda m: side.capitalize() if m.group(1)[0].isupper() else side,
                      finding.text, flags=re.IGNORECASE)
    return replace(finding, text=text, location=_location(text))


def placed(finding: Finding, affine: np.ndarray, middle: float, lungs: dict[str, tuple[float, ...]] | None) -> Finding:
    """A lung or pleural finding on the side its box lies on (`on_side`); a lung lesion in the lobe
    its box lies in, by the fissures' course (`phantom.lung_lobe`), where the lungs were found
    (`lung_extents`)."""
    side = patient_side(affine, finding.box.voxel, middle)
    lobe = None
    if lungs and finding.type in FINDING_TYPES["lungs"]:
        lobe = lung_lobe(side, *lung_position(lungs[side], affine, finding.box.voxel))
    return on_side(finding, side, lobe)


def passed_over(sampled: Sampled, topics: Sequence[str], standing: list[tuple[str, tuple[int, ...]]],
                map_confirm: float) -> list[tuple[str, MapCandidate, tuple[int, ...]]]:
    """The focal map regions each topic's prompt showed that its map confirms (peak >= ``map_confirm``)
    and that no standing finding of that topic, given as (topic, voxel box), meets: (topic, region, voxel box)."""
    passed = []
    for topic in topics:
        for region in sampled.regions.get(topic, []):
            if region.type not in FOCAL_TYPES or map_peak(sampled.finding_probability, region.type, region.box) < map_confirm:
                continue
            box = bins_to_box(region.box, sampled.model_input.extent, sampled.shape)
            if not any(t == topic and iou3d(v, box) >= PASSED_IOU for t, v in standing):
                passed.append((topic, region, box))
    return passed


class DemoEngine:
    """Readout's demo engine: `ReportEngine` and `QuestionEngine` behaviour over one shared model."""

    name = "demo"

    def __init__(self, model: ReadoutVLM, tokenizer: Tokenizer | None = None, device: str = "cpu",
                 thresholds: Thresholds = Thresholds()) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer or Tokenizer()
        self.device = torch.device(device)
        self.thresholds = thresholds
        self.info = EngineInfo(self.name, ENGINE_VERSION)

    # --- sampling --------------------------------------------------------------------------

    def _encode(self, inputs: Sequence[ModelInput]) -> Encoded:
        image = torch.from_numpy(np.stack([i.image for i in inputs])).to(self.device)
        spacing = torch.tensor([i.grid_spacing_mm for i in inputs], dtype=torch.float32, device=self.device)
        return self.model.encode(image, spacing)

    def _prompts(self, prompts: list[list[int]]) -> torch.Tensor:
        longest = max(map(len, prompts))
        return torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=self.device)

    def _run(self, visual: Encoded, rows: torch.Tensor, inputs: Sequence[ModelInput], regions: Sequence[str],
             prompts: list[list[int]], rollouts: int, temperature: float, pruning: bool,
             seed: int) -> tuple[Generation, list[list[MapCandidate]], torch.Tensor, dict[str, float]]:
        """Prefill every prompt once (prompt i reads volume ``rows[i]`` of ``inputs`` and looks at
        region ``regions[i]``), repeat each prefix for its rollouts, decode them all together.

        Returns the generation, each prompt's map candidates, the kept shares and timings.
        """
        t0 = time.perf_counter()
        share = np.stack([inputs[int(v)].regions[name].reshape(-1) for v, name in zip(rows, regions)])
        topic = torch.tensor([region_topic(name) for name in regions], device=self.device)
        boxes = map_candidates(visual.finding_logits, rows, topic)
        prompt = with_candidates(self._prompts(prompts), boxes, self.tokenizer)
        prefix = self.model.prefill(visual, torch.from_numpy(share).float().to(self.device), prompt,
                                    "hard" if pruning else "off", capacity=MAX_ANSWER_TOKENS, physical=True,
                                    rows=rows, topic=topic)
        kept = prefix.kept.float() / self.model.config.visual_tokens
        t1 = time.perf_counter()
        prefix.select(torch.arange(len(prompts), device=self.device).repeat_interleave(rollouts))
        generator = torch.Generator(device=self.device).manual_seed(seed)
        out = generate(self.model, prefix, self.tokenizer, temperature=temperature, generator=generator)
        return out, boxes, kept, {"schedule_s": t1 - t0, "decode_s": time.perf_counter() - t1}

    @torch.no_grad()
    def sample(self, volume_hu: np.ndarray, spacing_mm: tuple[float, float, float], request: ReadRequest) -> Sampled:
        """Encode the volume once and sample ``request.rollouts`` answers for every topic and question."""
        t0 = time.perf_counter()
        inp = prepare(volume_hu, spacing_mm)
        visual = self._encode([inp])
        encode_s = time.perf_counter() - t0
        names = [*request.topics, *request.questions]
        prompts = [self.tokenizer.topic_prompt(t) for t in request.topics]
        prompts += [self.tokenizer.question_prompt(q) for q in request.questions]
        regions = [topic_region(t) for t in request.topics] + [question_region(q) for q in request.questions]
        rows = torch.zeros(len(prompts), dtype=torch.long, device=self.device)
        out, found, kept, timings = self._run(visual, rows, [inp], regions, prompts, request.rollouts, request.temperature,
                                       request.pruning, request.seed)
        n = request.rollouts
        candidates: dict[str, list[Candidate]] = {t: [] for t in request.topics}
        normal_texts: dict[str, list[str]] = {t: [] for t in request.topics}
        answers: dict[str, list] = {q: [] for q in request.questions}
        measured: dict[tuple[str, tuple[int, ...]], float | None] = {}
        measure_s = 0.0
        for row in range(len(prompts) * n):
            name, rollout = names[row // n], row % n
            items = self.tokenizer.decode_answer(out.tokens[row].tolist())
            if name in answers:
                answers[name].append(items[0] if items else ("", None))
                continue
            entropies = out.coordinate_entropies(row)
            boxes = 0
            for text, box in items:
                if box is None:
                    normal_texts[name].append(text)
                    continue
                entropy = float(np.mean(entropies[6 * boxes : 6 * boxes + 6])) if len(entropies) >= 6 * (boxes + 1) else 0.0
                boxes += 1
                snapped = snap_box(box, found[row // n])
                t1 = time.perf_counter()
                read = read_finding(text, bins_to_box(snapped, inp.extent, volume_hu.shape), volume_hu, spacing_mm, measured)
                measure_s += time.perf_counter() - t1
                if read is not None:
                    candidates[name].append(Candidate(rollout, *read, snapped, entropy, snapped != box))
        return Sampled(inp, volume_hu.shape, candidates, normal_texts, answers,
                       {name: float(kept[i]) for i, name in enumerate(names)},
                       torch.sigmoid(visual.finding_logits[0].float()).cpu().numpy(),
                       {"encode_s": encode_s, **timings}, out.tokens.shape[1], measure_s,
                       {name: found[i] for i, name in enumerate(request.topics)})

    # --- grounding -------------------------------------------------------------------------

    @torch.no_grad()
    def relook(self, volume_hu: np.ndarray, spacing_mm, targets: list[tuple[str, str, tuple[int, ...]]]) -> list[Relook | None]:
        """Zoomed re-looks: for each (topic, type, voxel box), crop, re-encode, ask the topic again.

        Returns per target the finding of that type the re-look stated that overlaps the box most,
        or None where it stated none.
        """
        if not targets:
            return []
        shape = volume_hu.shape
        crops = [crop_extent(box, spacing_mm, shape) for _, _, box in targets]
        inputs = [prepare(volume_hu, spacing_mm, extent) for extent in crops]
        visual = self._encode(inputs)
        prompts = [self.tokenizer.topic_prompt(topic) for topic, _, _ in targets]
        regions = [topic_region(topic) for topic, _, _ in targets]
        out, _, _, _ = self._run(visual, torch.arange(len(targets), device=self.device), inputs, regions, prompts, 1, 0.0,
                              True, 0)
        looks: list[Relook | None] = []
        measured: dict[tuple[str, tuple[int, ...]], float | None] = {}
        for row, ((_, kind, box), extent) in enumerate(zip(targets, crops)):
            entropies = out.coordinate_entropies(row)
            best, best_iou = None, 0.0
            stated = [(text, bins) for text, bins in self.tokenizer.decode_answer(out.tokens[row].tolist()) if bins is not None]
            for index, (text, bins) in enumerate(stated):
                voxel = bins_to_box(bins, extent, shape)
                read = read_finding(text, voxel, volume_hu, spacing_mm, measured)
                if read is None or read[0] != kind:
                    continue
                overlap = iou3d(voxel, box)
                if overlap > best_iou:
                    entropy = float(np.mean(entropies[6 * index : 6 * index + 6])) if len(entropies) >= 6 * (index + 1) else 0.0
                    best, best_iou = Relook(read[1], voxel, entropy), overlap
            looks.append(best)
        return looks

    def assemble(self, sampled: Sampled, volume_hu: np.ndarray, spacing_mm, request: ReadRequest,
                 rollouts: int | None = None, thresholds: Thresholds | None = None) -> tuple[list[TopicResult], list[Answer]]:
        """Consensus findings per topic (using the first ``rollouts`` rollouts) that the finding maps
        confirm, regrounded, as results (``thresholds``: the engine's unless given)."""
        n = rollouts or request.rollouts
        limits = thresholds or self.thresholds
        shape, extent = sampled.shape, sampled.model_input.extent
        agreed: list[tuple[str, ConsensusFinding]] = []
        peaks: list[float] = []
        for topic in request.topics:
            used = [c for c in sampled.candidates[topic] if c.rollout < n]
            for f in consensus(used, n, BINS, min_agreement=0.0):
                peak = map_peak(sampled.finding_probability, f.type, f.box)
                if request.map_check:
                    stands = peak >= limits.map_confirm and (f.agreement > limits.min_agreement
                                                             or (f.type in FOCAL_TYPES and peak >= limits.map_sure))
                else:  # the ablation: consensus alone, at the default agreement (calibration assumes the map check)
                    stands = f.agreement > Thresholds.min_agreement
                if stands:
                    agreed.append((topic, f))
                    peaks.append(peak)
        voxel = [bins_to_box(f.box, extent, shape) for _, f in agreed]
        # A pneumothorax's extent and depth are its free air's (`pleural_air_box`), of which the map lights only part.
        from_image = [False] * len(agreed)
        t0 = time.perf_counter()
        pneumothoraces = [i for i, (_, f) in enumerate(agreed) if f.type == "pneumothorax"]
        if pneumothoraces:
            pockets, middle = free_air_pockets(volume_hu), body_middle(volume_hu)
            for i in pneumothoraces:
                air = pleural_air_box(pockets, middle, voxel[i])
                if air is not None:
                    voxel[i], from_image[i] = air, True
                    # The decoder's depths strayed 8 mm on average (phantoms 8160-8199); the air's own
                    # were 0.2 mm off on the truth boxes of 8100-8199.
                    topic, f = agreed[i]
                    agreed[i] = (topic, replace(f, text=_with_size(f.text, air_depth_mm(volume_hu, spacing_mm, air))))
        sampled.timings["measure_s"] = sampled.measured_s + time.perf_counter() - t0
        # A box the finding map grounded already has its extent; a zoomed re-look would only blur it.
        from_map = [all(m.from_map for m in f.members) for _, f in agreed]
        uncertain = [i for i, (_, f) in enumerate(agreed)
                     if request.reground and f.type in FOCAL_TYPES and needs_regrounding(f, request.entropy_threshold)
                     and not from_map[i]]
        passed = passed_over(sampled, request.topics, [(t, v) for (t, _), v in zip(agreed, voxel)], limits.map_confirm) \
            if request.reground and request.map_check else []
        t0 = time.perf_counter()
        targets = [(agreed[i][0], agreed[i][1].type, voxel[i]) for i in uncertain] \
            + [(topic, region.type, box) for topic, region, box in passed]
        new = [t for t in dict.fromkeys(targets) if t not in sampled.looks]
        sampled.looks.update(zip(new, self.relook(volume_hu, spacing_mm, new)))
        looks = [sampled.looks[t] for t in targets]
        sampled.timings["reground_s"] = time.perf_counter() - t0
        final = list(voxel)
        regrounded = [False] * len(agreed)
        for i, look in zip(uncertain, looks):
            if look is not None:
                final[i], regrounded[i] = look.box, True
        second_look = [False] * len(agreed)
        for (topic, region, box), look in zip(passed, looks[len(uncertain):]):
            if look is None:
                continue
            overlap = iou3d(look.box, box)
            # One look stated it, as one rollout of n would have; its box is the map's region.
            agreed.append((topic, ConsensusFinding(region.type, look.text, region.box, 1, 1 / n, overlap, overlap / n,
                                                   look.entropy, ())))
            peaks.append(map_peak(sampled.finding_probability, region.type, region.box))
            voxel.append(box)
            final.append(box)
            from_map.append(True)
            from_image.append(False)
            regrounded.append(False)
            second_look.append(True)

        topics = []
        for topic in request.topics:
            findings = [
                Finding(type=f.type, text=f.text, size_mm=_size_mm(f.text), location=_location(f.text),
                        confidence=round(f.confidence, 4), box=Box(final[i]),
                        extra={"agreement": round(f.agreement, 4), "mean_iou": round(f.mean_iou, 4),
                               "map_probability": round(peaks[i], 4),
                               "entropy": round(f.entropy, 4), "box_from_map": from_map[i],
                               "box_from_image": from_image[i], "regrounded": regrounded[i],
                               "second_look": second_look[i], "box_before_regrounding": list(voxel[i])})
                for i, (t, f) in enumerate(agreed) if t == topic
            ]
            if findings:
                topics.append(TopicResult(topic, False, findings, extra={"kept_ratio": round(sampled.kept_ratio[topic], 4)}))
            else:
                texts = sampled.normal_texts[topic]
                text = majority_answer(texts)[0] if texts else NORMAL_SENTENCES.get(topic)
                topics.append(TopicResult(topic, True, [], text=text, extra={"kept_ratio": round(sampled.kept_ratio[topic], 4)}))

        answers = []
        for question in request.questions:
            replies = sampled.answers[question][:n]
            answer, share = majority_answer([text.strip().lower() for text, _ in replies])
            boxes = [box for text, box in replies if text.strip().lower() == answer and box is not None]
            box = vote_box(boxes, BINS) if len(boxes) * 2 > len(replies) else None
            answers.append(Answer(question, answer, round(share, 4), Box(bins_to_box(box, extent, shape)) if box else None,
                                  extra={"kept_ratio": round(sampled.kept_ratio[question], 4)}))
        return topics, answers

    def run(self, volume: Volume, request: ReadRequest = ReadRequest()) -> StudyResult:
        """Read ``volume``: findings by topic with consensus boxes, answers, timings and token counts."""
        spacing = volume.spacing_mm
        sampled = self.sample(volume.hu, spacing, request)
        topics, answers = self.assemble(sampled, volume.hu, spacing, request)
        if any(f.type in SIDED_TYPES for t in topics for f in t.findings):
            middle = body_middle(volume.hu)
            lungs = (lung_extents(volume.hu, volume.affine, middle)
                     if any(f.type in FINDING_TYPES["lungs"] for t in topics for f in t.findings) else None)
            for topic in topics:
                topic.findings = [placed(f, volume.affine, middle, lungs)
                                  if f.type in SIDED_TYPES and f.box else f for f in topic.findings]
        kept = list(sampled.kept_ratio.values())
        return StudyResult(
            series_instance_uid=volume.series_instance_uid, engine=self.info, topics=topics, answers=answers,
            extra={"timings": {k: round(v, 3) for k, v in sampled.timings.items()},
                   "visual_tokens": self.model.config.visual_tokens,
                   "mean_kept_ratio": round(float(np.mean(kept)), 4) if kept else None,
                   "rollouts": request.rollouts, "pruning": request.pruning},
        )


class ReportEngine(DemoEngine):
    """LLaVA-TA: topic-guided findings only (a request's questions are ignored)."""

    def run(self, volume: Volume, request: ReadRequest = ReadRequest()) -> StudyResult:
        return super().run(volume, replace(request, questions=()))


class QuestionEngine(DemoEngine):
    """Photon-style question answering only (a request's topics are ignored)."""

    def run(self, volume: Volume, request: ReadRequest = ReadRequest()) -> StudyResult:
        return super().run(volume, replace(request, topics=()))
