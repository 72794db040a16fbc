"""MedGemma 1.5 4B as a Readout engine: a real checkpoint through the same results and writers.

The checkpoint (``google/medgemma-1.5-4b-it``) is loaded from a local folder the user
downloaded under Google's Health AI Developer Foundations terms; nothing is downloaded here.

Reading one series follows the official CT notebook (KNOWLEDGE.md section 5): at most 85
slices (`select_slice_indices`), three HU windows as R, G, B (`ct_slice_to_rgb`), each slice
padded to a square (`pad_to_square`) and resized, rescaled and normalized as the checkpoint's
processor does (in torch on the model's device, `engines.gemma_pixels`), and one user turn of
instruction, ``image, "SLICE n"`` per slice, then the question (`build_messages`).

On top of that:

- LLaVA-TA: one independent prompt per topic (`topic_question`), never conditioned on another
  topic's text; questions get their own prompts (`question_prompt`).
- One image prefix per study: the slices are encoded and the prefix prefilled once; every
  topic, question and rollout decodes as one batch on that prefix's keys/values
  (`engines.medgemma_pruning`), optionally with Photon-style pruning of image tokens, over
  fixed-size key/value buffers (`engines.medgemma_decode`, a CUDA graph on the GPU), kept
  from one read to the next while the reads' layout stays the same.
- MedVR: with several rollouts, boxes are voted into consensus findings whose agreement is
  the confidence, answers are majority-voted, and each box carries the entropy of its
  coordinate tokens.
- Boxes come back as ``box_2d`` ``[y0, x0, y1, x1]`` on 0-1000 of the padded square slice
  plus a SLICE number (`parse_answer`), and become voxel boxes (`box_to_voxels`). Output that
  does not parse is recorded on the topic or answer, never raised.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.errors import CheckpointError
from engines.gemma_pixels import PixelSteps
from engines.grounding import Candidate, consensus, iou3d, majority_answer, vote_box
from engines.medgemma_decode import KeptDecoders
from engines.medgemma_pruning import (
    Gemma3Decoder,
    PruningConfig,
    prefill_prefix,
    prefill_prompts,
)
from engines.report import ReadRequest, finding_type
from engines.results import Answer, Box, EngineInfo, Finding, StudyResult, TopicResult
from engines.volume import Volume

ENGINE_VERSION = "0.1.0"
CHECKPOINT = "google/medgemma-1.5-4b-it"

#: HU windows of the R, G and B channels (the official notebook's wide, soft-tissue, brain).
WINDOWS: tuple[tuple[int, int], ...] = ((-1024, 1024), (-135, 215), (0, 80))
MAX_SLICES = 85
#: Tokenized prompt layouts (slice count and questions) an engine keeps from read to read.
PROMPT_LAYOUTS_KEPT = 8
THOUGHT_START, THOUGHT_END = "<unused94>", "<unused95>"

INSTRUCTION = (
    "You are a radiologist reading a CT study. Below are axial slices of the study in order "
    "along the scan, each followed by its label SLICE n. Review every slice carefully."
)
_BOX_FORMAT = (
    'as JSON in a ```json block: [{"box_2d": [y0, x0, y1, x1], "label": "finding", "slice": n}] '
    "with box coordinates on a 0-1000 scale of the slice image and n the SLICE number where "
    "the finding is largest."
)


# --- Preprocessing (the official notebook's rules) --------------------------------------------


def select_slice_indices(n_slices: int, max_slices: int = MAX_SLICES) -> list[int]:
    """Indices of the slices the model sees: all of them, or ``max_slices`` spread evenly.

    The official rule: ``[int(round(i / max_slices * (n_slices - 1))) for i in 1..max_slices]``
    (it skips index 0 and keeps the last one).

    Raises
    ------
    ValueError
        If ``n_slices`` or ``max_slices`` is not a positive integer.
    """
    for name, value in (("n_slices", n_slices), ("max_slices", max_slices)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if n_slices <= max_slices:
        return list(range(n_slices))
    return [int(round(i / max_slices * (n_slices - 1))) for i in range(1, max_slices + 1)]


def ct_slice_to_rgb(hu: np.ndarray) -> np.ndarray:
    """One HU slice ``[H, W]`` as ``[H, W, 3]`` uint8: each channel one window of `WINDOWS`.

    Per channel: clip to the window, scale to 0-255 in float32, ``np.round``, cast to uint8
    (the same operations, in the same order, as the official notebook).
    """
    hu = np.asarray(hu)
    if hu.ndim != 2 or hu.size == 0:
        raise ValueError(f"ct_slice_to_rgb needs one 2D slice, got shape {hu.shape}")
    channels = []
    for low, high in WINDOWS:
        x = np.clip(hu, low, high).astype(np.float32)
        x -= low
        x /= high - low
        x *= 255.0
        channels.append(x)
    return np.round(np.stack(channels, axis=-1), 0).astype(np.uint8)


def pad_to_square(rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Zero-pad ``[H, W, C]`` to a centred ``[S, S, C]`` square, ``S = max(H, W)``.

    Returns the square and ``(top, left)``, where the original image starts in it.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or 0 in rgb.shape[:2]:
        raise ValueError(f"pad_to_square needs an [H, W, C] image, got shape {rgb.shape}")
    h, w = rgb.shape[:2]
    size = max(h, w)
    top, left = (size - h) // 2, (size - w) // 2
    square = np.zeros((size, size, rgb.shape[2]), dtype=rgb.dtype)
    square[top : top + h, left : left + w] = rgb
    return square, (top, left)


# --- Prompts ---------------------------------------------------------------------------------


def topic_question(topic: str) -> str:
    """The LLaVA-TA prompt of one topic: its findings only, each with a box."""
    if not topic or not topic.strip():
        raise ValueError("topic_question needs a topic name")
    return (
        f"Report only on the {topic}. Describe each abnormal finding of the {topic} in one sentence, "
        f"then list the findings {_BOX_FORMAT} If there is no abnormal finding of the {topic}, "
        "write one sentence saying so and no JSON."
    )


def question_prompt(question: str) -> str:
    """A question as asked: a short answer, plus a box when the answer is about a finding."""
    if not question or not question.strip():
        raise ValueError("question_prompt needs a question")
    return f"{question.strip()} Answer in a few words. If the answer refers to a finding, also give its box {_BOX_FORMAT}"


def build_messages(n_slices: int, question: str) -> list[dict[str, Any]]:
    """The official layout: one user turn of instruction, ``image, "SLICE n"`` per slice, question."""
    if isinstance(n_slices, bool) or not isinstance(n_slices, (int, np.integer)) or n_slices < 1:
        raise ValueError(f"n_slices must be a positive integer, got {n_slices!r}")
    if not question or not question.strip():
        raise ValueError("build_messages needs a question")
    return _messages(n_slices, question)


def _messages(n_slices: int, question: str) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "text", "text": INSTRUCTION}]
    for i in range(1, n_slices + 1):
        content += [{"type": "image"}, {"type": "text", "text": f"SLICE {i}"}]
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


# --- Answers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedBox:
    """One ``box_2d`` item of an answer.

    ``span`` is where its ``"box_2d": [...]`` stands in the raw text (for the entropy of
    its tokens); ``problem`` says why it cannot be placed (out of range, inverted), if so.
    """

    box_2d: tuple[float, float, float, float]
    label: str = ""
    slice: int | None = None
    span: tuple[int, int] | None = None
    problem: str | None = None


@dataclass(frozen=True)
class ParsedAnswer:
    """The sentence(s) of an answer without thought trace and JSON, its boxes, and what went wrong."""

    text: str
    boxes: tuple[ParsedBox, ...] = ()
    error: str | None = None
    thought: bool = False


_FENCE = re.compile(r"```(?:json)?[ \t]*\n?(.*?)```", re.DOTALL | re.IGNORECASE)
_BOX_KEY = re.compile(r'"box_2d"\s*:\s*\[[^\]]*\]')


def parse_answer(text: str) -> ParsedAnswer:
    """Split a model answer into its text and its ``box_2d`` items; never raises.

    A thought trace (everything up to and including the last ``<unused95>``) is dropped.
    The boxes come from the first fenced ```json block, else the first bare JSON list (or
    object) holding ``box_2d``. Malformed output leaves ``error`` set and keeps what parsed.
    """
    if not isinstance(text, str):
        return ParsedAnswer("", error=f"model output is not text but {type(text).__name__}")
    start, thought = 0, False
    end = text.rfind(THOUGHT_END)
    if end >= 0:
        start, thought = end + len(THOUGHT_END), True
    elif THOUGHT_START in text:
        return ParsedAnswer("", error="the thought trace never ended (no <unused95>), so there is no answer", thought=True)
    body = text[start:]
    errors: list[str] = []
    found = _find_json(body, errors)
    boxes: tuple[ParsedBox, ...] = ()
    if found is not None:
        lo, hi, data, json_at = found
        body_text = body[:lo] + " " + body[hi:]
        if data is not None:
            boxes = _boxes(data, body, json_at, start, errors)
    else:
        body_text = body
    clean = " ".join(body_text.replace("<end_of_turn>", " ").replace("<eos>", " ").split())
    return ParsedAnswer(clean, boxes, "; ".join(errors) or None, thought)


def _find_json(body: str, errors: list[str]) -> tuple[int, int, Any, int] | None:
    """(start, end) of the JSON part to cut from the text, its data (None if malformed), and
    where the JSON itself starts; None when the answer holds no JSON."""
    fence = _FENCE.search(body)
    if fence:
        try:
            return fence.start(), fence.end(), json.loads(fence.group(1)), fence.start(1)
        except json.JSONDecodeError as exc:
            errors.append(f"malformed JSON in the ```json block: {exc.msg} (line {exc.lineno} column {exc.colno})")
            return fence.start(), fence.end(), None, fence.start(1)
    opening = body.find("```")
    if opening >= 0:
        errors.append("unterminated ```json block (was the output cut off?)")
        return opening, len(body), None, opening
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", body):
        try:
            data, end = decoder.raw_decode(body, match.start())
        except json.JSONDecodeError:
            continue
        if _holds_boxes(data):
            return match.start(), end, data, match.start()
    if "box_2d" in body:
        errors.append("box_2d appears but not in valid JSON")
    return None


