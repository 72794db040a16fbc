"""Benchmark: one demo-engine read of an 80-slice phantom on the CPU, broken down by stage.

5 topics + 3 questions, 5 rollouts each, regrounding on. Runs the same read with scheduling on
and off (interleaved, median of repeats) and reports the ratio of decode time per step: the two
reads may decode answers of different lengths, so their total decode times do not compare.

    .venv/bin/python bench/engine.py            # prints the table, appends it to bench/RESULTS.md
    .venv/bin/python bench/engine.py --no-record
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.phantom import render_phantom  # noqa: E402
from engines.registry import create_engine  # noqa: E402
from engines.report import ReadRequest  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")
REPEATS = 5


def phantom_with_slices(n: int, start: int = 1000):
    for seed in range(start, start + 5000):
        phantom = render_phantom(seed)
        if phantom.hu.shape[0] == n and any(not t.normal for t in phantom.truth.topics):
            return seed, phantom
    raise RuntimeError(f"no phantom with {n} slices")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    seed, phantom = phantom_with_slices(80)
    spacing = (phantom.slice_spacing_mm, phantom.pixel_spacing_mm, phantom.pixel_spacing_mm)
    engine = create_engine("demo")
    request = ReadRequest(seed=seed)
    runs: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    for _ in range(REPEATS):
        for mode in ("on", "off"):
            req = request if mode == "on" else replace(request, pruning=False)
            sampled = engine.sample(phantom.hu, spacing, req)
            engine.assemble(sampled, phantom.hu, spacing, req)
            timings = dict(sampled.timings)
            timings["total_s"] = sum(timings.values())
            timings["kept"] = float(np.mean(list(sampled.kept_ratio.values())))
            timings["step_ms"] = 1000 * timings["decode_s"] / sampled.decode_steps
            runs[mode].append(timings)
    median = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in runs.items()}
    stages = ("encode_s", "schedule_s", "decode_s", "measure_s", "reground_s", "total_s")
    lines = ["| scheduling | " + " | ".join(s[:-2] + " s" for s in stages) + " | decode ms per step | kept tokens |",
             "|---|" + "---|" * (len(stages) + 2)]
    for mode in ("on", "off"):
        m = median[mode]
        lines.append(f"| {mode} | " + " | ".join(f"{m[s]:.2f}" for s in stages) + f" | {m['step_ms']:.1f} | {m['kept']:.0%} |")
    ratio = median["on"]["step_ms"] / median["off"]["step_ms"]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    text = (f"\n## Demo engine, one study (bench/engine.py)\n\n{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
            f"nproc {os.cpu_count()}, {cpu}, torch {torch.__version__}, {platform.python_version()}; "
            f"`python bench/engine.py`; phantom seed {seed}, {phantom.hu.shape[0]} slices, 5 topics + 3 questions x 5 rollouts, "
            f"regrounding on; median of {REPEATS} interleaved runs. Target: total <= 10 s.\n\n" + "\n".join(lines)
            + f"\n\nDecode time per step, scheduling on / off: {ratio:.2f}\n")
    print(text)
    if not args.no_record:
        with RESULTS.open("a") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
