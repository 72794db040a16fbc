"""Benchmark: load a 600-slice 512x512 CT series with Readout, highdicom and SimpleITK.

Each reader runs in its own fresh subprocess, so its peak memory is its own; readers are
interleaved and repeated, and the median is reported. Peak extra memory is the process's
peak resident size minus its resident size after imports.

    .venv/bin/python bench/volume.py            # prints the table, appends it to bench/RESULTS.md
    .venv/bin/python bench/volume.py --no-record

Targets: Readout within 1.5x of the fastest reader, peak at most 2x the int16 volume size.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SLICES = 600
SIZE = 512
CHUNK = 50  # slices built and written at a time, to keep the builder's memory modest
REPEATS = 3
READERS = ("readout", "highdicom", "simpleitk")
RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Volume loading (bench/volume.py)"
VOLUME_BYTES = SLICES * SIZE * SIZE * 2  # the int16 volume


def write_series(folder: Path) -> list[Path]:
    """A phantom-like chest CT: body ellipse, lungs, spine, noise; one file per slice."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pydicom.uid import generate_uid

    from engines.phantom import ct_series_datasets, write_datasets

    rng = np.random.default_rng(0)
    y, x = np.mgrid[-1 : 1 : SIZE * 1j, -1 : 1 : SIZE * 1j]
    body = (x / 0.9) ** 2 + (y / 0.7) ** 2 < 1
    lungs = ((np.abs(x) - 0.4) / 0.3) ** 2 + (y / 0.45) ** 2 < 1
    spine = x**2 + (y - 0.5) ** 2 < 0.01
    plane = np.where(body, 40, -1000) + np.where(lungs, -860, 0) + np.where(spine, 660, 0)

    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for start in range(0, SLICES, CHUNK):
        noise = rng.normal(0, 15, size=(CHUNK, SIZE, SIZE))
        hu = np.clip(plane + noise, -1024, 3000).astype(np.int16)
        datasets = ct_series_datasets(hu, (0.7, 0.7), 1.0, (-180.0, -180.0, -300.0 + start), seed=600)
        for k, ds in enumerate(datasets):
            # Each call is its own little series; make the chunks one series of unique instances.
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.FrameOfReferenceUID = frame_of_reference
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = SLICES - (start + k)
        paths += write_datasets(datasets, folder)
    return paths


def resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def worker(reader: str, folder: Path) -> None:
    """Load the series once with ``reader``; print wall time and peak extra memory as JSON."""
    paths = sorted(folder.glob("*.dcm"))
    if reader == "readout":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from engines.volume import load_series
    elif reader == "highdicom":
        import highdicom as hd
        import pydicom
    else:
        import SimpleITK as sitk

    # Reset the peak to the current size, so import-time peaks do not count.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    base = resident_kib("VmRSS")
    start = time.perf_counter()
    if reader == "readout":
        array = load_series(paths).hu
    elif reader == "highdicom":
        # int16 is refused for slope 1 / intercept -1024 (it cannot prove the range fits).
        datasets = [pydicom.dcmread(p) for p in paths]
        array = hd.get_volume_from_series(datasets, dtype=np.float32).array
    else:
        series_reader = sitk.ImageSeriesReader()
        series_reader.SetFileNames(series_reader.GetGDCMSeriesFileNames(str(folder)))
        image = series_reader.Execute()
        array = sitk.GetArrayViewFromImage(image)
    wall = time.perf_counter() - start
    peak = resident_kib("VmHWM")
    print(
        json.dumps(
            {
                "wall_s": wall,
                "peak_extra_mib": (peak - base) / 1024,
                "dtype": str(array.dtype),
                "shape": list(array.shape),
            }
        )
    )


def measure(folder: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {reader: [] for reader in READERS}
    for repeat in range(REPEATS):
        for reader in READERS:
            out = subprocess.run(
                [sys.executable, __file__, "--worker", reader, str(folder)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            runs[reader].append(json.loads(out.strip().splitlines()[-1]))
            print(f"  repeat {repeat + 1} {reader}: {runs[reader][-1]}", file=sys.stderr)
    return runs


def table(runs: dict[str, list[dict]]) -> str:
    medians = {
        reader: (
            statistics.median(r["wall_s"] for r in rs),
            statistics.median(r["peak_extra_mib"] for r in rs),
            rs[0]["dtype"],
        )
        for reader, rs in runs.items()
    }
    fastest = min(wall for wall, _, _ in medians.values())
    volume_mib = VOLUME_BYTES / 2**20
    lines = [
        "| reader | output dtype | median wall s | peak extra MiB | x fastest | peak / int16 volume |",
        "|---|---|---|---|---|---|",
    ]
    for reader, (wall, peak, dtype) in medians.items():
        ratio, share = wall / fastest, peak / volume_mib
        lines.append(f"| {reader} | {dtype} | {wall:.2f} | {peak:.0f} | {ratio:.2f} | {share:.2f} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    nproc = len(os.sched_getaffinity(0))
    return f"nproc {nproc}, {cpu}, Python {platform.python_version()}"


def record(text: str) -> None:
    existing = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if SECTION not in existing:
        existing = existing.rstrip("\n") + f"\n\n{SECTION}\n"
    RESULTS.write_text(existing.rstrip("\n") + "\n\n" + text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("READER", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]))
        return

    with tempfile.TemporaryDirectory(prefix="readout-bench-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        paths = write_series(folder)
        print(f"wrote {len(paths)} files in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        for path in paths:  # warm the page cache so the first reader is not penalized
            path.read_bytes()
        runs = measure(folder)
    result = table(runs)
    print(result)
    if not args.no_record:
        when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        command = "python bench/volume.py"
        record(
            f"{when}; {machine()}; `{command}`; {SLICES} slices of {SIZE}x{SIZE} int16, uncompressed "
            f"(int16 volume {VOLUME_BYTES / 2**20:.0f} MiB); median of {REPEATS} interleaved runs, "
            f"each reader in a fresh process.\n\n{result}"
        )


if __name__ == "__main__":
    main()
