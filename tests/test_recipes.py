"""Recipes derived from another (``base = ...``), and a recipe's LoRA ``layers`` and ``mode``
as export defaults that flags override."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

import pytest

from zoo_ort.errors import ZooError


def _raw(name: str) -> dict:
    text = (resources.files("zoo_ort.models") / f"{name}.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def test_head_recipe_is_its_base_with_the_head_lora():
    """The derived recipe, merged by hand from the two files: every table the base's, updated
    key by key; what it does not state (source, estimator, batches, schedule) stays the base's."""
    from zoo_ort.exporters import load_recipe

    from zoo_ort.settings import resolve_settings

    base, head = _raw("smollm2-135m"), _raw("smollm2-135m-head")
    assert head["base"] == "smollm2-135m"
    got = load_recipe("smollm2-135m-head")
    assert "base" not in got and got["name"] == "smollm2-135m-head"
    assert got["hub_id"] == base["hub_id"] and got["offline"] == base["offline"]
    assert got["description"] == head["description"] != base["description"]
    assert got["static"] == base["static"]
    for table in ("lora", "train"):
        assert got[table] == {**base[table], **head[table]}
    assert got["lora"] | {"target_modules": None} == {
        "target_modules": None,
        "rank": 1,
        "alpha": 16,
        "layers": [29, 30],
        "mode": "full",
    }
    assert got["lora"]["target_modules"] == ["o_proj"]
    train = got["train"]
    assert train["lr"] == 5e-3 and train["steps"] == 2800 and train["trunk_cache_mb"] == 2048
    assert train["estimator"] == base["train"]["estimator"] == "fzoo"
    assert train["sampler"] == "balanced" and train["queries"] == 4
    settings = resolve_settings([("smollm2-135m-head", train)]).settings
    assert settings.trunk_cache_mb == 2048.0 and settings.lr == 5e-3
    assert load_recipe("smollm2-135m")["train"] == base["train"]  # the base is untouched


@pytest.fixture
def recipe_folder(tmp_path, monkeypatch):
    """Recipes read from ``tmp_path`` instead of the package."""
    from zoo_ort.exporters import recipes

    monkeypatch.setattr(recipes.resources, "files", lambda _package: tmp_path)
    return tmp_path


def test_bad_bases(recipe_folder: Path):
    from zoo_ort.exporters import load_recipe

    (recipe_folder / "root.toml").write_text('hub_id = "a/b"\n[train]\nlr = 1.0\nsteps = 5\n')
    (recipe_folder / "mid.toml").write_text('base = "root"\n[train]\nlr = 2.0\n')
    (recipe_folder / "leaf.toml").write_text('base = "mid"\nhub_id = "c/d"\n[train]\nsteps = 7\n')
    leaf = {"name": "leaf", "hub_id": "c/d", "train": {"lr": 2.0, "steps": 7}}
    assert load_recipe("leaf") == leaf
    (recipe_folder / "a.toml").write_text('base = "b"\n')
    (recipe_folder / "b.toml").write_text('base = "a"\n')
    (recipe_folder / "orphan.toml").write_text('base = "nowhere"\n')
    (recipe_folder / "broken.toml").write_text('base = "root"\n[train\n')
    for name, message in [
        ("a", r"recipe 'a': its bases form a cycle \(a -> b -> a\)"),
        ("orphan", "unknown base 'nowhere' of recipe 'orphan'; known recipes: a, b, broken, leaf"),
        ("broken", "recipe 'broken' is not valid TOML"),
        ("gone", "unknown recipe 'gone'"),
    ]:
        with pytest.raises(ZooError, match=message) as info:
            load_recipe(name)
        assert "\n" not in str(info.value)


@pytest.fixture
def recipe_source(monkeypatch, tiny_model_dir):
    """``recipe_source(lora)``: export reads the tiny llama (2 layers) as if a recipe named it."""
    pytest.importorskip("torch")
    from zoo_ort.exporters import export as export_module
    from zoo_ort.exporters.sources import Source

    def use(lora: dict) -> str:
        folder = str(tiny_model_dir("llama"))
        recipe = {"name": "tiny-recipe", "lora": lora, "train": {}}
        source = Source("tiny-recipe", "folder", folder, None, recipe)
        monkeypatch.setattr(export_module, "resolve", lambda _model: source)
        return "tiny-recipe"

    return use


def test_recipe_layers_and_mode_are_export_defaults(tmp_path, recipe_source):
    from zoo_ort.exporters import export_bundle

    from zoo_ort.bundle import load_bundle

    model = recipe_source(
        {"target_modules": ["o_proj"], "rank": 2, "alpha": 4, "layers": [1, 2], "mode": "full"}
    )
    manifest = load_bundle(export_bundle(model, tmp_path / "recipe")).manifest
    lora = manifest.lora
    assert manifest.trunk is not None and manifest.trunk.layers == [1, 2]
    assert lora.mode == "full" and lora.rank == 2 and lora.layers == [1, 2]
    assert [s.module for s in lora.sites] == ["model.layers.1.self_attn.o_proj"]

    # flags win over the recipe: LoRA-FA, and one graph with the recipe's layers
    flagged = load_bundle(export_bundle(model, tmp_path / "flags", mode="fa", split=False))
    assert flagged.manifest.lora.mode == "fa" and flagged.manifest.trunk is None
    assert flagged.manifest.lora.layers == [1, 2]

    # a recipe without them: every layer, LoRA-FA
    plain = recipe_source({"target_modules": ["o_proj"], "rank": 2})
    every = load_bundle(export_bundle(plain, tmp_path / "plain")).manifest
    assert every.lora.mode == "fa" and every.trunk is None and every.lora.layers is None
    assert len(every.lora.sites) == 2


def test_bad_recipe_layers_and_mode(tmp_path, recipe_source):
    from zoo_ort.exporters import export_bundle

    out = tmp_path / "b"
    static = {"rows": 2, "seq_len": 8}
    for lora, message, kwargs in [
        ({"layers": [1, 5]}, r"lora_layers 1:5 is not a range of this model's layers", {}),
        ({"layers": [0, 2]}, "starts at layer 0", {}),
        ({"layers": [1, 2, 3]}, "lora_layers must be two layer indices", {}),
        ({"mode": "half"}, "unknown LoRA mode 'half'", {}),
        ({"layers": [1, 2]}, r"lora_layers 1:2 make a trunk \+ head .* --one-graph", static),
    ]:
        model = recipe_source({"rank": 2} | lora)
        with pytest.raises(ZooError, match=message) as info:
            export_bundle(model, out, **kwargs)
        assert "\n" not in str(info.value)
        assert not out.exists()
