"""Shared fixtures: tiny random models (built offline) and bundles exported from them.

The exporter (torch, transformers) is imported inside the fixtures only, so test modules that
do not use them never load it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_model_dir("llama")``: a Hugging Face folder with a random tiny model + tokenizer.

    Built once per architecture and session (hidden 32, 2 layers, vocab 384, byte-level BPE).
    """
    from zoo_ort.exporters.tiny import make_tiny_model

    built: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{model_type}-src")
            built[model_type] = make_tiny_model(model_type, folder)
        return built[model_type]

    return get


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir) -> Path:
    """A bundle of a tiny random Llama: LoRA-FA, rank 4 (alpha 8), q_proj and v_proj, dynamic."""
    from zoo_ort.exporters import export_bundle

    out = tmp_path_factory.mktemp("tiny-bundle") / "bundle"
    return export_bundle(str(tiny_model_dir("llama")), out, rank=4, mode="fa", seed=0)


@pytest.fixture(scope="session")
def tiny_bundle_full(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir) -> Path:
    """As ``tiny_bundle`` but mode "full": A and B both per row."""
    from zoo_ort.exporters import export_bundle

    out = tmp_path_factory.mktemp("tiny-bundle-full") / "bundle"
    return export_bundle(str(tiny_model_dir("llama")), out, rank=4, mode="full", seed=0)
