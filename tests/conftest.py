"""Shared fixtures: phantom studies on disk and the real test data beside the checkout."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from engines.phantom import phantom_datasets, render_phantom, write_datasets

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.fail(f"real test data missing: {REAL_DATA} (it sits beside the checkout in CI)")
    return REAL_DATA


@pytest.fixture(scope="session")
def make_phantom_study(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Write a phantom study (``dicom/`` + ``truth.json``) once per argument set; returns its folder."""
    made: dict[tuple, Path] = {}

    def make(seed: int, findings: dict[str, Sequence[str]] | None = None, normal: bool = False) -> Path:
        key = (seed, normal, tuple(sorted((k, tuple(v)) for k, v in (findings or {}).items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(f"phantom{seed}")
            phantom = render_phantom(seed, normal=normal, findings=findings)
            write_datasets(phantom_datasets(phantom), folder / "dicom")
            phantom.truth.save(folder / "truth.json")
            made[key] = folder
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random MedGemma-shaped checkpoint (tests/tiny_gemma.py), saved once per session."""
    from tests.tiny_gemma import (
        save_tiny_medgemma,  # transformers: only for the tests that need it
    )

    return save_tiny_medgemma(tmp_path_factory.mktemp("tiny-medgemma"))
