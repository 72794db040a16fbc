"""Benchmark: one MedGemma-1.5-4B study on the GPU, naive HF path vs Readout's path (issue 5, section 3).

A ``Gemma3ForConditionalGeneration`` with MedGemma 1.5 4B's shapes and random weights is built
directly on the device (nothing is downloaded; no processor: the input ids are built here with
the official layout, 256 image tokens per slice between <start_of_image> and <end_of_image>,
each slice followed by "SLICE n"). One study: 85 slices, 5 topics x 128 new tokens.

(a) naive: HF ``generate`` with the dynamic cache, one topic at a time; every topic encodes the
    slices and prefills the whole prompt again.
(b) Readout: bf16, SDPA, slices encoded once, image prefix prefilled once
    (``engines.medgemma_pruning.prefill_prefix``), the 5 topics batched on it
    (``prefill_prompts``), greedy decoding with the engine's decoder
    (``engines.medgemma_decode.StaticDecoder``: fixed-size key/value buffers, one step captured
    as a CUDA graph).
(c) (b) with Photon-style pruning, ``PruningConfig(keep="ratio", keep_value=0.5 / 0.25)``: each
    prompt keeps its own image tokens (``scope="prompt"``, the engine's default).
(c') the same with ``scope="shared"``: one set for all prompts (their mean saliency), so the
    layers after the pruning layer run on the prefix once; prefill only.

Per path: vision encode, prefill, decode and total (median of ``--repeats`` after a warm-up),
decode per step at batch 8 (5 topics + 3 questions; on (b) also x 5 sampled rollouts, batch 40),
peak memory; PASS/MISS against the targets. Probes: SDPA kernels on the prefill's shape (GPU), and
the vision encode with each SDPA kernel and at other slices per call.

    python bench/gpu_medgemma.py                 # GPU, real shapes (< 6 min on an H100)
    python bench/gpu_medgemma.py --toy           # tiny shapes, CPU in seconds; prints only
    python bench/gpu_medgemma.py --from-json F   # render and record a saved run (no model)

Writes the raw figures to ``--json`` (default ``$OUT/gpu_medgemma.json`` when ``OUT`` is set,
else ``bench/out/gpu_medgemma.json``) after every stage, so a run cut short still leaves what it
measured; real-shape runs also write the Markdown next to it and append it to bench/RESULTS.md.
Imports only torch, transformers, ``engines.medgemma_pruning`` and ``engines.medgemma_decode``
(no pydicom, jsonschema).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import transformers  # noqa: E402
from transformers import (  # noqa: E402
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    SiglipVisionConfig,
)

from engines.medgemma_decode import StaticDecoder  # noqa: E402
from engines.medgemma_pruning import (  # noqa: E402
    Gemma3Decoder,
    Prompted,
    PruningConfig,
    prefill_prefix,
    prefill_prompts,
)

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## MedGemma GPU path (bench/gpu_medgemma.py)"
TARGETS = {"study_s": 2.5, "decode_b8_ms": 10.0, "prefill_cut_25": 3.0}
GIB = 1024**3


# --- Shapes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shapes:
    """One study's sizes and the special token ids of the model."""

    slices: int
    topics: int
    questions: int
    new_tokens: int
    repeats: int
    b8_steps: int  # decode steps timed for the batch-8 figures
    rollouts: int  # sampled rollouts per prompt of the batch-8 x rollouts figure
    vision_batch: int
    text_ids: tuple[int, int]  # arbitrary "word" ids are drawn from this range
    bos: int = 2
    start_of_turn: int = 105
    end_of_turn: int = 106
    newline: int = 107
    double_newline: int = 108


REAL = Shapes(slices=85, topics=5, questions=3, new_tokens=128, repeats=3, b8_steps=64, rollouts=5,
              vision_batch=16, text_ids=(1000, 250_000))
TOY = Shapes(slices=4, topics=5, questions=3, new_tokens=8, repeats=2, b8_steps=6, rollouts=5,
             vision_batch=16, text_ids=(10, 390), start_of_turn=5, end_of_turn=6, newline=7, double_newline=8)


def real_config() -> Gemma3Config:
    """google/medgemma-1.5-4b-it's config.json values (Gemma 3 4B + 400M SigLIP at 896 px)."""
    text = Gemma3TextConfig(
        vocab_size=262_208, hidden_size=2560, intermediate_size=10_240, num_hidden_layers=34,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072, rms_norm_eps=1e-6,
        sliding_window=1024, sliding_window_pattern=6,  # 5 local : 1 global
        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    vision = SiglipVisionConfig(image_size=896, patch_size=14, hidden_size=1152, intermediate_size=4304,
                                num_hidden_layers=27, num_attention_heads=16, layer_norm_eps=1e-6,
                                hidden_act="gelu_pytorch_tanh", vision_use_head=False)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256,
                        boi_token_index=255_999, eoi_token_index=256_000, image_token_index=262_144)


def toy_config() -> Gemma3Config:
    """The real architecture at toy sizes (like tests/tiny_gemma.py): 4 decoder layers, 16 tokens per image."""
    text = Gemma3TextConfig(
        vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    vision = SiglipVisionConfig(image_size=64, patch_size=8, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2, vision_use_head=False)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16,
                        boi_token_index=397, eoi_token_index=398, image_token_index=399)


def build_model(config: Gemma3Config, device: torch.device, dtype: torch.dtype) -> Gemma3ForConditionalGeneration:
    """Random weights, allocated and initialized on ``device``."""
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma3ForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    with torch.no_grad():
        # Gemma 3 starts the projector at zero (every image token the same); unit-scale soft
        # tokens make the image content matter, as trained weights do (and pruning has to choose).
        projector = model.model.multi_modal_projector.mm_input_projection_weight
        projector.normal_(0.0, projector.shape[0] ** -0.5)
    generation = model.generation_config
    generation.eos_token_id, generation.pad_token_id = None, 0  # always generate every token
    return model


