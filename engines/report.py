"""The demo engines: LLaVA-TA topic-guided reports and Photon questions, grounded MedVR-style.

One encoded volume serves every prompt; topics and questions run as one batch of
(prompts x rollouts) sequences. Each topic is generated from the image and its own prompt only,
never from another topic's text. A finding stands when at least two of the sampled rollouts
agree on it (MedVR's consensus gives its box) and the encoder's finding map of its type confirms
it inside that box (one rollout will do for a focal lesion the map is sure of); a box whose coordinate tokens were uncertain (high entropy) gets a zoomed
re-look: the region is cropped, re-encoded at the model's full grid resolution and the topic asked
again. A lung lesion's size and type (nodule or mass) come from its measurement in the image.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from engines.candidates import MapCandidate, map_candidates, map_peak, snap_box, with_candidates
from engines.decoding import Generation, generate
from engines.errors import EngineError
from engines.grounding import Candidate, ConsensusFinding, consensus, iou3d, majority_answer, vote_box
from engines.model import Encoded, ReadoutVLM
from engines.measure import free_air_pockets, pleural_air_box, solid_lesion_diameter_mm
from engines.phantom import FINDING_TYPES, MASS_MIN_MM, NORMAL_SENTENCES, QUESTIONS, TOPICS, lung_lesion_sentence
from engines.preprocess import BINS, ModelInput, bins_to_box, crop_extent, prepare
from engines.prompts import FOCAL_TYPES, question_region, region_topic, topic_region
from engines.results import Answer, Box, EngineInfo, Finding, StudyResult, TopicResult
from engines.tokenizer import MAX_ANSWER_TOKENS, Tokenizer
from engines.volume import Volume

ENGINE_VERSION = "0.1.0"

# A finding needs the agreement of two readers: more than MIN_AGREEMENT of the rollouts (2 of 5) and
# the finding map of its type, whose peak inside the consensus box must reach MAP_CONFIRM. The
# decoder often states a true bone lesion or pneumothorax in only two rollouts of five, and the
# maps alone fire on normal anatomy; together, on phantoms 8100-8159 plus 20 normals, F1 for
# findings >= 8 mm rose from 0.74 (3 of 5 rollouts, no map) to 0.79 and normal studies with a
# finding fell from 3 to 1 of 20. Where the map is sure of a focal lesion (MAP_SURE), one rollout
# stating it is enough: the decoder leaves many true nodules and lytic lesions out of all but one
# rollout (on phantoms 8100-8259 plus 20 normals, F1 >= 8 mm 0.841 -> 0.870, lytic lesions 0.44 ->
# 0.68, nodules 0.64 -> 0.74, precision 0.955 -> 0.944, normal studies with a finding 1 of 20 both).
MIN_AGREEMENT = 0.3
MAP_CONFIRM = 0.8
MAP_SURE = 0.95

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
    reground: bool = True
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
    lesions_measured_s: float = 0.0  # measuring lung lesions while sampling; `assemble` adds the rest


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
                 sizes: dict[tuple[int, ...], float | None]) -> tuple[str, str]:
    """A decoded finding's type and sentence. A lung lesion's come from its size measured in the
    image (`solid_lesion_diameter_mm`, kept in ``sizes`` per box): the decoder's stated sizes stray
    far, and size alone tells a nodule from a mass. Where nothing thicker than a small nodule lies
    in the box, the decoder's own stand."""
    kind = finding_type(text)
    if kind not in FINDING_TYPES["lungs"]:
        return kind, text
    if box_voxel not in sizes:
        sizes[box_voxel] = solid_lesion_diameter_mm(volume_hu, spacing_mm, box_voxel)
    size = sizes[box_voxel]
    if size is None:
        return kind, text
    kind = "mass" if size >= MASS_MIN_MM else "nodule"
    return kind, lung_lesion_sentence(kind, round(size), _location(text))


def _location(text: str) -> str | None:
    match = re.search(r"in the (.+?)\.?$", text)
    if match:
        return match.group(1)
    side = re.match(r"(Left|Right) (pleural|pneumothorax)", text)
    return f"{side.group(1).lower()} pleural space" if side else None