def _holds_boxes(data: Any) -> bool:
    items = data if isinstance(data, list) else [data]
    return any(isinstance(item, dict) and "box_2d" in item for item in items)


def _boxes(data: Any, body: str, json_at: int, offset: int, errors: list[str]) -> tuple[ParsedBox, ...]:
    items = data if isinstance(data, list) else [data]
    spans = [(m.start() + offset, m.end() + offset) for m in _BOX_KEY.finditer(body, json_at)]
    boxes, keyed = [], 0
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "box_2d" not in item:
            errors.append(f"item {i} is not an object with box_2d")
            continue
        span = spans[keyed] if keyed < len(spans) else None
        keyed += 1
        raw = item["box_2d"]
        if (not isinstance(raw, list) or len(raw) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in raw)):
            errors.append(f"item {i}: box_2d needs 4 numbers [y0, x0, y1, x1], got {json.dumps(raw)[:60]}")
            continue
        box = tuple(float(v) for v in raw)
        number = _slice_number(item.get("slice"))
        if item.get("slice") is not None and number is None:
            errors.append(f"item {i}: slice {json.dumps(item.get('slice'))[:30]} is not a SLICE number")
        label = item.get("label")
        boxes.append(ParsedBox(box, label.strip() if isinstance(label, str) else "", number, span, _box_problem(box)))
    return tuple(boxes)


