"""Record what the shipped demo weights say about phantom 9001 (greedy, one rollout).

Run after replacing the weights: `.venv/bin/python tests/data/record_demo_reference.py`;
tests/test_engine.py checks the shipped weights still give exactly this.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engines.checkpoint import load_checkpoint  # noqa: E402
from engines.phantom import render_phantom  # noqa: E402
from engines.report import DemoEngine, ReadRequest  # noqa: E402

SEED = 9001
REQUEST = ReadRequest(rollouts=1, temperature=0.0, reground=False)


def greedy_read() -> dict:
    phantom = render_phantom(SEED)
    spacing = (phantom.slice_spacing_mm, phantom.pixel_spacing_mm, phantom.pixel_spacing_mm)
    sampled = DemoEngine(load_checkpoint()[0]).sample(phantom.hu, spacing, REQUEST)
    return {
        "kept_ratio": {k: round(v, 6) for k, v in sampled.kept_ratio.items()},
        "findings": {t: [[c.type, c.text, list(c.box)] for c in cs] for t, cs in sampled.candidates.items()},
        "normal": sampled.normal_texts,
        "answers": {q: [[text, list(box) if box else None] for text, box in replies] for q, replies in sampled.answers.items()},
    }


if __name__ == "__main__":
    path = Path(__file__).with_name("demo_reference.json")
    path.write_text(json.dumps(greedy_read(), indent=1) + "\n")
    print(f"written {path}")
