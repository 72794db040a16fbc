"""Per-model decision thresholds, chosen on development phantoms after training.

`report.Thresholds` decides which consensus findings stand. Its defaults were tuned on the shipped
weights; a model from another run has maps and rollouts of its own confidence (on phantoms
8100-8139 the fourth 105-minute run's decoder stated 4 true liver lesions and 3 pneumothoraces its
maps saw in only one rollout of five, too few for the defaults). `calibrate` reads development
phantoms once, scores every point of `GRID` on those same reads, and keeps the best F1 for findings
>= 8 mm among the points that give at most `MAX_NORMAL_SHARE` of the all-normal phantoms a finding.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from engines.checkpoint import load_checkpoint
from engines.evaluation import Tally, phantom_reads
from engines.report import DemoEngine, ReadRequest, Thresholds
from engines.training import model_card

# Seeds no other use touches: training renders from 10,000,000, validation 8000-8011, evaluation 9001 on.
DEV_SEEDS = range(8100, 8140)
DEV_NORMAL_SEEDS = range(8400, 8420)
# Strictest first, so that among equal scores the strictest point wins.
GRID = {"min_agreement": (0.5, 0.3, 0.1), "map_confirm": (0.9, 0.8, 0.7, 0.6), "map_sure": (0.95, 0.9, 0.85)}
MAX_NORMAL_SHARE = 0.05


def calibrate(engine: DemoEngine, seeds: range = DEV_SEEDS, normal_seeds: range = DEV_NORMAL_SEEDS,
              progress: Callable[[int, int], None] | None = None) -> tuple[Thresholds, list[dict]]:
    """The best thresholds for ``engine`` on the given phantoms, and every grid point's scores."""
    request = ReadRequest()
    grid = [Thresholds(**dict(zip(GRID, values))) for values in itertools.product(*GRID.values())]
    tallies = {point: Tally() for point in grid}
    cases = [(seed, False) for seed in seeds] + [(seed, True) for seed in normal_seeds]
    for phantom, spacing, sampled in phantom_reads(engine, cases, request, progress):
        kept = list(sampled.kept_ratio.values())
        for point, tally in tallies.items():
            tally.add(phantom, *engine.assemble(sampled, phantom.hu, spacing, request, thresholds=point), kept)
    scores = [{**asdict(point), **tally.summary()} for point, tally in tallies.items()]
    return choose(scores), scores


def choose(scores: list[dict]) -> Thresholds:
    """The grid point with the best F1 >= 8 mm among those within `MAX_NORMAL_SHARE` (all, if none is);
    of equals, the first (`GRID` lists the strictest first)."""
    allowed = [s for s in scores if s["normal_with_findings"] <= MAX_NORMAL_SHARE] or scores
    best = max(allowed, key=lambda s: s["f1_8mm"])
    return _point(best)


def _point(score: dict) -> Thresholds:
    return Thresholds(**{k: score[k] for k in GRID})


def calibrate_checkpoint(stem: Path, seeds: range = DEV_SEEDS, normal_seeds: range = DEV_NORMAL_SEEDS,
                         progress: Callable[[int, int], None] | None = None) -> dict:
    """Calibrate the weights at ``stem`` and record the thresholds in their JSON (and model card)."""
    started = time.time()
    model, meta = load_checkpoint(stem)
    thresholds, scores = calibrate(DemoEngine(model), seeds, normal_seeds, progress)
    default = next(s for s in scores if _point(s) == Thresholds())
    chosen = next(s for s in scores if _point(s) == thresholds)
    meta["thresholds"] = asdict(thresholds)
    meta["calibration"] = {
        "phantoms": [seeds.start, seeds.stop - 1], "normal_phantoms": [normal_seeds.start, normal_seeds.stop - 1],
        "wall_time_s": round(time.time() - started, 1),
        **{f"{name}_{key}": s[key] for name, s in (("chosen", chosen), ("default", default))
           for key in ("f1_8mm", "f1", "precision", "recall", "normal_with_findings")},
    }
    stem.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    card = stem.parent / "MODEL_CARD.md"
    if card.exists() and "training" in meta:
        card.write_text(model_card(meta))
    return meta
