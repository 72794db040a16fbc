"""Where Readout's MedGemma path spends its time (issue 5): the costliest kernels, from
``torch.profiler``, of the image prefix's prefill, of the 5 topics' prefill on it, and of eager
decode steps of `engines.medgemma_decode.StaticDecoder` at batch 8 (5 topics + 3 questions),
all on path (b) (no pruning) of the MedGemma-1.5-4B-shaped model of `bench/gpu_medgemma.py`;
then the decode step replayed as a CUDA graph, timed.

    python bench/gpu_decode_profile.py          # GPU, real shapes (about a minute)
    python bench/gpu_decode_profile.py --toy    # CPU, toy shapes

Prints a table and writes it to ``$OUT/gpu_decode_profile.txt`` when ``OUT`` is set.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_medgemma as bench  # noqa: E402
from engines.medgemma_decode import StaticDecoder  # noqa: E402
from engines.medgemma_pruning import Gemma3Decoder, PruningConfig, prefill_prefix, prefill_prompts  # noqa: E402

PROFILED_STEPS = 4


def kernel_table(prof, cuda: bool, calls: int, title: str) -> list[str]:
    """The 25 costliest kernels (CPU: operators) of ``prof``, per one of its ``calls``."""
    events = [e for e in prof.key_averages() if (e.device_type.name == "CUDA") == cuda]
    attr = "device_time_total" if cuda else "self_cpu_time_total"
    grand = sum(getattr(e, attr) for e in events) or 1
    lines = ["", f"{title}: {sum(e.count for e in events) / calls:.0f} kernels, {grand / calls / 1000:.2f} ms"
             + (" of kernel time" if cuda else " of CPU operator time"),
             "", "| kernel | calls | ms | share |", "|---|---|---|---|"]
    for e in sorted(events, key=lambda e: -getattr(e, attr))[:25]:
        lines.append(f"| {e.key[:90]} | {e.count / calls:.0f} | {getattr(e, attr) / calls / 1000:.3f} | "
                     f"{getattr(e, attr) / grand:.1%} |")
    return lines


def profiled(fn, cuda: bool, calls: int = 1):
    """``fn`` run ``calls`` times under the profiler (after one warm-up call)."""
    fn()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    return prof


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.toy
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = bench.TOY if args.toy else bench.REAL
    torch.set_grad_enabled(False)
    model = bench.build_model(bench.toy_config() if args.toy else bench.real_config(), device, dtype)
    decoder = Gemma3Decoder(model)
    inputs = bench.build_inputs(model, shapes, device, dtype)
    prompts = inputs.topics + inputs.questions
    features = bench.encode_slices(decoder, inputs.pixel_values, shapes.vision_batch)
    ids = torch.tensor(inputs.prefix)
    lines = [f"{bench.device_name(device)}, torch {torch.__version__}; {len(inputs.prefix)} prefix tokens, "
             f"{len(inputs.topics)} topics"]

    prof = profiled(lambda: prefill_prefix(decoder, ids, features), cuda)
    lines += kernel_table(prof, cuda, 1, "Prefix prefill (b)")
    prefixes = [prefill_prefix(decoder, ids, features) for _ in range(2)]  # each is consumed by its prompts
    prof = profiled(lambda: prefill_prompts(decoder, prefixes.pop(), inputs.topics), cuda)
    lines += kernel_table(prof, cuda, 1, f"Prompts' prefill on it, {len(inputs.topics)} topics (b)")
    del prefixes

    prompted = bench._prompted(decoder, inputs, prompts, PruningConfig(), shapes)
    static = StaticDecoder(decoder, prompted, max_new_tokens=PROFILED_STEPS + 4, graph=False, release=True)
    del prompted
    static.reset()
    prof = profiled(static.step_fn, cuda, PROFILED_STEPS)
    lines += kernel_table(prof, cuda, PROFILED_STEPS, f"One decode step, batch {static.rows} (b), eager")
    del static
    if cuda:
        graphed = StaticDecoder(decoder, bench._prompted(decoder, inputs, prompts, PruningConfig(), shapes),
                                max_new_tokens=65, graph=True, release=True)
        graphed.run()
        torch.cuda.synchronize()
        t = time.perf_counter()
        graphed.run()
        torch.cuda.synchronize()
        lines.append(f"\nCUDA graph replay: {(time.perf_counter() - t) / 64 * 1000:.2f} ms per step (64 steps)")
    text = "\n".join(lines)
    print(text, flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_decode_profile.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
