"""Save and load the demo model: safetensors weights (fp16) beside a JSON of config and training facts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from engines.errors import CheckpointError
from engines.model import ModelConfig, ReadoutVLM

SHIPPED = Path(__file__).with_name("weights") / "demo"


def save_checkpoint(model: ReadoutVLM, stem: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Write ``stem.safetensors`` (fp16) and ``stem.json`` (config + ``info``); returns what the JSON holds."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()
               if k != "head.weight"}  # tied to token_embed.weight
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    meta = {"config": model.config.to_dict(), **info}
    stem.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_checkpoint(stem: Path = SHIPPED, device: str = "cpu") -> tuple[ReadoutVLM, dict[str, Any]]:
    """The model saved at ``stem`` in float32 on ``device``, in eval mode, and its JSON."""
    weights, meta_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not weights.is_file() or not meta_path.is_file():
        raise CheckpointError(f"model weights not found: expected {weights} and {meta_path} (train with `readout train`)")
    meta = json.loads(meta_path.read_text())
    config = meta["config"]
    try:
        config = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    except TypeError as error:
        raise CheckpointError(f"{meta_path} describes a model this version cannot build: {error}") from None
    model = ReadoutVLM(config)
    state = {k: v.float() for k, v in load_file(str(weights)).items()}
    state["head.weight"] = state["token_embed.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(device).eval(), meta