# --- Inputs ------------------------------------------------------------------------------------


@dataclass
class StudyInputs:
    prefix: list[int]  # instruction + per slice image block and "SLICE n"
    topics: list[list[int]]  # each topic's own part: question + end of turn + model turn
    questions: list[list[int]]
    pixel_values: torch.Tensor  # [slices, 3, S, S]
    image_token_id: int

    @property
    def image_tokens(self) -> int:
        return self.prefix.count(self.image_token_id)


def build_inputs(model, shapes: Shapes, device: torch.device, dtype: torch.dtype, seed: int = 0) -> StudyInputs:
    """Token ids in the official layout with arbitrary ids for the words, and random pixels."""
    config = model.config
    g = torch.Generator().manual_seed(seed)
    low, high = shapes.text_ids

    def words(n: int) -> list[int]:
        return torch.randint(low, high, (n,), generator=g).tolist()

    user, slice_word, digits = words(1), words(1), words(10)
    prefix = [shapes.bos, shapes.start_of_turn, *user, shapes.newline, *words(40)]  # instruction
    for n in range(1, shapes.slices + 1):
        prefix += [shapes.double_newline, config.boi_token_id, *[config.image_token_id] * config.mm_tokens_per_image,
                   config.eoi_token_id, shapes.double_newline, *slice_word, *(digits[int(d)] for d in str(n))]
    model_word = words(1)
    suffix = [shapes.end_of_turn, shapes.newline, shapes.start_of_turn, *model_word, shapes.newline]
    topics = [words(28 + 2 * i) + suffix for i in range(shapes.topics)]  # unequal lengths: padding is exercised
    questions = [words(18 + 3 * i) + suffix for i in range(shapes.questions)]
    size = config.vision_config.image_size
    pixels = (torch.rand(shapes.slices, 3, size, size, generator=g) * 2 - 1).to(device, dtype)
    return StudyInputs(prefix, topics, questions, pixels, config.image_token_id)


# --- Timing ------------------------------------------------------------------------------------


class Clock:
    """Marks on the device's timeline: CUDA events on a GPU (read after a synchronize), else wall time."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        return end - start


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GIB, 2) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


COUNTS = {"vision_encodes": 0, "prefix_prefills": 0, "prompt_rows": 0}


def encode_slices(decoder: Gemma3Decoder, pixel_values: torch.Tensor, batch: int) -> torch.Tensor:
    """Soft tokens of every slice, ``batch`` slices per vision-tower call (as the engine does)."""
    COUNTS["vision_encodes"] += 1
    return torch.cat([decoder.image_features(pixel_values[i : i + batch]) for i in range(0, len(pixel_values), batch)])


def counted_prefix(decoder: Gemma3Decoder, ids: list[int], features: torch.Tensor, layer: int | None):
    COUNTS["prefix_prefills"] += 1
    return prefill_prefix(decoder, torch.tensor(ids), features, layer)


# --- The measurements --------------------------------------------------------------------------


class Run:
    """The figures of one invocation, written to JSON after every stage."""

    def __init__(self, path: Path, meta: dict) -> None:
        self.path = path
        self.data = {**meta, "complete": False, "stages": {}, "errors": [], "skipped": []}
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)

    def log(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {text}", flush=True)

    def error(self, stage: str, exc: BaseException) -> None:
        line = f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
        self.data["errors"].append({"stage": stage, "error": line})
        self.log(f"{stage} FAILED: {line}")
        traceback.print_exc(limit=4)
        self.save()
        gc.collect()  # an out-of-memory stage must not leave its tensors to the next one
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def sdpa_probe(device: torch.device, dtype: torch.dtype, n: int = 4096) -> dict:
    """Which SDPA kernels take a boolean mask at head_dim 256 (the prefill's case), and how fast."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, dim = 8, 256
    q, k, v = (torch.randn(1, heads, n, dim, device=device, dtype=dtype) for _ in range(3))
    mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]
    out = {"shape": [1, heads, n, dim]}
    clock = Clock(device)
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    with warnings.catch_warnings():  # a refusing kernel explains itself at length
        warnings.simplefilter("ignore")
        for label, use_mask in (("bool_mask", True), ("is_causal", False)):
            def call(use_mask: bool = use_mask) -> torch.Tensor:
                if use_mask:
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

            row = {}
            for name, backend in [("default", None), *backends.items()]:
                try:
                    timings = []
                    for _ in range(6):  # the first is a warm-up
                        start = clock.mark()
                        if backend is None:
                            call()
                        else:
                            with sdpa_kernel([backend]):
                                call()
                        timings.append(clock.seconds(start, clock.mark()))
                    row[name] = round(median(timings[1:]) * 1000, 3)
                except Exception as exc:  # noqa: BLE001 - a kernel that refuses is the finding
                    row[name] = f"refused: {' '.join(str(exc).split())[:120]}"
            out[label + "_ms"] = row
    return out