def _slice_number(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(?:slice\s*)?(\d+)\s*", value, re.IGNORECASE)
        return int(match.group(1)) if match else None
    return None


def _box_problem(box: Sequence[float]) -> str | None:
    y0, x0, y1, x1 = box
    if not all(0 <= v <= 1000 for v in box):
        return f"box_2d {list(box)} is outside the 0-1000 range"
    if y1 <= y0 or x1 <= x0:
        return f"box_2d {list(box)} is inverted or empty: need y0 < y1 and x0 < x1"
    return None


def box_to_voxels(box_2d: Sequence[float], slice_number: int | None, selected_indices: Sequence[int],
                  image_shape_hw: tuple[int, int], pad_offset: tuple[int, int], padded_size: int,
                  n_slices: int) -> tuple[int, int, int, int, int, int]:
    """A ``box_2d`` on SLICE ``slice_number`` as a half-open voxel box ``[k0, r0, c0, k1, r1, c1]``.

    ``box_2d`` is ``[y0, x0, y1, x1]`` on 0-1000 of the padded square image (side
    ``padded_size``, the slice at ``pad_offset`` = (top, left) in it). Along k the box runs
    from the selected slice to the next selected one (at least one slice); rows and columns
    are rounded outwards and clipped to the slice.

    Raises
    ------
    ValueError
        If the box is malformed (not 4 numbers, outside 0-1000, inverted), the slice number
        is missing or not one of the SLICE labels, or the box lies wholly in the padding.
    """
    if len(box_2d) != 4:
        raise ValueError(f"box_2d needs 4 numbers [y0, x0, y1, x1], got {len(box_2d)}")
    problem = _box_problem(box_2d)
    if problem:
        raise ValueError(problem)
    if slice_number is None:
        raise ValueError("the box names no slice")
    if not 1 <= slice_number <= len(selected_indices):
        raise ValueError(f"slice {slice_number} is not one of SLICE 1..{len(selected_indices)}")
    (h, w), (top, left) = image_shape_hw, pad_offset
    y0, x0, y1, x1 = (v * padded_size / 1000 for v in box_2d)
    r0, r1 = max(0, math.floor(y0 - top)), min(h, math.ceil(y1 - top))
    c0, c1 = max(0, math.floor(x0 - left)), min(w, math.ceil(x1 - left))
    if r1 <= r0 or c1 <= c0:
        raise ValueError(f"box_2d {list(box_2d)} lies in the padding, outside the {h}x{w} slice")
    k0 = int(selected_indices[slice_number - 1])
    k1 = int(selected_indices[slice_number]) if slice_number < len(selected_indices) else n_slices
    k1 = min(max(k1, k0 + 1), n_slices)
    if not 0 <= k0 < n_slices:
        raise ValueError(f"selected slice {k0} is outside the volume's {n_slices} slices")
    return (k0, r0, c0, k1, r1, c1)


# --- Loading ---------------------------------------------------------------------------------


def _checkpoint_problem(folder: Path) -> str | None:
    if not folder.is_dir():
        return "the folder does not exist"
    files = {p.name for p in folder.iterdir()}
    missing = []
    if "config.json" not in files:
        missing.append("config.json")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return "model.safetensors.index.json is unreadable"
        missing += sorted(s for s in shards if s not in files)
    elif not any(name.endswith(".safetensors") for name in files):
        missing.append("the *.safetensors weights")
    if not {"tokenizer.json", "tokenizer.model"} & files or "tokenizer_config.json" not in files:
        missing.append("the tokenizer files (tokenizer.json, tokenizer_config.json)")
    if not {"processor_config.json", "preprocessor_config.json"} & files:
        missing.append("the processor files (processor_config.json or preprocessor_config.json)")
    return f"missing {', '.join(missing)}" if missing else None


def _checkpoint_error(folder: Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"MedGemma checkpoint {folder}: {problem}. Readout expects a local copy of {CHECKPOINT}: "
        "config.json, the *.safetensors weights (with model.safetensors.index.json when sharded), "
        "and its tokenizer and processor files (tokenizer.json, tokenizer_config.json, "
        "processor_config.json or preprocessor_config.json, chat template). Download it yourself "
        f"from Hugging Face (https://huggingface.co/{CHECKPOINT}) after accepting Google's Health AI "
        "Developer Foundations terms, and pass its folder as the model path; Readout never downloads it."
    )


def load_medgemma(model_path: Path, device: str = "cpu"):
    """Load ``(model, processor)`` from a local MedGemma folder: bf16 on CUDA, float32 on CPU.

    Raises
    ------
    CheckpointError
        If the folder is missing, incomplete or not a Gemma 3 checkpoint; the message says
        what is expected and where to get it. Nothing is ever downloaded.
    """
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    folder = Path(model_path).expanduser()
    problem = _checkpoint_problem(folder)
    if problem:
        raise _checkpoint_error(folder, problem)
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise _checkpoint_error(folder, f"config.json is unreadable ({exc})") from None
    if model_type != "gemma3":
        raise _checkpoint_error(folder, f"config.json describes a {model_type!r} model, not Gemma 3")
    from transformers.utils import is_accelerate_available

    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    # Straight onto the device when transformers can (any device_map, even one device, needs
    # accelerate, which Readout does not require); else through host memory and `.to(device)`.
    placement = {"device_map": str(device)} if is_accelerate_available() else {}
    try:
        model = Gemma3ForConditionalGeneration.from_pretrained(
            folder, dtype=dtype, local_files_only=True, attn_implementation="sdpa", **placement)
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise _checkpoint_error(folder, f"it does not load ({' '.join(str(exc).split())[:300]})") from None
    return model.to(device).eval(), processor


# --- The engine ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceLayout:
    """Which slices the model saw and how its padded square images map back to the volume."""

    selected: tuple[int, ...]
    image_shape: tuple[int, int]
    pad_offset: tuple[int, int]
    padded_size: int
    n_slices: int

    def voxels(self, box: ParsedBox) -> tuple[int, int, int, int, int, int]:
        return box_to_voxels(box.box_2d, box.slice, self.selected, self.image_shape, self.pad_offset,
                             self.padded_size, self.n_slices)


@dataclass
class Rollout:
    """One sampled answer: its text, and per generated token the entropy (nats) and the end
    of its text (``token_ends``, only filled when the text holds boxes)."""

    text: str
    entropies: list[float] = field(default_factory=list)
    token_ends: list[int] = field(default_factory=list)

    def span_entropy(self, span: tuple[int, int] | None) -> float | None:
        """Mean entropy of the tokens overlapping ``span`` of the text, None if unknown."""
        if span is None or not self.token_ends:
            return None
        starts = [0, *self.token_ends[:-1]]
        inside = [e for s, t, e in zip(starts, self.token_ends, self.entropies) if s < span[1] and t > span[0]]
        return float(np.mean(inside)) if inside else None


@dataclass
class Sampled:
    """Raw rollouts of one read, before consensus: per topic and per question."""

    layout: SliceLayout
    rollouts: dict[str, list[Rollout]]
    kept_ratio: dict[str, float] | None
    tokens: dict[str, Any]
    timings: dict[str, float]


class MedGemmaEngine:
    """Reads a Volume with a loaded MedGemma (Gemma 3) model; see the module docstring.

    Parameters
    ----------
    model, processor:
        From `load_medgemma` (or any ``Gemma3ForConditionalGeneration`` and its processor).
    max_slices:
        At most this many slices go to the model (the official 85).
    max_new_tokens:
        Generation limit per answer.
    pruning:
        Photon-style pruning of image tokens (off by default); a request with
        ``pruning=False`` turns it off for that read.
    vision_batch:
        Slices encoded per vision-tower call (bounds memory).
    """

    name = "medgemma"

    def __init__(self, model, processor, *, max_slices: int = MAX_SLICES, max_new_tokens: int = 512,
                 pruning: PruningConfig = PruningConfig(), vision_batch: int = 16) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if vision_batch < 1:
            raise ValueError(f"vision_batch must be at least 1, got {vision_batch}")
        select_slice_indices(1, max_slices)  # validates max_slices
        self.model, self.processor = model.eval(), processor
        self.decoder = Gemma3Decoder(model)
        # The processor's image steps, on the model's device (`engines.gemma_pixels`).
        self.pixel_steps = PixelSteps.of(processor.image_processor)
        self.tokenizer = processor.tokenizer
        self.max_slices, self.max_new_tokens, self.vision_batch = max_slices, max_new_tokens, vision_batch
        self.pruning = pruning
        pruning.layer_for(self.decoder.num_layers)  # validates the layer
        self.info = EngineInfo(self.name, ENGINE_VERSION)
        self.stop_ids = self._stop_ids()
        self.decoders = KeptDecoders(self.decoder, max_new_tokens=max_new_tokens, stop_ids=self.stop_ids)
        self._prompt_layouts: OrderedDict[tuple[int, tuple[str, ...]], tuple] = OrderedDict()

    @classmethod
    def from_path(cls, model_path: Path, device: str = "cpu", **kwargs) -> MedGemmaEngine:
        model, processor = load_medgemma(model_path, device)
        return cls(model, processor, **kwargs)

    def _stop_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        ids |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
        end_of_turn = self.tokenizer.convert_tokens_to_ids("<end_of_turn>")
        if end_of_turn is not None and end_of_turn != self.tokenizer.unk_token_id:
            ids.add(end_of_turn)
        return {int(i) for i in ids if i is not None}

    # --- inputs ----------------------------------------------------------------------------

    def prepare(self, hu: np.ndarray) -> tuple[SliceLayout, list[np.ndarray]]:
        """The selected slices as padded RGB squares, and how they map back to the volume."""
        if hu.ndim != 3:
            raise ValueError(f"the volume must be [k, r, c], got shape {hu.shape}")
        selected = select_slice_indices(hu.shape[0], self.max_slices)
        images, offset = [], (0, 0)
        for k in selected:
            square, offset = pad_to_square(ct_slice_to_rgb(hu[k]))
            images.append(square)
        layout = SliceLayout(tuple(selected), (hu.shape[1], hu.shape[2]), offset, images[0].shape[0], hu.shape[0])
        return layout, images

    def prompt_ids(self, n_slices: int, questions: Sequence[str]) -> tuple[list[int], list[list[int]]]:
        """Token ids of the shared image prefix and of each question's own part.

        Each full prompt is rendered and tokenized the way the processor would; the prefix is
        what every prompt (and an empty question) share, so prefix + own part is exactly the
        prompt's tokenization. The last `PROMPT_LAYOUTS_KEPT` results are kept: a server's reads
        mostly repeat their slice count and rules, and 85 slices make each prompt 22k tokens (63 ms
        to tokenize with the tests' word-level tokenizer here; a read with the default rules
        tokenizes nine).
        """
        key = (n_slices, tuple(questions))
        if key not in self._prompt_layouts:
            while len(self._prompt_layouts) >= PROMPT_LAYOUTS_KEPT:
                self._prompt_layouts.popitem(last=False)
            self._prompt_layouts[key] = self._tokenized_prompts(n_slices, questions)
        self._prompt_layouts.move_to_end(key)
        prefix, own = self._prompt_layouts[key]
        return list(prefix), [list(ids) for ids in own]

    def _tokenized_prompts(self, n_slices: int, questions: Sequence[str]) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
        rendered = [self._tokenize(_messages(n_slices, q)) for q in [*questions, ""]]
        reference = np.asarray(rendered[-1])
        length = len(reference)
        for ids in rendered[:-1]:
            ids = np.asarray(ids)
            n = min(len(ids), length)
            differ = np.nonzero(ids[:n] != reference[:n])[0]
            length = int(differ[0]) if len(differ) else n
        prefix = rendered[-1][:length]
        image_id = self.decoder.image_token_id
        expected = n_slices * int(self.model.config.mm_tokens_per_image)
        if prefix.count(image_id) != expected:
            raise RuntimeError(f"prompt layout: the shared prefix holds {prefix.count(image_id)} image tokens, expected {expected}")
        return tuple(prefix), tuple(tuple(ids[length:]) for ids in rendered[:-1])

    def _tokenize(self, messages: list[dict[str, Any]]) -> list[int]:
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        expanded = text.replace(self.processor.boi_token, self.processor.full_image_sequence)
        bos = self.tokenizer.bos_token
        add_special = not (bos is not None and text.startswith(bos))
        return list(self.tokenizer(expanded, add_special_tokens=add_special)["input_ids"])

    def _encode_images(self, images: list[np.ndarray]) -> torch.Tensor:
        features = []
        for i in range(0, len(images), self.vision_batch):
            pixels = self.pixel_steps(images[i : i + self.vision_batch], self.decoder.device)
            features.append(self.decoder.image_features(pixels))
        return torch.cat(features)

    # --- sampling --------------------------------------------------------------------------

    @torch.inference_mode()
    def sample(self, hu: np.ndarray, request: ReadRequest) -> Sampled:
        """Encode the slices and prefill once, then decode every topic and question x rollouts."""
        clock = self._clock
        t0 = clock()
        layout, images = self.prepare(hu)
        names = [*request.topics, *request.questions]
        prompts = [topic_question(t) for t in request.topics] + [question_prompt(q) for q in request.questions]
        prefix_ids, own_ids = self.prompt_ids(len(images), prompts)
        t1 = clock()
        features = self._encode_images(images)
        t2 = clock()
        pruning = self.pruning if request.pruning else PruningConfig()
        layer = pruning.layer_for(self.decoder.num_layers) if pruning.active else None
        prefix = prefill_prefix(self.decoder, torch.tensor(prefix_ids), features, layer)
        t3 = clock()
        prompted = prefill_prompts(self.decoder, prefix, own_ids, pruning)
        t4 = clock()
        out = self.decoders.decode(prompted, rollouts=request.rollouts, temperature=request.temperature,
                                   seed=request.seed)
        t5 = clock()
        rollouts: dict[str, list[Rollout]] = {name: [] for name in names}
        for row, (tokens, entropies) in enumerate(zip(out.tokens, out.entropies)):
            text = self.tokenizer.decode(tokens, skip_special_tokens=False)
            ends = self._token_ends(tokens) if "box_2d" in text else []
            rollouts[names[row // request.rollouts]].append(Rollout(text, entropies, ends))
        kept = None if prompted.kept_ratio is None else dict(zip(names, prompted.kept_ratio))
        tokens = {"slices": len(images), "prefix": len(prefix_ids), "image": prefix_ids.count(self.decoder.image_token_id),
                  "prompts": dict(zip(names, map(len, own_ids))), "generated": sum(map(len, out.tokens)),
                  "decode_steps": out.steps}
        timings = {"preprocess_s": t1 - t0, "encode_s": t2 - t1, "prefill_s": t3 - t2, "prompts_s": t4 - t3,
                   "decode_s": t5 - t4}
        return Sampled(layout, rollouts, kept, tokens, timings)

    def _clock(self) -> float:
        """Wall time once the device has finished what was queued (CUDA runs asynchronously,
        so without the sync a phase's work would be billed to the next phase that waits)."""
        if self.decoder.device.type == "cuda":
            torch.cuda.synchronize(self.decoder.device)
        return time.perf_counter()

    def _token_ends(self, tokens: list[int]) -> list[int]:
        """Where each token's text ends in the decoded answer (prefix decodes, clamped monotone)."""
        ends, last = [], 0
        for i in range(1, len(tokens) + 1):
            last = max(last, len(self.tokenizer.decode(tokens[:i], skip_special_tokens=False)))
            ends.append(last)
        return ends

    # --- grounding -------------------------------------------------------------------------

    def assemble(self, sampled: Sampled, request: ReadRequest) -> tuple[list[TopicResult], list[Answer]]:
        """Consensus findings per topic and majority answers per question, from the rollouts."""
        layout, n = sampled.layout, request.rollouts
        bins = max(layout.n_slices, *layout.image_shape)
        topics = []
        for topic in request.topics:
            candidates, texts, errors = [], [], []
            for r, rollout in enumerate(sampled.rollouts[topic]):
                parsed = parse_answer(rollout.text)
                if parsed.error:
                    errors.append(f"rollout {r}: {parsed.error}")
                placed = 0
                for i, box in enumerate(parsed.boxes):
                    try:
                        voxel = layout.voxels(box)
                    except ValueError as exc:
                        errors.append(f"rollout {r}, box {i}: {exc}")
                        continue
                    placed += 1
                    entropy = rollout.span_entropy(box.span)
                    text = _finding_sentence(parsed.text, box.label)
                    candidates.append(Candidate(r, _finding_kind(box.label, text), text, voxel,
                                                0.0 if entropy is None else entropy))
                if not placed and parsed.text:
                    texts.append(parsed.text)
            extra = self._extra(sampled, topic, errors)
            findings = [
                Finding(type=f.type, text=f.text, size_mm=_size_mm(f.text), confidence=round(f.confidence, 4),
                        box=Box(f.box),
                        extra={"agreement": round(f.agreement, 4), "mean_iou": round(f.mean_iou, 4),
                               "box_entropy": round(f.entropy, 4),
                               "high_box_entropy": f.entropy > request.entropy_threshold,
                               "label": f.members[0].type})
                for f in consensus(candidates, n, bins)
            ]
            # Normal only when most rollouts said so in a readable, box-free answer: output
            # that could not be read is not a normal finding.
            normal = not findings and 2 * len(texts) > n
            text = majority_answer(texts)[0] if normal else None
            topics.append(TopicResult(topic, normal, findings, text=text, extra=extra))

        answers = []
        for question in request.questions:
            replies, errors = [], []
            for r, rollout in enumerate(sampled.rollouts[question]):
                parsed = parse_answer(rollout.text)
                if parsed.error:
                    errors.append(f"rollout {r}: {parsed.error}")
                voxel = None
                for i, box in enumerate(parsed.boxes[:1]):
                    try:
                        voxel = layout.voxels(box)
                    except ValueError as exc:
                        errors.append(f"rollout {r}, box {i}: {exc}")
                replies.append((_normal_answer(parsed.text), voxel))
            answer, share = majority_answer([a for a, _ in replies]) if replies else ("", 0.0)
            boxes = [b for a, b in replies if a == answer and b is not None]
            box = vote_box(boxes, bins) if 2 * len(boxes) > len(replies) else None
            answers.append(Answer(question, answer, round(share, 4), Box(box) if box else None,
                                  extra=self._extra(sampled, question, errors)))
        return topics, answers

    def _reground(self, hu: np.ndarray, topic: str, finding: Finding, request: ReadRequest) -> None:
        """MedVR's re-look: ask the topic again on a zoomed crop around an uncertain box.

        The crop is shown at the model's full image size, so the box is redrawn at a finer
        scale; the re-look's box of the same kind that overlaps the first one most replaces it.
        """
        region = _zoom_region(finding.box.voxel, hu.shape)
        crop = hu[region[0]:region[3], region[1]:region[4], region[2]:region[5]]
        zoomed = replace(request, topics=(topic,), questions=(), reground=False)
        [again], _ = self.assemble(self.sample(crop, zoomed), zoomed)
        shifted = [tuple(v + region[i % 3] for i, v in enumerate(f.box.voxel)) for f in again.findings
                   if f.type == finding.type and f.box is not None]
        best = max(shifted, key=lambda b: iou3d(b, finding.box.voxel), default=None)
        finding.extra["regrounded"] = best is not None and iou3d(best, finding.box.voxel) > 0
        if finding.extra["regrounded"]:
            finding.extra["box_before_regrounding"] = list(finding.box.voxel)
            finding.box = Box(best)

    @staticmethod
    def _extra(sampled: Sampled, name: str, errors: list[str]) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if sampled.kept_ratio is not None:
            extra["kept_ratio"] = round(sampled.kept_ratio[name], 4)
        if errors:
            extra["error"] = "; ".join(errors)[:2000]
        return extra

    def run(self, volume: Volume, request: ReadRequest = ReadRequest()) -> StudyResult:
        """Read ``volume``: findings by topic, answers, timings and token counts in ``extra``."""
        sampled = self.sample(volume.hu, request)
        t0 = time.perf_counter()
        topics, answers = self.assemble(sampled, request)
        sampled.timings["assemble_s"] = time.perf_counter() - t0
        if request.reground:
            t0 = time.perf_counter()
            for topic in topics:
                for finding in topic.findings:
                    if finding.extra.get("high_box_entropy"):
                        self._reground(volume.hu, topic.topic, finding, request)
            sampled.timings["reground_s"] = time.perf_counter() - t0
        pruning = self.pruning if request.pruning else PruningConfig()
        kept = list((sampled.kept_ratio or {}).values())
        return StudyResult(
            series_instance_uid=volume.series_instance_uid, engine=self.info, topics=topics, answers=answers,
            extra={"timings": {k: round(v, 3) for k, v in sampled.timings.items()},
                   "tokens": sampled.tokens, "slice_indices": list(sampled.layout.selected),
                   "rollouts": request.rollouts,
                   "pruning": {"keep": pruning.keep, "keep_value": pruning.keep_value, "min_keep": pruning.min_keep,
                               "layer": pruning.layer_for(self.decoder.num_layers) if pruning.active else None,
                               "scope": pruning.scope},
                   "mean_kept_ratio": round(float(np.mean(kept)), 4) if kept else None},
        )


def _zoom_region(box: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    """The box grown by half its size on every side (at least 4 slices and 32 pixels), in the volume."""
    region = []
    for axis, floor in zip(range(3), (4, 32, 32)):
        start, stop = box[axis], box[axis + 3]
        grow = max((stop - start) // 2, floor)
        region.append((max(0, start - grow), min(shape[axis], stop + grow)))
    return tuple(a for a, _ in region) + tuple(b for _, b in region)


def _finding_sentence(text: str, label: str) -> str:
    """The answer's sentence that names ``label``, else the label itself, else the whole text."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    if label:
        for sentence in sentences:
            if label.lower() in sentence.lower():
                return sentence
        return label[0].upper() + label[1:] + ("" if label.endswith(".") else ".")
    return sentences[0] if sentences else "Finding."


def _finding_kind(label: str, text: str) -> str:
    """A known finding type named by the label (or sentence), else the label itself."""
    for words in (label, text):
        kind = finding_type(words)
        if kind != "lesion":
            return kind
    cleaned = " ".join(label.lower().split())[:64]
    return cleaned or "finding"


def _size_mm(text: str) -> float | None:
    match = re.search(r"(\d+(?:\.\d+)?)\s*mm\b", text)
    return float(match.group(1)) if match and float(match.group(1)) > 0 else None


def _normal_answer(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .")
