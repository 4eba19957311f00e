"""The embedding example runs and trains its own engine (the trainer knows nothing of ONNX)."""

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "embed_own_engine.py"


def test_embedding_example_trains_its_own_engine():
    spec = importlib.util.spec_from_file_location("embed_own_engine", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main()
    assert result["before"] < 0.65
    assert result["after"] > 0.75