def vision_probe(decoder: Gemma3Decoder, inputs: StudyInputs, shapes: Shapes, device: torch.device) -> dict:
    """Seconds to encode every slice (SigLIP: no mask, head_dim 72) with each SDPA kernel, and with
    the default kernel at other slices per vision-tower call: the vision encode was half of (b)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    clock = Clock(device)
    pixels = inputs.pixel_values

    def timed(batch: int, backend: SDPBackend | None = None) -> float | str:
        try:
            timings = []
            for _ in range(3):  # the first is a warm-up
                start = clock.mark()
                with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                    for i in range(0, len(pixels), batch):
                        decoder.image_features(pixels[i : i + batch])
                timings.append(clock.seconds(start, clock.mark()))
            return round(median(timings[1:]), 4)
        except Exception as exc:  # noqa: BLE001 - a kernel that refuses is the finding
            return f"refused: {' '.join(str(exc).split())[:120]}"

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION}
    with warnings.catch_warnings():  # a refusing kernel explains itself at length
        warnings.simplefilter("ignore")
        by_kernel = {"default": timed(shapes.vision_batch), **{k: timed(shapes.vision_batch, b) for k, b in backends.items()}}
        by_batch = {str(b): timed(b) for b in sorted({shapes.vision_batch // 2, shapes.vision_batch * 2, len(pixels)})}
    # Were every kernel as fast as another, the tower would not be attending through SDPA at all.
    return {"slices": len(pixels), "batch": shapes.vision_batch, "attention": decoder.model.config.vision_config._attn_implementation,
            "by_kernel_s": by_kernel, "default_kernel_by_batch_s": by_batch}


def readout_study(decoder: Gemma3Decoder, inputs: StudyInputs, shapes: Shapes, pruning: PruningConfig,
                  clock: Clock, *, static: StaticDecoder | None = None,
                  graph: bool = False, decode_steps: bool = True) -> tuple[dict, StaticDecoder | None, Prompted]:
    """One study on Readout's path; returns its phase times and the engine's decoder (made on first
    use: its buffers, and graph, are reused by the next studies, as a server would)."""
    before = dict(COUNTS)
    layer = pruning.layer_for(decoder.num_layers) if pruning.active else None
    t0 = clock.mark()
    features = encode_slices(decoder, inputs.pixel_values, shapes.vision_batch)
    t1 = clock.mark()
    COUNTS["prompt_rows"] += len(inputs.topics)
    prefix = counted_prefix(decoder, inputs.prefix, features, layer)
    t2 = clock.mark()
    prompted = prefill_prompts(decoder, prefix, inputs.topics, pruning)
    t3 = clock.mark()
    if decode_steps:
        if static is None:
            static = StaticDecoder(decoder, prompted, max_new_tokens=shapes.new_tokens, graph=graph)
        else:
            static.load(prompted)
        static.run()  # no stop ids: every token is decoded
    t4 = clock.mark()
    times = {"vision_s": clock.seconds(t0, t1), "prefill_s": clock.seconds(t1, t3), "decode_s": clock.seconds(t3, t4),
             "total_s": clock.seconds(t0, t4),
             "prefix_prefill_s": clock.seconds(t1, t2), "prompts_prefill_s": clock.seconds(t2, t3)}
    times["counts"] = {k: COUNTS[k] - before[k] for k in COUNTS}
    return times, static, prompted


def summarize(runs: list[dict]) -> dict:
    keys = [k for k in runs[0] if k.endswith("_s")]
    out = {k: round(median([r[k] for r in runs]), 4) for k in keys}
    out["runs"] = [{k: round(r[k], 4) for k in keys} for r in runs]
    out["counts_per_study"] = runs[-1]["counts"]
    return out


def measure_readout(run: Run, key: str, decoder: Gemma3Decoder, inputs: StudyInputs, shapes: Shapes,
                    pruning: PruningConfig, clock: Clock, device: torch.device, use_graph: bool) -> None:
    """(b) or (c): warm-up + repeats of one study; then decode per step at batch 8 (each with its own peak)."""
    reset_peak(device)
    stage: dict = {"keep": pruning.keep_value if pruning.active else 1.0, "rule": pruning.keep,
                   "scope": pruning.scope}
    run.data["stages"][key] = stage
    # The shared scope is measured for its prefill; its decode is (c)'s (same context length).
    decode_steps = not (pruning.active and pruning.scope == "shared")
    times, static, prompted = readout_study(decoder, inputs, shapes, pruning, clock, graph=use_graph,
                                            decode_steps=decode_steps)
    stage["warmup_s"] = round(times["total_s"], 3)
    if static is not None:
        stage["decode_impl"] = decode_impl(static)
        stage["static_slots"] = decoder_slots(static)
        if static.capture_error:
            stage["capture_error"] = static.capture_error
    stage["kept_ratio"] = prompted.kept_ratio
    stage["context_slots"] = prompted.cache.length
    del prompted
    runs = []
    for _ in range(shapes.repeats):
        times, static, prompted = readout_study(decoder, inputs, shapes, pruning, clock, static=static,
                                                decode_steps=decode_steps)
        runs.append(times)
        del prompted
    stage.update(summarize(runs))
    if static is not None:
        stage["decode_ms_per_step"] = round(stage["decode_s"] / max(1, shapes.new_tokens - 1) * 1000, 3)
        stage["decode_batch"] = static.rows
    del static
    stage["peak_gib"] = peak_gib(device)
    run.log(f"{key}: " + ", ".join(f"{k} {stage[k]:.3f}" for k in ("vision_s", "prefill_s", "decode_s", "total_s")
                                   if k in stage) + f"; kept {stage['kept_ratio']}")
    run.save()
    if not decode_steps:
        return
    # Batch 8 (5 topics + 3 questions); on (b) also with sampled rollouts (MedVR), 8 x rollouts rows.
    prompts = inputs.topics + inputs.questions
    for name, rollouts in (("batch8", 1), ("batch8_rollouts", shapes.rollouts)):
        if rollouts > 1 and key != "b":
            continue
        try:
            reset_peak(device)
            stage[name] = time_batch8(decoder, inputs, prompts, shapes, pruning, clock, use_graph, rollouts=rollouts)
            stage[name]["peak_gib"] = peak_gib(device)
            run.log(f"{key}: batch {len(prompts)} x {rollouts} decode {stage[name]}")
        except Exception as exc:  # noqa: BLE001
            run.error(f"{key}/{name}", exc)
    run.save()


_FEATURES: dict[int, torch.Tensor] = {}


def _prompted(decoder: Gemma3Decoder, inputs: StudyInputs, prompts: list[list[int]], pruning: PruningConfig,
              shapes: Shapes) -> Prompted:
    """Prompts prefilled on the study's prefix, outside the timed studies (slices encoded once, kept)."""
    key = id(inputs.pixel_values)
    if key not in _FEATURES:
        _FEATURES[key] = encode_slices(decoder, inputs.pixel_values, shapes.vision_batch)
    features = _FEATURES[key]
    layer = pruning.layer_for(decoder.num_layers) if pruning.active else None
    prefix = counted_prefix(decoder, inputs.prefix, features, layer)
    return prefill_prompts(decoder, prefix, prompts, pruning)


