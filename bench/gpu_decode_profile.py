"""Where one decode step of the engine's decoder spends its time (issue 5): kernels per step and the
costliest kernels, from ``torch.profiler`` over eager steps of `engines.medgemma_decode.StaticDecoder`
at batch 8 (5 topics + 3 questions, (b): no pruning), on the MedGemma-1.5-4B-shaped model of
`bench/gpu_medgemma.py`; then the same step replayed as a CUDA graph, timed.

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
from engines.medgemma_pruning import Gemma3Decoder, PruningConfig  # noqa: E402

PROFILED_STEPS = 4


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
    prompted = bench._prompted(decoder, inputs, prompts, PruningConfig(), shapes)
    steps = PROFILED_STEPS + 3
    static = StaticDecoder(decoder, prompted, max_new_tokens=steps + 1, graph=False)
    static.run()  # warm-up
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    static.reset()
    with profile(activities=[activity]) as prof:
        for _ in range(PROFILED_STEPS):
            static.step_fn()
        if cuda:
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if (e.device_type.name == "CUDA") == cuda]
    attr = "device_time_total" if cuda else "self_cpu_time_total"
    launches = sum(e.count for e in events) if cuda else None
    lines = [f"{bench.device_name(device)}, torch {torch.__version__}; batch {static.rows}, "
             f"{PROFILED_STEPS} eager steps profiled"]
    if cuda:
        total = sum(getattr(e, attr) for e in events) / PROFILED_STEPS / 1000
        lines.append(f"kernels per step {launches / PROFILED_STEPS:.0f}; kernel time per step {total:.2f} ms")
    lines += ["", "| kernel | calls per step | ms per step | share |", "|---|---|---|---|"]
    grand = sum(getattr(e, attr) for e in events) or 1
    for e in sorted(events, key=lambda e: -getattr(e, attr))[:25]:
        lines.append(f"| {e.key[:90]} | {e.count / PROFILED_STEPS:.0f} | "
                     f"{getattr(e, attr) / PROFILED_STEPS / 1000:.3f} | {getattr(e, attr) / grand:.1%} |")
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
