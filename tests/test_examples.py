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


def test_sst2_example_config_resolves(tiny_bundle):
    """The SST-2 run's published settings load as a config and win over the recipe's."""
    from zoo_ort.app.wiring import resolve

    config = EXAMPLE.parent / "sst2-prge.toml"
    resolved = resolve(tiny_bundle, {"out": None}, config, for_training=False)
    s = resolved.settings
    assert (s.lr, s.schedule, s.steps, s.loss) == (
        0.005,
        "cosine",
        1600,
        "candidates",
    )
    assert s.task == "sst2" and s.data == "../shared/data/sst2"
    assert resolved.sources["lr"] == str(config) and resolved.sources["adam_eps"] == "default"


def test_app_example_trains_a_bundle_through_the_public_path(tiny_bundle, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "embed_in_app", EXAMPLE.parent / "embed_in_app.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(str(tiny_bundle), str(tmp_path / "run"), steps=4)
    assert set(result) == {"before", "after", "best"}
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "best" / "adapter.onnx_adapter").is_file()