def decoder_slots(static: StaticDecoder) -> dict:
    """Key/value slots of the engine's decoder: per row for each layer kind, plus the global layers'
    shared part (``shared`` slots, one copy per ``groups`` rows)."""
    return {**static.context_slots, "shared": static.shared_slots, "groups": static.groups}


def decode_impl(static: StaticDecoder, compiled: bool = False) -> str:
    return ("static cache + CUDA graph" if static.graph is not None else "static cache, eager") + (
        " + torch.compile" if compiled else "")


def time_batch8(decoder: Gemma3Decoder, inputs: StudyInputs, prompts: list[list[int]], shapes: Shapes,
                pruning: PruningConfig, clock: Clock, use_graph: bool, compile_step: bool = False,
                rollouts: int = 1) -> dict:
    """ms per step of the engine's decoder at batch ``len(prompts) x rollouts`` (sampled at
    temperature 1 when ``rollouts > 1``, as MedVR reads; greedy otherwise; no stop token)."""
    steps = shapes.b8_steps
    prompted = _prompted(decoder, inputs, prompts, pruning, shapes)
    t0 = time.perf_counter()
    static = StaticDecoder(decoder, prompted, rollouts=rollouts, max_new_tokens=steps + 1, temperature=1.0,
                           graph=use_graph, compile_step=compile_step, release=True)
    setup_s = time.perf_counter() - t0
    del prompted
    per_step = []
    for _ in range(shapes.repeats):
        start = clock.mark()
        static.run()
        per_step.append(clock.seconds(start, clock.mark()) / steps * 1000)
    out = {"batch": static.rows, "static_ms_per_step": round(median(per_step), 3),
           "static_impl": decode_impl(static, compile_step), "sampled": static.sample, "setup_s": round(setup_s, 2),
           "static_slots": decoder_slots(static)}
    if static.capture_error:
        out["capture_error"] = static.capture_error
    return out


def measure_naive(run: Run, model, inputs: StudyInputs, shapes: Shapes, clock: Clock, device: torch.device,
                  budget_s: float) -> None:
    """(a) HF generate, dynamic cache, one topic at a time (each re-encodes and re-prefills)."""
    reset_peak(device)
    stage: dict = {"decode_impl": "HF generate, dynamic cache, batch 1"}
    run.data["stages"]["naive"] = stage
    image_id = model.config.image_token_id
    calls = {"n": 0, "prefills": 0}
    inner = model.model.get_image_features

    @functools.wraps(inner)  # generate reads its signature to find the pixel arguments
    def counted(*args, **kwargs):
        calls["n"] += 1
        return inner(*args, **kwargs)

    model.model.get_image_features = counted

    def count_prefill(module, args, kwargs) -> None:  # a language-model call on more than one token
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and embeds.shape[1] > 1:
            calls["prefills"] += 1

    hook = model.model.language_model.register_forward_pre_hook(count_prefill, with_kwargs=True)

    def generate(own: list[int], new: int) -> tuple[float, int]:
        ids = torch.tensor([inputs.prefix + own], device=device)
        start = clock.mark()
        out = model.generate(input_ids=ids, pixel_values=inputs.pixel_values, attention_mask=torch.ones_like(ids),
                             token_type_ids=(ids == image_id).long(), max_new_tokens=new, do_sample=False)
        return clock.seconds(start, clock.mark()), out.shape[1] - ids.shape[1]

    try:
        generate(inputs.topics[0], 2)  # warm-up
        vision = []
        for _ in range(2):
            start = clock.mark()
            model.model.get_image_features(inputs.pixel_values)
            vision.append(clock.seconds(start, clock.mark()))
        first = [generate(inputs.topics[0], 1)[0] for _ in range(2)]
        calls["n"] = calls["prefills"] = 0
        topic_times, generated = [], []
        deadline = run.t0 + budget_s
        for i, own in enumerate(inputs.topics):
            seconds, n = generate(own, shapes.new_tokens)
            topic_times.append(seconds)
            generated.append(n)
            run.log(f"naive: topic {i + 1} {seconds:.2f} s ({n} tokens)")
            # Every topic is the same work; stop early rather than run out of time.
            if time.perf_counter() + seconds > deadline and i + 1 < len(inputs.topics):
                run.data["skipped"].append(f"naive: {len(inputs.topics) - i - 1} topics extrapolated (time budget)")
                break
        per_topic = median(topic_times)
        vision_s, first_s = median(vision), median(first)
        # Prefill and decode are differences of separately timed runs. On a tiny model (the toy run)
        # or a busy machine the noise can exceed a phase: a phase is then 0, never negative.
        prefill_s, decode_topic_s = max(0.0, first_s - vision_s), max(0.0, per_topic - first_s)
        stage.update({
            "vision_s": round(vision_s, 4), "prefill_s": round(prefill_s, 4),
            "decode_s": round(decode_topic_s * len(inputs.topics), 4),
            "decode_ms_per_step": round(decode_topic_s / max(1, shapes.new_tokens - 1) * 1000, 3),
            "topic_total_s": round(per_topic, 4), "total_s": round(per_topic * len(inputs.topics), 4),
            "topics_measured": len(topic_times), "topic_runs_s": [round(t, 3) for t in topic_times],
            "generated_tokens": generated,
            "counts_per_study": {k: calls[c] * len(inputs.topics) // len(topic_times)
                                 for k, c in (("vision_encodes", "n"), ("prefix_prefills", "prefills"))},
            "phases_note": "vision and prefill are per topic; x5 per study",
        })
        stage["vision_study_s"] = round(vision_s * len(inputs.topics), 4)
        stage["prefill_study_s"] = round(prefill_s * len(inputs.topics), 4)
    finally:
        model.model.get_image_features = inner
        hook.remove()
    stage["peak_gib"] = peak_gib(device)
    run.log(f"naive: study {stage['total_s']:.2f} s (per topic {stage['topic_total_s']:.2f} s)")
    run.save()


