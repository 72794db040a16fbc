"""Benchmark: a study's 85 slices to MedGemma pixel values, the processor's PIL path against
Readout's `engines.gemma_pixels.PixelSteps` (torch, on the CPU and, where there is one, the GPU).

    .venv/bin/python bench/pixels.py            # prints the table, appends it to bench/RESULTS.md
    .venv/bin/python bench/pixels.py --no-record

Slices are 512 x 512 RGB uint8 (CT windows of a smooth phantom-like field), resized to 896 x 896 as
MedGemma 1.5's processor does. Each path runs once to warm up, then ``--repeats`` times; the median
is reported, with each path's time as a ratio of the processor's from the same run.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_medgemma import device_name  # noqa: E402

from engines.gemma_pixels import PixelSteps  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## MedGemma pixel values (bench/pixels.py)"
SLICES, SIDE, SIZE = 85, 512, 896


def slices(seed: int = 0) -> list[np.ndarray]:
    """Smooth random fields with noise, as windowed CT slices look, one per slice."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] / SIDE
    out = []
    for k in range(SLICES):
        field = 128 + 90 * np.sin(6 * xx + k / 10) * np.cos(5 * yy) + rng.normal(0, 12, (SIDE, SIDE))
        out.append(np.repeat(np.clip(field, 0, 255).astype(np.uint8)[..., None], 3, axis=2))
    return out


def timed(fn, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    processor = Gemma3ImageProcessorPil(size={"height": SIZE, "width": SIZE})  # MedGemma 1.5's settings
    steps = PixelSteps.of(processor)
    images = slices()
    reference = processor(images=images, return_tensors="pt")["pixel_values"]
    level = processor.rescale_factor / min(processor.image_std)
    rows = [("processor (PIL, one core)", timed(lambda: processor(images=images, return_tensors="pt"), args.repeats), 0.0)]
    cpu = torch.device("cpu")
    rows.append((f"PixelSteps, CPU ({torch.get_num_threads()} threads)", timed(lambda: steps(images, cpu), args.repeats),
                 float((steps(images, cpu) - reference).abs().max()) / level))
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        rows.append((f"PixelSteps, {torch.cuda.get_device_name(gpu)} (from host arrays)",
                     timed(lambda: steps(images, gpu), args.repeats, torch.cuda.synchronize),
                     float((steps(images, gpu).cpu() - reference).abs().max()) / level))
    base = rows[0][1]
    lines = [f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; {device_name(cpu)}, torch {torch.__version__}, "
             f"Python {platform.python_version()}; `python bench/pixels.py`; {SLICES} slices {SIDE}x{SIDE} RGB uint8 "
             f"to {SIZE}x{SIZE}; median of {args.repeats} after a warm-up.", "",
             "| path | s per study | x processor | largest difference, levels of 255 |", "|---|---|---|---|"]
    lines += [f"| {name} | {seconds:.3f} | {seconds / base:.3f} | {diff:.2f} |" for name, seconds, diff in rows]
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        existing = RESULTS.read_text()
        if SECTION not in existing:
            existing = existing.rstrip("\n") + f"\n\n{SECTION}\n"
        RESULTS.write_text(existing.rstrip("\n") + "\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