class DemoEngine:
    """Readout's demo engine: `ReportEngine` and `QuestionEngine` behaviour over one shared model."""

    name = "demo"

    def __init__(self, model: ReadoutVLM, tokenizer: Tokenizer | None = None, device: str = "cpu") -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer or Tokenizer()
        self.device = torch.device(device)
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
        sizes: dict[tuple[int, ...], float | None] = {}
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
                kind, text = read_finding(text, bins_to_box(snapped, inp.extent, volume_hu.shape), volume_hu, spacing_mm, sizes)
                measure_s += time.perf_counter() - t1
                candidates[name].append(Candidate(rollout, kind, text, snapped, entropy, snapped != box))
        return Sampled(inp, volume_hu.shape, candidates, normal_texts, answers,
                       {name: float(kept[i]) for i, name in enumerate(names)},
                       torch.sigmoid(visual.finding_logits[0].float()).cpu().numpy(),
                       {"encode_s": encode_s, **timings}, out.tokens.shape[1], measure_s)

    # --- grounding -------------------------------------------------------------------------

    @torch.no_grad()
    def reground(self, volume_hu: np.ndarray, spacing_mm, targets: list[tuple[str, str, tuple[int, ...]]]) -> list[tuple[int, ...] | None]:
        """Zoomed re-looks: for each (topic, type, voxel box), crop, re-encode, ask the topic again.

        Returns the refined voxel box per target, or None where the re-look found no box of
        that type overlapping the original one.
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
        refined: list[tuple[int, ...] | None] = []
        sizes: dict[tuple[int, ...], float | None] = {}
        for row, ((_, kind, box), extent) in enumerate(zip(targets, crops)):
            best, best_iou = None, 0.0
            for text, bins in self.tokenizer.decode_answer(out.tokens[row].tolist()):
                if bins is None:
                    continue
                voxel = bins_to_box(bins, extent, shape)
                if read_finding(text, voxel, volume_hu, spacing_mm, sizes)[0] != kind:
                    continue
                overlap = iou3d(voxel, box)
                if overlap > best_iou:
                    best, best_iou = voxel, overlap
            refined.append(best)
        return refined

    def assemble(self, sampled: Sampled, volume_hu: np.ndarray, spacing_mm, request: ReadRequest,
                 rollouts: int | None = None) -> tuple[list[TopicResult], list[Answer]]:
        """Consensus findings per topic (using the first ``rollouts`` rollouts) that the finding maps
        confirm, regrounded, as results."""
        n = rollouts or request.rollouts
        shape, extent = sampled.shape, sampled.model_input.extent
        agreed: list[tuple[str, ConsensusFinding]] = []
        peaks: list[float] = []
        for topic in request.topics:
            used = [c for c in sampled.candidates[topic] if c.rollout < n]
            for f in consensus(used, n, BINS, min_agreement=0.0):
                peak = map_peak(sampled.finding_probability, f.type, f.box)
                if request.map_check:
                    stands = peak >= MAP_CONFIRM and (f.agreement > MIN_AGREEMENT
                                                      or (f.type in FOCAL_TYPES and peak >= MAP_SURE))
                else:
                    stands = f.agreement > MIN_AGREEMENT
                if stands:
                    agreed.append((topic, f))
                    peaks.append(peak)
        voxel = [bins_to_box(f.box, extent, shape) for _, f in agreed]
        # A pneumothorax's extent is its free air (`pleural_air_box`), of which the map lights only part.
        from_image = [False] * len(agreed)
        t0 = time.perf_counter()
        pneumothoraces = [i for i, (_, f) in enumerate(agreed) if f.type == "pneumothorax"]
        if pneumothoraces:
            pockets, middle = free_air_pockets(volume_hu)
            for i in pneumothoraces:
                air = pleural_air_box(pockets, middle, voxel[i])
                if air is not None:
                    voxel[i], from_image[i] = air, True
        sampled.timings["measure_s"] = sampled.lesions_measured_s + time.perf_counter() - t0
        # A box the finding map grounded already has its extent; a zoomed re-look would only blur it.
        from_map = [all(m.from_map for m in f.members) for _, f in agreed]
        relook = [i for i, (_, f) in enumerate(agreed)
                  if request.reground and f.type in FOCAL_TYPES and f.entropy > request.entropy_threshold and not from_map[i]]
        t0 = time.perf_counter()
        refined = self.reground(volume_hu, spacing_mm, [(agreed[i][0], agreed[i][1].type, voxel[i]) for i in relook])
        sampled.timings["reground_s"] = time.perf_counter() - t0
        final = list(voxel)
        regrounded = [False] * len(agreed)
        for i, box in zip(relook, refined):
            if box is not None:
                final[i], regrounded[i] = box, True

        topics = []
        for topic in request.topics:
            findings = [
                Finding(type=f.type, text=f.text, size_mm=_size_mm(f.text), location=_location(f.text),
                        confidence=round(f.confidence, 4), box=Box(final[i]),
                        extra={"agreement": round(f.agreement, 4), "mean_iou": round(f.mean_iou, 4),
                               "map_probability": round(peaks[i], 4),
                               "entropy": round(f.entropy, 4), "box_from_map": from_map[i],
                               "box_from_image": from_image[i], "regrounded": regrounded[i],
                               "box_before_regrounding": list(voxel[i])})
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