def measure_hf_static(run: Run, model, decoder: Gemma3Decoder, inputs: StudyInputs, shapes: Shapes, clock: Clock,
                      device: torch.device) -> None:
    """HF generate with cache_implementation="static" on 8 copies of one prompt (decode per step only)."""
    reset_peak(device)
    stage: dict = {"decode_impl": 'HF generate, cache_implementation="static" (auto torch.compile)'}
    run.data["stages"]["hf_static"] = stage
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    # generate takes no inputs_embeds for Gemma 3: the slices' features go in pre-encoded (once).
    ids = torch.tensor([inputs.prefix + inputs.topics[0]] * 8, device=device)
    features = encode_slices(decoder, inputs.pixel_values, shapes.vision_batch)
    encoded = {"image": BaseModelOutputWithPooling(pooler_output=features.repeat(8, 1, 1))}
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_encoder_outputs": encoded,
              "token_type_ids": (ids == model.config.image_token_id).long(), "do_sample": False,
              "cache_implementation": "static"}
    steps = shapes.b8_steps
    t0 = time.perf_counter()
    model.generate(**kwargs, max_new_tokens=4)  # compilation
    stage["first_call_s"] = round(time.perf_counter() - t0, 1)

    def timed(new: int) -> float:
        start = clock.mark()
        model.generate(**kwargs, max_new_tokens=new)
        return clock.seconds(start, clock.mark())

    one, many = timed(1), timed(steps + 1)
    stage.update({"batch": 8, "prefill_batch8_s": round(one, 3), "ms_per_step": round((many - one) / steps * 1000, 3)})
    stage["peak_gib"] = peak_gib(device)
    run.log(f"hf_static: {stage}")
    run.save()


def check_decoder(model, decoder: Gemma3Decoder, inputs: StudyInputs, shapes: Shapes, use_graph: bool) -> dict:
    """The engine's decoder on the topics against HF ``generate`` on the first one (greedy tokens
    and entropies), and its CUDA graph against its eager steps."""
    steps = min(shapes.new_tokens, 16)
    static = StaticDecoder(decoder, _prompted(decoder, inputs, inputs.topics, PruningConfig(), shapes),
                           max_new_tokens=steps, graph=use_graph, release=True)
    ours = static.run()
    ids = torch.tensor([inputs.prefix + inputs.topics[0]], device=decoder.device)
    theirs = model.generate(input_ids=ids, pixel_values=inputs.pixel_values, attention_mask=torch.ones_like(ids),
                            token_type_ids=(ids == inputs.image_token_id).long(), max_new_tokens=steps,
                            do_sample=False, output_logits=True, return_dict_in_generate=True)
    probs = torch.softmax(torch.stack([logits[0] for logits in theirs.logits]).float(), -1)
    entropy = -(probs * probs.clamp(min=1e-30).log()).sum(-1)
    theirs_tokens = theirs.sequences[0, ids.shape[1]:].tolist()
    out = {"steps": steps, "first_topic_equals_generate": ours.tokens[0] == theirs_tokens,
           "tokens_matching_generate": sum(a == b for a, b in zip(ours.tokens[0], theirs_tokens)),
           "max_entropy_diff_vs_generate": (torch.tensor(ours.entropies[0]) - entropy.cpu()).abs().max().item(),
           "graph": static.graph is not None}
    if static.capture_error:
        out["capture_error"] = static.capture_error
    if static.graph is not None:  # the graph must replay the eager step exactly
        static.graph = None
        static.load(_prompted(decoder, inputs, inputs.topics, PruningConfig(), shapes), release=True)
        out["graph_equals_eager"] = static.run().tokens == ours.tokens
    return out


def check_shared_keep(decoder: Gemma3Decoder, inputs: StudyInputs, shapes: Shapes, pruning: PruningConfig) -> dict:
    """With one prompt, ``scope="shared"`` must give what ``scope="prompt"`` gives (at this dtype)."""
    one = inputs.topics[:1]
    shared = _prompted(decoder, inputs, one, replace(pruning, scope="shared"), shapes)
    per_prompt = _prompted(decoder, inputs, one, replace(pruning, scope="prompt"), shapes)
    diff = (shared.next_logits - per_prompt.next_logits).abs().max().item()
    return {"max_logit_diff": diff, "kept": shared.kept_ratio[0], "engine_kept": per_prompt.kept_ratio[0],
            "cache_slots": [shared.cache.length, per_prompt.cache.length]}


# --- Report ------------------------------------------------------------------------------------


