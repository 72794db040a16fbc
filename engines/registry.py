"""Engines by name, as config and the CLI refer to them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engines.errors import CheckpointError, EngineError

ENGINES = ("demo", "medgemma")


def create_engine(name: str, *, weights: Path | None = None, model_path: Path | None = None,
                  device: str = "cpu", **options: Any):
    """Load engine ``name`` once; it holds its weights for its lifetime.

    ``demo`` uses Readout's shipped weights (or ``weights``); ``medgemma`` needs ``model_path``,
    a local folder with google/medgemma-1.5-4b-it (downloaded by the user; nothing is fetched).
    ``options`` go to the engine's constructor (e.g. ``max_slices``, ``pruning`` for medgemma).
    """
    if name == "demo":
        from engines.checkpoint import SHIPPED, load_checkpoint
        from engines.report import DemoEngine, Thresholds

        model, meta = load_checkpoint(weights or SHIPPED, device)
        # Weights calibrated after training carry their own decision thresholds.
        try:
            thresholds = Thresholds(**meta.get("thresholds", {}))
        except TypeError as error:
            raise CheckpointError(f"the thresholds in the JSON of {weights or SHIPPED} are not valid: {error}") from None
        return DemoEngine(model, device=device, thresholds=thresholds)
    if name == "medgemma":
        from engines.medgemma import MedGemmaEngine, PruningConfig

        if model_path is None:
            raise EngineError("the medgemma engine needs a model path: a local folder holding "
                              "google/medgemma-1.5-4b-it (readout run --model-path DIR, or model_path in the settings)")
        if isinstance(options.get("pruning"), dict):
            options["pruning"] = PruningConfig(**options["pruning"])
        return MedGemmaEngine.from_path(Path(model_path), device, **options)
    raise EngineError(f"unknown engine {name!r}; available: {', '.join(ENGINES)}")
