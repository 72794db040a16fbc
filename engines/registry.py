"""Engines by name, as config and the CLI refer to them."""

from __future__ import annotations

from pathlib import Path

from engines.checkpoint import SHIPPED, load_checkpoint
from engines.errors import EngineError
from engines.report import DemoEngine

ENGINES = ("demo",)


def create_engine(name: str, *, weights: Path | None = None, device: str = "cpu") -> DemoEngine:
    """Load engine ``name`` once; it holds its weights for its lifetime."""
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}; available: {', '.join(ENGINES)}")
    model, _ = load_checkpoint(weights or SHIPPED, device)
    return DemoEngine(model, device=device)