def targets(data: dict) -> list[dict]:
    stages = data.get("stages", {})
    b = stages.get("b", {})
    rows = []
    value = b.get("total_s")
    rows.append({"target": "(b) study <= 2.5 s", "value": value, "unit": "s",
                 "pass": None if value is None else value <= TARGETS["study_s"]})
    b8 = b.get("batch8", {})
    candidates = [v for v in (b8.get("static_ms_per_step"), stages.get("b_compiled", {}).get("static_ms_per_step"))
                  if v is not None]
    value = min(candidates) if candidates else None
    rows.append({"target": "decode <= 10 ms/step at batch 8", "value": value, "unit": "ms",
                 "pass": None if value is None else value <= TARGETS["decode_b8_ms"]})
    for key, label in (("c25", "(c) prefill cut >= 3x at 25% kept"),
                       ("c25_shared", "(c') shared keep, prefill cut >= 3x at 25% kept")):
        stage = stages.get(key, {})
        value = (b["prefill_s"] / stage["prefill_s"]) if "prefill_s" in b and stage.get("prefill_s") else None
        if key == "c25_shared" and not stage:
            continue
        rows.append({"target": label, "value": None if value is None else round(value, 2), "unit": "x",
                     "pass": None if value is None else value >= TARGETS["prefill_cut_25"]})
    return rows


def _f(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else str(value)


def render(data: dict) -> str:
    stages = data.get("stages", {})
    cfg = data.get("shapes", {})
    head = (f"{data.get('date', '?')}; {data.get('device', '?')}, torch {data.get('torch', '?')}, transformers "
            f"{data.get('transformers', '?')}, Python {data.get('python', '?')}; code {data.get('commit', '?')}; "
            f"`{data.get('command', '?')}`; {'toy shapes' if data.get('toy') else 'MedGemma-1.5-4B shapes'}, random "
            f"weights, {data.get('dtype', '?')}, SDPA; {cfg.get('slices')} slices ({data.get('prefix_tokens')} prefix "
            f"tokens, {data.get('image_tokens')} image), {cfg.get('topics')} topics x {cfg.get('new_tokens')} new "
            f"tokens (greedy, no early stop); median of {cfg.get('repeats')} after a warm-up; {data.get('elapsed_s')} s "
            f"in all, model ({_f(data.get('params', 0) / 1e9)} B parameters) built on the device in "
            f"{data.get('build_s')} s{'' if data.get('complete') else '; INCOMPLETE: cut short, see the JSON'}.")
    lines = [("| path | vision s | prefill s | decode s | total s | decode ms/step (batch) | image tokens kept | "
              "vision encodes / prefix prefills per study | peak GiB |"), "|---|" + "---|" * 8]
    rows = [("naive", "(a) naive: HF generate, dynamic cache, topic by topic"),
            ("b", "(b) Readout: prefix prefilled once, topics batched"),
            ("c50", "(c) (b) + pruning, 50% kept"), ("c25", "(c) (b) + pruning, 25% kept"),
            ("c50_shared", "(c') (c) with scope=\"shared\", 50% kept"),
            ("c25_shared", "(c') (c) with scope=\"shared\", 25% kept")]
    for key, label in rows:
        s = stages.get(key)
        if not s:
            continue
        if key == "naive":
            vision, prefill = s.get("vision_study_s"), s.get("prefill_study_s")
            batch, kept = 1, "100%"
        else:
            vision, prefill = s.get("vision_s"), s.get("prefill_s")
            batch = s.get("decode_batch", "-")
            kept = "100%" if s.get("keep", 1.0) == 1.0 else (
                f"{statistics.mean(s['kept_ratio']):.0%}" if s.get("kept_ratio") else "-")
        counts = s.get("counts_per_study", {})
        step = s.get("decode_ms_per_step")
        decode_s = s.get("decode_s") if "decode_ms_per_step" in s else None
        total = s.get("total_s") if "decode_ms_per_step" in s else None
        impl = f" ({s['decode_impl']})" if s.get("decode_impl") and key != "naive" else ""
        lines.append(f"| {label}{impl} | {_f(vision)} | {_f(prefill, 3)} | {_f(decode_s)} | {_f(total)} | "
                     f"{_f(step)} ({batch}) | {kept} | {counts.get('vision_encodes', '-')} / "
                     f"{counts.get('prefix_prefills', '-')} | {_f(s.get('peak_gib'), 1)} |")
    out = [head, "", *lines]
    b8_rows = ["| path | batch | ms/step | key/value slots: global layers (shared x copies + per row) / sliding "
               "layers (per row) | peak GiB |", "|---|---|---|---|---|"]
    for key, name in (("b", "batch8"), ("b", "batch8_rollouts"), ("c50", "batch8"), ("c25", "batch8"),
                      ("b_compiled", None)):
        s = stages.get(key, {})
        b8 = s.get(name, {}) if name else s
        if "static_ms_per_step" in b8:
            slots = b8.get("static_slots", s.get("static_slots", {}))
            label = f"{key} ({b8['static_impl']}{', sampled' if b8.get('sampled') else ''})"
            shared = f"{slots['shared']} x {slots['groups']} + " if "shared" in slots else ""  # older runs: per row only
            b8_rows.append(f"| {label} | {b8.get('batch', '-')} | {_f(b8['static_ms_per_step'])} | "
                           f"{shared}{slots.get('full_attention', '-')} / {slots.get('sliding_attention', '-')} | "
                           f"{_f(b8.get('peak_gib', s.get('peak_gib')), 1)} |")
    hf = stages.get("hf_static", {})
    if "ms_per_step" in hf:
        b8_rows.append(f"| b, HF generate static cache (first call {hf.get('first_call_s')} s) | 8 | "
                       f"{_f(hf['ms_per_step'])} | - | {_f(hf.get('peak_gib'), 1)} |")
    if len(b8_rows) > 2:
        out += ["", "Decode per step with the engine's decoder (`engines.medgemma_decode`), 5 topics + 3 questions:",
                "", *b8_rows]
    split = [f"{key} {_f(stages[key]['prefix_prefill_s'], 3)} + {_f(stages[key]['prompts_prefill_s'], 3)} s"
             for key in ("b", "c50", "c25", "c50_shared", "c25_shared") if "prefix_prefill_s" in stages.get(key, {})]
    if split:
        out += ["", f"Prefill split, shared prefix + {cfg.get('topics')} prompts (with pruning: prefix up to layer "
                    f"{data.get('pruning_layer')}, then per prompt scoring and the remaining layers on its kept "
                    f"tokens; with a shared keep, those layers run on the kept prefix once): " + "; ".join(split) + "."]
    probe = data.get("sdpa_probe", {})
    if probe:
        cells = "; ".join(f"{label}: " + ", ".join(f"{k} {'refused' if isinstance(v, str) else _f(v)}"
                                                   for k, v in probe.get(f"{label}_ms", {}).items())
                          for label in ("bool_mask", "is_causal"))
        out += ["", (f"SDPA alone at {probe.get('shape')}, bf16, ms (refused: the kernel does not take it; reasons "
                     f"in the JSON): {cells}.")]
    vision = data.get("vision_probe", {})
    if vision:
        def cells(times: dict) -> str:
            return ", ".join(f"{k} {'refused' if isinstance(v, str) else _f(v)}" for k, v in times.items())

        out += ["", (f"Vision encode of {vision.get('slices')} slices ({vision.get('attention')} attention), s: by SDPA "
                     f"kernel at {vision.get('batch')} slices a call: {cells(vision.get('by_kernel_s', {}))}; default "
                     f"kernel at other slices a call: {cells(vision.get('default_kernel_by_batch_s', {}))}.")]
    out += ["", "| target | value | result |", "|---|---|---|"]
    for row in targets(data):
        result = "-" if row["pass"] is None else ("PASS" if row["pass"] else "MISS")
        out.append(f"| {row['target']} | {_f(row['value'])} {row['unit']} | {result} |")
    checks = data.get("checks", {})
    if checks:
        out += ["", "Checks: " + "; ".join(f"{k} {json.dumps(v)}" for k, v in checks.items())]
    if data.get("errors"):
        out += ["", "Errors: " + "; ".join(f"{e['stage']}: {e['error']}" for e in data["errors"])]
    if data.get("skipped"):
        out += ["", "Skipped: " + "; ".join(data["skipped"])]
    return "\n".join(out)


def record(text: str) -> None:
    existing = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if SECTION not in existing:
        existing = existing.rstrip("\n") + f"\n\n{SECTION}\n"
    RESULTS.write_text(existing.rstrip("\n") + "\n\n" + text + "\n")


def commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "CPU")
    return f"CPU ({cpu}, nproc {len(os.sched_getaffinity(0))})"


