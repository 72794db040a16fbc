"""`readout eval`: the demo engine on held-out phantoms, scored against their truth.

A prediction matches a truth finding when topic and type agree and their 3D IoU is >= 0.1
(greedy, best IoU first). Reported: finding F1 overall and per type the truth holds (all sizes,
and lesions >= 8 mm only, where predictions matching smaller truths are not counted; false
findings of types the truth never holds count overall and on their own), median IoU of matched
findings before and after regrounding, the share of all-normal phantoms given any finding,
yes/no answer accuracy, and the mean share of visual tokens kept. With ``ablation``: the same
phantoms with scheduling off, with one rollout instead of consensus, without regrounding, and
without the finding maps' check (five rollouts and one). Where the weights carry calibrated
decision thresholds, the same reads are also scored with the defaults.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from engines.grounding import iou3d
from engines.phantom import Phantom, render_phantom
from engines.report import DemoEngine, ReadRequest, Sampled, Thresholds
from engines.results import TopicResult

MATCH_IOU = 0.1
MIN_LESION_MM = 8.0


@dataclass
class Tally:
    """Counts for one configuration."""

    tp: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    fp: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    fn: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    tp8: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    fp8: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    fn8: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    ious: list[float] = field(default_factory=list)
    ious_before: list[float] = field(default_factory=list)
    normal_studies: int = 0
    normal_with_findings: int = 0
    yes_no: list[bool] = field(default_factory=list)
    kept: list[float] = field(default_factory=list)

    def add(self, phantom: Phantom, topics: list[TopicResult], answers, kept: list[float]) -> None:
        truth_topics = {t.topic: t for t in phantom.truth.topics}
        any_finding = False
        for predicted in topics:
            truth = truth_topics.get(predicted.topic)
            truths = [f for f in (truth.findings if truth else []) if f.box]
            preds = [f for f in predicted.findings if f.box]
            any_finding |= bool(preds)
            pairs = sorted(((iou3d(p.box.voxel, t.box.voxel), i, j) for i, p in enumerate(preds)
                            for j, t in enumerate(truths) if p.type == t.type), reverse=True)
            used_p, used_t = set(), set()
            for overlap, i, j in pairs:
                if overlap < MATCH_IOU or i in used_p or j in used_t:
                    continue
                used_p.add(i)
                used_t.add(j)
                kind, big = truths[j].type, (truths[j].size_mm or 0) >= MIN_LESION_MM
                self.tp[kind] += 1
                self.tp8[kind] += big
                self.ious.append(overlap)
                before = preds[i].extra.get("box_before_regrounding")
                self.ious_before.append(iou3d(before, truths[j].box.voxel) if before else overlap)
            for i, p in enumerate(preds):
                if i not in used_p:
                    self.fp[p.type] += 1
                    self.fp8[p.type] += 1
            for j, t in enumerate(truths):
                if j not in used_t:
                    self.fn[t.type] += 1
                    self.fn8[t.type] += (t.size_mm or 0) >= MIN_LESION_MM
        if all(t.normal for t in phantom.truth.topics):
            self.normal_studies += 1
            self.normal_with_findings += any_finding
        truth_answers = {a.question: a.answer.lower() for a in phantom.truth.answers}
        for answer in answers:
            expected = truth_answers.get(answer.question)
            if expected in ("yes", "no"):
                self.yes_no.append(answer.answer == expected)
        self.kept.extend(kept)

    def summary(self) -> dict:
        def f1(tp, fp, fn):
            return 2 * tp / max(1, 2 * tp + fp + fn)

        # Per type: the types the truth holds. A sentence that names none ("lesion") is a false
        # finding of the overall figures, not a type the engine failed at.
        kinds = sorted(set(self.tp) | set(self.fn))
        total = lambda d: sum(d.values())  # noqa: E731
        return {
            "f1": round(f1(total(self.tp), total(self.fp), total(self.fn)), 4),
            "precision": round(total(self.tp) / max(1, total(self.tp) + total(self.fp)), 4),
            "recall": round(total(self.tp) / max(1, total(self.tp) + total(self.fn)), 4),
            "f1_8mm": round(f1(total(self.tp8), total(self.fp8), total(self.fn8)), 4),
            "per_type_f1": {k: round(f1(self.tp[k], self.fp[k], self.fn[k]), 4) for k in kinds},
            "per_type_f1_8mm": {k: round(f1(self.tp8[k], self.fp8[k], self.fn8[k]), 4) for k in kinds},
            "truth_findings": total(self.tp) + total(self.fn),
            "false_of_other_types": sum(n for k, n in self.fp.items() if k not in kinds),
            "median_iou": round(float(np.median(self.ious)), 4) if self.ious else None,
            "median_iou_before_regrounding": round(float(np.median(self.ious_before)), 4) if self.ious_before else None,
            "normal_studies": self.normal_studies,
            "normal_with_findings": round(self.normal_with_findings / max(1, self.normal_studies), 4),
            "yes_no_accuracy": round(float(np.mean(self.yes_no)), 4) if self.yes_no else None,
            "mean_kept_ratio": round(float(np.mean(self.kept)), 4) if self.kept else None,
        }


def phantom_reads(engine: DemoEngine, cases: Sequence[tuple[int, bool]], request: ReadRequest,
                  progress: Callable[[int, int], None] | None = None) -> Iterator[tuple[Phantom, tuple, Sampled]]:
    """Each (seed, all-normal) case rendered and read once, sampled with its seed: phantom, spacing, read."""
    for done, (case_seed, normal) in enumerate(cases):
        phantom = render_phantom(case_seed, normal=normal)
        spacing = (phantom.slice_spacing_mm, phantom.pixel_spacing_mm, phantom.pixel_spacing_mm)
        yield phantom, spacing, engine.sample(phantom.hu, spacing, replace(request, seed=case_seed))
        if progress:
            progress(done + 1, len(cases))


def evaluate(engine: DemoEngine, n: int, seed: int, ablation: bool = False, normal_share: float = 0.25,
             progress: Callable[[int, int], None] | None = None) -> dict[str, dict]:
    """Score the engine on ``n`` phantoms from ``seed`` plus ``normal_share * n`` all-normal ones."""
    request = ReadRequest()
    configs = {"consensus+regrounding": Tally()}
    calibrated = engine.thresholds != Thresholds()
    if calibrated:
        configs["default thresholds"] = Tally()
    if ablation:
        configs.update({"no regrounding": Tally(), "1 rollout": Tally(), "scheduling off": Tally(),
                        "no map check": Tally(), "no map check, 1 rollout": Tally()})
    n_normal = max(1, round(n * normal_share))
    cases = [(seed + i, False) for i in range(n)] + [(seed + n + i, True) for i in range(n_normal)]
    for phantom, spacing, sampled in phantom_reads(engine, cases, request, progress):
        kept = list(sampled.kept_ratio.values())
        topics, answers = engine.assemble(sampled, phantom.hu, spacing, request)
        configs["consensus+regrounding"].add(phantom, topics, answers, kept)
        if calibrated:
            configs["default thresholds"].add(
                phantom, *engine.assemble(sampled, phantom.hu, spacing, request, thresholds=Thresholds()), kept)
        if ablation:
            plain = replace(request, reground=False)
            configs["no regrounding"].add(phantom, *engine.assemble(sampled, phantom.hu, spacing, plain), kept)
            configs["1 rollout"].add(phantom, *engine.assemble(sampled, phantom.hu, spacing, plain, rollouts=1), kept)
            # Consensus as the only check, as MedVR has it: what it adds to one rollout without the finding maps.
            mapless = replace(plain, map_check=False)
            configs["no map check"].add(phantom, *engine.assemble(sampled, phantom.hu, spacing, mapless), kept)
            configs["no map check, 1 rollout"].add(
                phantom, *engine.assemble(sampled, phantom.hu, spacing, mapless, rollouts=1), kept)
            off = replace(request, pruning=False, seed=phantom.seed)
            unpruned = engine.sample(phantom.hu, spacing, off)
            configs["scheduling off"].add(phantom, *engine.assemble(unpruned, phantom.hu, spacing, off),
                                          list(unpruned.kept_ratio.values()))
    return {name: tally.summary() for name, tally in configs.items()}


def format_table(results: dict[str, dict]) -> str:
    """A markdown table of the headline figures, one row per configuration."""
    lines = ["| configuration | F1 | precision | recall | F1 >= 8 mm | worst type F1 >= 8 mm | median IoU | IoU before regrounding "
             "| normal studies with findings | yes/no accuracy | kept tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        worst = min(r["per_type_f1_8mm"].items(), key=lambda kv: kv[1]) if r["per_type_f1_8mm"] else ("-", 0)
        lines.append(f"| {name} | {r['f1']} | {r['precision']} | {r['recall']} | {r['f1_8mm']} | {worst[1]} ({worst[0]}) "
                     f"| {r['median_iou']} | {r['median_iou_before_regrounding']} | {r['normal_with_findings']} "
                     f"| {r['yes_no_accuracy']} | {r['mean_kept_ratio']} |")
    return "\n".join(lines)


def write_results(results: dict[str, dict], path: Path) -> None:
    path.write_text(json.dumps(results, indent=2) + "\n")
