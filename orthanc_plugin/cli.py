"""The `readout` command line.

Exit codes: 0 success, 2 bad input (one line on stderr naming the problem), 1 internal error.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from dicom_sr.seg import write_segmentation
from dicom_sr.sr import write_report
from engines.errors import CheckpointError, EngineError
from engines.phantom import TOPICS, write_phantom_study
from engines.results import FindingsError, StudyResult
from engines.series import load_study_volume
from engines.volume import Volume, VolumeError

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2
BAD_INPUT_ERRORS = (VolumeError, FindingsError, EngineError, CheckpointError)


@contextmanager
def _progress_bar(description: str, unit: str = "slice") -> Iterator[Callable[[int, int], None]]:
    """A progress callback drawing a bar on stderr (silent when stderr is not a terminal)."""
    bar = tqdm(desc=description, unit=unit, disable=None, leave=False, file=sys.stderr)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


def _volume_summary(volume: Volume, warnings: Sequence[str]) -> dict:
    return {
        "shape": list(volume.shape),
        "spacing_mm": [round(s, 4) for s in volume.spacing_mm],
        "orientation": volume.orientation,
        "origin_mm": [round(v, 4) for v in volume.origin_mm],
        "warnings": list(warnings),
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    with _progress_bar("reading series") as progress:
        volume, selection = load_study_volume(Path(args.dicom_dir), progress=progress)
    report = {
        "selected_series": selection.series.series_instance_uid,
        "reason": selection.reason,
        "series": [
            {
                "series_instance_uid": s.series_instance_uid,
                "modality": s.modality,
                "slices": s.slices,
                "description": s.description,
            }
            for s in selection.found
        ],
        "volume": _volume_summary(volume, [*selection.warnings, *volume.warnings]),
    }
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return EXIT_OK
    print(f"{len(report['series'])} series in {args.dicom_dir}:")
    for s in report["series"]:
        mark = "*" if s["series_instance_uid"] == report["selected_series"] else " "
        print(f" {mark} {s['modality']:<3} {s['slices']:>5} slices  {s['description'] or '(no description)'}  {s['series_instance_uid']}")
    v = report["volume"]
    print(f"Selected: {selection.reason}")
    print(f"Volume: {v['shape'][0]} x {v['shape'][1]} x {v['shape'][2]} [k, r, c], spacing {v['spacing_mm']} mm, "
          f"{v['orientation']}, origin {v['origin_mm']} mm (LPS)")
    for warning in v["warnings"]:
        print(f"Warning: {warning}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    result = StudyResult.load(Path(args.findings))
    with _progress_bar("reading series") as progress:
        volume, _ = load_study_volume(Path(args.dicom_dir), result.series_instance_uid, progress=progress)
    result.check_fits(volume.shape)
    lines = _write_outputs(result, volume, Path(args.out), args.rule)
    print(result.as_text())
    print()
    print("\n".join(lines))
    for warning in volume.warnings:
        print(f"Warning: {warning}", file=sys.stderr)
    return EXIT_OK


def _write_outputs(result: StudyResult, volume: Volume, out: Path, rule: str) -> list[str]:
    """Write sr.dcm and (if any box) seg.dcm into ``out``; returns the lines saying where."""
    out.mkdir(parents=True, exist_ok=True)
    seg = write_segmentation(result, volume, rule=rule)
    sr = write_report(result, volume, seg, rule=rule)
    sr.save_as(out / "sr.dcm", enforce_file_format=True)
    lines = [f"SR:  {out / 'sr.dcm'}"]
    if seg is not None:
        seg.save_as(out / "seg.dcm", enforce_file_format=True)
        lines.append(f"SEG: {out / 'seg.dcm'} ({len(seg.SegmentSequence)} segments)")
    else:
        lines.append("SEG: none (no finding has a box)")
    return lines


def cmd_run(args: argparse.Namespace) -> int:
    # The engines load torch (seconds): only the commands that read images import them.
    from engines.keyimage import write_key_image
    from engines.registry import create_engine
    from engines.report import ReadRequest

    topics = tuple(t.strip() for t in args.topics.split(",") if t.strip())
    request = ReadRequest(topics=topics, questions=tuple(args.question), rollouts=args.rollouts,
                          pruning=not args.no_scheduling, reground=not args.no_regrounding)
    with _progress_bar("reading series") as progress:
        volume, selection = load_study_volume(Path(args.dicom_dir), progress=progress)
    engine = create_engine(args.engine, weights=Path(args.weights) if args.weights else None,
                           model_path=Path(args.model_path) if args.model_path else None, device=args.device)
    with tqdm(total=1, desc=f"{args.engine} engine", disable=None, leave=False, file=sys.stderr) as bar:
        result = engine.run(volume, request)
        bar.update(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result.save(out / "findings.json")
    lines = _write_outputs(result, volume, out, args.rule)
    images = []
    for topic in result.topics:
        for number, finding in enumerate(topic.findings, start=1):
            if finding.box is not None:
                path = out / f"{topic.topic}-{number}-{finding.type.replace(' ', '-')}.png"
                write_key_image(path, volume.hu, finding.box.voxel, f"{topic.topic}: {finding.type}")
                images.append(path)
    print(result.as_text())
    print()
    print(f"Series: {selection.reason}")
    print(f"Findings: {out / 'findings.json'}")
    print("\n".join(lines))
    print(f"Key images: {len(images)} PNG in {out}")
    timings = result.extra.get("timings", {})
    kept = result.extra.get("mean_kept_ratio")
    print("Timings: " + ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in timings.items())
          + ("; visual tokens kept: all" if kept is None else f"; visual tokens kept {kept:.0%}"))
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from engines.evaluation import evaluate, format_table, write_results
    from engines.registry import create_engine

    engine = create_engine("demo", weights=Path(args.weights) if args.weights else None)
    with _progress_bar("evaluating", "phantom") as progress:
        results = evaluate(engine, args.n, args.seed, ablation=args.ablation, progress=progress)
    table = format_table(results)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(results, out / "eval.json")
    (out / "eval.md").write_text(f"`readout eval --n {args.n} --seed {args.seed}{' --ablation' if args.ablation else ''}`\n\n{table}\n")
    print(f"\nWritten: {out / 'eval.json'}, {out / 'eval.md'}")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from engines.training import train

    info = train(Path(args.out), steps=args.steps, device=args.device,
                 time_limit_s=args.minutes * 60 if args.minutes else None, init=Path(args.init) if args.init else None,
                 detect_share=args.detect_share)
    print(json.dumps(info["training"], indent=2))
    if args.calibrate:
        _calibrate(Path(args.out) / "demo")
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    _calibrate(Path(args.weights))
    return EXIT_OK


def _calibrate(stem: Path) -> None:
    from engines.calibration import calibrate_checkpoint

    with _progress_bar("calibrating", "phantom") as progress:
        meta = calibrate_checkpoint(stem, progress=progress)
    print(json.dumps({"thresholds": meta["thresholds"], "calibration": meta["calibration"]}, indent=2))


def cmd_phantom(args: argparse.Namespace) -> int:
    truth = write_phantom_study(Path(args.out_dir), args.seed, normal=args.normal)
    print(f"Phantom study (seed {args.seed}): {Path(args.out_dir) / 'dicom'}")
    print(f"Ground truth: {truth}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from orthanc_plugin.serve import exec_orthanc, write_configuration
    from orthanc_plugin.settings import DEFAULT_SETTINGS, load_settings

    settings_path = Path(args.config) if args.config else DEFAULT_SETTINGS
    settings = load_settings(settings_path)
    config = write_configuration(settings, settings_path, Path(args.storage), args.http_port, args.dicom_port,
                                 args.stable_age)
    print(f"Orthanc: http://127.0.0.1:{args.http_port}/ (DICOM port {args.dicom_port}, AE title ORTHANC); "
          f"configuration {config}", flush=True)
    exec_orthanc(config, verbose=args.verbose)
    return EXIT_OK  # not reached: Orthanc replaced this process


def cmd_demo(args: argparse.Namespace) -> int:
    from orthanc_plugin.demo import run_demo

    return run_demo(Path(args.storage), args.http_port, args.dicom_port, args.seed, stay=not args.exit)


def cmd_runner(args: argparse.Namespace) -> int:
    from orthanc_plugin.runner import run_runner

    run_runner(args.orthanc, Path(args.settings) if args.settings else None,
               Path(args.database) if args.database else None, args.user, args.parent_pid)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="readout", description="AI reads of CT studies: topic-organized DICOM SR and SEG.")
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="show the series in a folder, which one is selected and its geometry")
    inspect.add_argument("dicom_dir")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(run=cmd_inspect)

    export = commands.add_parser("export", help="write findings JSON as a TID 1500 SR and a SEG")
    export.add_argument("dicom_dir")
    export.add_argument("--findings", required=True, help="findings JSON (see README)")
    export.add_argument("--out", required=True, help="folder for sr.dcm and seg.dcm")
    export.add_argument("--rule", default="manual", help="rule name that, with the engine, fixes the output UIDs")
    export.set_defaults(run=cmd_export)

    run = commands.add_parser("run", help="read a CT series with an engine: findings.json, SR, SEG, key images")
    run.add_argument("dicom_dir")
    run.add_argument("--out", required=True)
    run.add_argument("--engine", default="demo", help="demo or medgemma")
    run.add_argument("--weights", help="model weights stem (default: the shipped demo weights)")
    run.add_argument("--model-path", help="medgemma: a local folder with google/medgemma-1.5-4b-it (never downloaded)")
    run.add_argument("--device", default="cpu", help="cpu or cuda")
    run.add_argument("--topics", default=",".join(TOPICS), help="comma-separated topics")
    run.add_argument("--question", action="append", default=[], help="a question to answer (repeatable)")
    run.add_argument("--rollouts", type=int, default=5)
    run.add_argument("--no-scheduling", action="store_true", help="keep every visual token (Photon off)")
    run.add_argument("--no-regrounding", action="store_true")
    run.add_argument("--rule", default="manual")
    run.set_defaults(run=cmd_run)

    evaluation = commands.add_parser("eval", help="score the demo engine on held-out phantoms")
    evaluation.add_argument("--n", type=int, default=200)
    evaluation.add_argument("--seed", type=int, default=9001)
    evaluation.add_argument("--ablation", action="store_true")
    evaluation.add_argument("--weights")
    evaluation.add_argument("--out", default="out/eval")
    evaluation.set_defaults(run=cmd_eval)

    training = commands.add_parser("train", help="train the demo model on phantoms generated on the fly")
    training.add_argument("--out", required=True)
    training.add_argument("--steps", type=int, default=3000)
    training.add_argument("--minutes", type=float, help="stop after this long (progress follows time)")
    training.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    training.add_argument("--init", metavar="WEIGHTS", help="start from these weights (path without suffix) instead of fresh ones")
    training.add_argument("--detect-share", type=float, metavar="SHARE",
                          help="share of the run that trains the finding maps alone, before the decoder learns on the frozen "
                               "encoder (default 0.45, none with --init)")
    training.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                          help="skip choosing the decision thresholds on development phantoms after training")
    training.set_defaults(run=cmd_train)

    calibration = commands.add_parser("calibrate", help="choose a trained model's decision thresholds on development phantoms")
    calibration.add_argument("--weights", required=True, metavar="WEIGHTS", help="the weights (path without suffix)")
    calibration.set_defaults(run=cmd_calibrate)

    serve = commands.add_parser("serve", help="start Orthanc with Readout and DICOMweb in the foreground")
    serve.add_argument("--config", help="Readout settings (default: config/readout.json)")
    serve.add_argument("--http-port", type=int, default=8042)
    serve.add_argument("--dicom-port", type=int, default=4242)
    serve.add_argument("--storage", default="out/orthanc", help="Orthanc's storage, the job store and the generated configuration")
    serve.add_argument("--stable-age", type=int, help="seconds without new instances before a study counts as complete "
                       "(default: the settings' value)")
    serve.add_argument("--verbose", action="store_true", help="Orthanc's verbose log")
    serve.set_defaults(run=cmd_serve)

    demo = commands.add_parser("demo", help="start Orthanc with Readout, send a phantom study with storescu, show the read")
    demo.add_argument("--storage", default="out/demo-orthanc", help="a fresh Orthanc storage (emptied first)")
    demo.add_argument("--http-port", type=int, default=8042)
    demo.add_argument("--dicom-port", type=int, default=4242)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--exit", action="store_true", help="stop Orthanc after the read instead of waiting for Ctrl-C")
    demo.set_defaults(run=cmd_demo)

    runner = commands.add_parser("runner", help="run Readout's jobs against an Orthanc server (Orthanc's plugin starts one)")
    runner.add_argument("--orthanc", default="http://127.0.0.1:8042", help="Orthanc's URL")
    runner.add_argument("--settings", help="Readout settings (default: config/readout.json)")
    runner.add_argument("--database", help="the job store (default: the settings' database)")
    runner.add_argument("--user", help="Orthanc user; the password comes from READOUT_ORTHANC_PASSWORD")
    runner.add_argument("--parent-pid", type=int, help="stop when this process (Orthanc) is gone")
    runner.set_defaults(run=cmd_runner)

    phantom = commands.add_parser("phantom", help="write a synthetic CT study and its truth.json")
    phantom.add_argument("out_dir")
    phantom.add_argument("--seed", type=int, default=0)
    phantom.add_argument("--normal", action="store_true", help="no findings")
    phantom.set_defaults(run=cmd_phantom)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BAD_INPUT_ERRORS as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": str(exc)}, ensure_ascii=False))
        print(f"readout: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - the last line of defence: say it is ours, show where
        traceback.print_exc()
        print(f"readout: internal error: {exc}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