def default_json() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "gpu_medgemma.json" if out else ROOT / "bench" / "out" / "gpu_medgemma.json"


def preflight(run: Run) -> dict:
    """The toy shapes on this GPU in a child process: does graph capture (and compile) work here?"""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "toy.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--toy", "--json", str(path), "--no-naive"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, check=False)
        except subprocess.TimeoutExpired:
            return {"ok": False, "why": "toy run timed out"}
        if not path.exists():
            return {"ok": False, "why": f"toy run wrote nothing (rc {proc.returncode}): {proc.stderr[-600:]}"}
        toy = json.loads(path.read_text())
    checks = toy.get("checks", {}).get("decoder", {})
    return {"ok": proc.returncode == 0 and not toy.get("errors"), "rc": proc.returncode, "graph": checks.get("graph"),
            "graph_equals_eager": checks.get("graph_equals_eager"), "errors": toy.get("errors"),
            "elapsed_s": toy.get("elapsed_s")}


# --- Main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true", help="tiny shapes (CPU in seconds); prints, never records")
    parser.add_argument("--json", type=Path, default=None, help="raw figures (default $OUT/gpu_medgemma.json or "
                                                               "bench/out/gpu_medgemma.json)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd decode step")
    parser.add_argument("--no-graph", action="store_true", help="static cache without CUDA graph capture")
    parser.add_argument("--no-naive", action="store_true", help="skip (a)")
    parser.add_argument("--no-preflight", action="store_true", help="skip the toy run on the GPU before the real one")
    parser.add_argument("--hf-static", action="store_true",
                        help='also time HF generate(cache_implementation="static") at batch 8 (~2 min: compilation)')
    parser.add_argument("--budget-s", type=float, default=None, help="time budget for the whole run (default 330; "
                                                                     "toy 120)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--slices", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--commit", default=None, help="code version to record where the copy has no .git "
                                                       "(default: git rev-parse --short HEAD)")
    parser.add_argument("--from-json", type=Path, default=None, help="render (and record) a saved run; runs nothing")
    args = parser.parse_args(argv)

    if args.from_json:
        data = json.loads(args.from_json.read_text())
        text = render(data)
        print(text)
        if not data.get("toy") and not args.no_record:
            record(text)
        return 0

    shapes = TOY if args.toy else REAL
    overrides = {k: v for k, v in (("repeats", args.repeats), ("slices", args.slices), ("new_tokens", args.new_tokens))
                 if v is not None}
    if overrides:
        shapes = Shapes(**{**asdict(shapes), **overrides})
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    budget = args.budget_s or (120.0 if args.toy else 330.0)
    cuda = device.type == "cuda"
    use_graph = cuda and not args.no_graph
    if not cuda:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    command = " ".join(["python bench/gpu_medgemma.py", *(argv if argv is not None else sys.argv[1:])])
    run = Run(args.json or default_json(), {
        "toy": args.toy, "device": device_name(device), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(), "commit": args.commit or commit(),
        "date": f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC", "command": command,
        "dtype": str(dtype).replace("torch.", ""), "shapes": asdict(shapes), "budget_s": budget, "checks": {}})
    run.log(f"{run.data['device']}, torch {torch.__version__}, transformers {transformers.__version__}; "
            f"{'toy' if args.toy else 'real'} shapes; JSON -> {run.path}")
    run.save()

    if cuda and not args.toy and use_graph and not args.no_preflight:
        result = preflight(run)
        run.data["checks"]["preflight_toy"] = result
        run.log(f"preflight (toy shapes on this GPU): {result}")
        if not result.get("graph"):
            use_graph = False
            run.data["skipped"].append("CUDA graphs: the toy preflight could not capture one")
        run.save()

    torch.set_grad_enabled(False)
    t = time.perf_counter()
    config = toy_config() if args.toy else real_config()
    model = build_model(config, device, dtype)
    decoder = Gemma3Decoder(model)
    inputs = build_inputs(model, shapes, device, dtype)
    if cuda:
        torch.cuda.synchronize()
    params = sum(p.numel() for p in model.parameters())
    run.data.update({"build_s": round(time.perf_counter() - t, 1), "params": params,
                     "prefix_tokens": len(inputs.prefix), "image_tokens": inputs.image_tokens,
                     "topic_tokens": [len(p) for p in inputs.topics],
                     "question_tokens": [len(p) for p in inputs.questions],
                     "layers": decoder.num_layers, "layer_types": decoder.layer_types,
                     "pruning_layer": PruningConfig(keep="ratio").layer_for(decoder.num_layers)})
    run.log(f"model built: {params / 1e9:.2f} B parameters in {run.data['build_s']} s; prefix {len(inputs.prefix)} "
            f"tokens ({inputs.image_tokens} image)")
    run.save()
    clock = Clock(device)

    with torch.inference_mode():
        if cuda:
            try:
                run.data["sdpa_probe"] = sdpa_probe(device, dtype)
                run.log(f"SDPA probe: {run.data['sdpa_probe']}")
            except Exception as exc:  # noqa: BLE001
                run.error("sdpa_probe", exc)
        try:
            run.data["vision_probe"] = vision_probe(decoder, inputs, shapes, device)
            run.log(f"vision probe: {run.data['vision_probe']}")
            run.save()
        except Exception as exc:  # noqa: BLE001
            run.error("vision_probe", exc)
        configs = [("b", PruningConfig()), ("c50", PruningConfig(keep="ratio", keep_value=0.5)),
                   ("c25", PruningConfig(keep="ratio", keep_value=0.25)),
                   ("c50_shared", PruningConfig(keep="ratio", keep_value=0.5, scope="shared")),
                   ("c25_shared", PruningConfig(keep="ratio", keep_value=0.25, scope="shared"))]
        for key, pruning in configs:
            if pruning.scope == "shared" and run.elapsed() > budget * 0.55:
                run.data["skipped"].append(f"{key}: time budget")
                continue
            try:
                measure_readout(run, key, decoder, inputs, shapes, pruning, clock, device, use_graph)
            except Exception as exc:  # noqa: BLE001
                run.error(key, exc)

        try:
            run.data["checks"]["decoder"] = check_decoder(model, decoder, inputs, shapes, use_graph)
            run.data["checks"]["shared_keep_one_prompt"] = check_shared_keep(
                decoder, inputs, shapes, PruningConfig(keep="ratio", keep_value=0.25))
            run.log(f"checks: {run.data['checks']}")
            run.save()
        except Exception as exc:  # noqa: BLE001
            run.error("checks", exc)

        if not args.no_naive:
            try:
                measure_naive(run, model, inputs, shapes, clock, device, budget - 45)
            except Exception as exc:  # noqa: BLE001
                run.error("naive", exc)

        compile_wanted = cuda and use_graph and not args.no_compile
        if compile_wanted and budget - run.elapsed() < 130:
            run.data["skipped"].append(f"torch.compile'd step: {budget - run.elapsed():.0f} s left of the budget")
        elif compile_wanted:
            run.log("compiling the decode step (batch 8, (b)); this takes a minute or two")
            try:
                reset_peak(device)
                t = time.perf_counter()
                stage = time_batch8(decoder, inputs, inputs.topics + inputs.questions, shapes, PruningConfig(),
                                    clock, True, compile_step=True)
                stage["compile_and_capture_s"] = round(time.perf_counter() - t, 1)
                stage["peak_gib"] = peak_gib(device)
                run.data["stages"]["b_compiled"] = stage
                run.log(f"b_compiled: {stage}")
                run.save()
            except Exception as exc:  # noqa: BLE001
                run.error("b_compiled", exc)

        hf_wanted = args.hf_static or (cuda and not use_graph)
        if hf_wanted and (not cuda or budget - run.elapsed() > 150):
            try:
                measure_hf_static(run, model, decoder, inputs, shapes, clock, device)
            except Exception as exc:  # noqa: BLE001
                run.error("hf_static", exc)
        elif hf_wanted:
            run.data["skipped"].append(f"HF static generate: {budget - run.elapsed():.0f} s left of the budget")

    run.data["targets"] = targets(run.data)
    run.data["complete"] = True
    run.save()
    text = render(run.data)
    print("\n" + text + "\n", flush=True)
    for row in run.data["targets"]:
        result = "-" if row["pass"] is None else ("PASS" if row["pass"] else "MISS")
        print(f"{result}: {row['target']}: {_f(row['value'])} {row['unit']}", flush=True)
    if not args.toy:
        run.path.with_suffix(".md").write_text(SECTION + "\n\n" + text + "\n")
        if not args.no_record:
            record(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
