"""Adapter writers: PEFT folders (checked against peft itself) and ORT's .onnx_adapter."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
from handbuilt_graph import make_bundle, random_batch
from handbuilt_graph import manifest as handbuilt_manifest
from zoo_ort.providers import make_session

from zoo_ort.adapters import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    ZOO_META,
    bundle_fingerprint,
    load_peft_adapter,
    onnx_adapter_model_version,
    save_onnx_adapter,
    save_peft_adapter,
)
from zoo_ort.bundle import load_bundle
from zoo_ort.engine import OrtEngine
from zoo_ort.errors import ZooError
from zoo_ort.io import load_tensors, save_tensors


def _trained(manifest, seed=0):
    """(params, frozen): random trained tensors and the shared ones, without row dims."""
    rng = np.random.default_rng(seed)
    params, frozen = {}, {}
    for t in manifest.lora_tensors():
        value = rng.normal(0, 0.3, t.shape).astype(np.float32)
        (params if t.per_row else frozen)[t.input] = value
    return params, frozen


@pytest.mark.parametrize("mode", ["fa", "full"])
def test_peft_folder_layout_and_round_trip(tmp_path, mode):
    man = handbuilt_manifest(mode)
    params, frozen = _trained(man)
    out = save_peft_adapter(tmp_path / "adapter", man, params, frozen, extra={"step": 12})
    # no temp files; zoo-ort's metadata beside PEFT's two files
    assert sorted(p.name for p in out.iterdir()) == [PEFT_CONFIG, PEFT_WEIGHTS, ZOO_META]
    weights = load_tensors(out / PEFT_WEIGHTS)
    prefix = "base_model.model.layers.0.proj"
    a = {**params, **frozen}["layers.0.proj.lora_A"]
    b = params["layers.0.proj.lora_B"]
    assert set(weights) == {f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"}
    np.testing.assert_array_equal(weights[f"{prefix}.lora_A.weight"], a.T)  # [r, in]
    np.testing.assert_array_equal(weights[f"{prefix}.lora_B.weight"], b.T)  # [out, r]
    config = json.loads((out / PEFT_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"]) == (2, 4.0)
    assert config["target_modules"] == ["proj"] and config["fan_in_fan_out"] is False
    assert config["base_model_name_or_path"] == "handbuilt/tiny"
    assert (config["bias"], config["lora_dropout"], config["inference_mode"]) == ("none", 0.0, True)
    assert "zoo_ort" not in config
    block = json.loads((out / ZOO_META).read_text())
    assert block["bundle_fingerprint"] == bundle_fingerprint(man)
    assert block["mode"] == mode and block["step"] == 12 and block["sites"] == ["layers.0.proj"]

    loaded = load_peft_adapter(out, man)
    assert set(loaded) == {"layers.0.proj.lora_A", "layers.0.proj.lora_B"}
    np.testing.assert_array_equal(loaded["layers.0.proj.lora_A"], a)
    np.testing.assert_array_equal(loaded["layers.0.proj.lora_B"], b)


def test_adapter_config_holds_only_what_peft_knows(tmp_path):
    """peft warns about (and drops) keys its LoraConfig does not have: there must be none."""
    peft = pytest.importorskip("peft")
    import dataclasses

    man = handbuilt_manifest("fa")
    out = save_peft_adapter(tmp_path / "adapter", man, *_trained(man))
    config = json.loads((out / PEFT_CONFIG).read_text())
    known = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert set(config) <= known, sorted(set(config) - known)


def test_base_model_is_where_from_pretrained_finds_it(tmp_path):
    """The hub id when the bundle knows it, else the local model it was exported from."""
    from dataclasses import replace

    man = handbuilt_manifest("fa")
    hub = replace(man, source={"model": "smollm2-135m", "hub_id": "Org/Model", "location": "/x"})
    local = replace(man, source={"model": "tiny", "location": "/models/tiny"})
    for manifest, want in ((hub, "Org/Model"), (local, "/models/tiny")):
        folder = save_peft_adapter(tmp_path / want.replace("/", "_"), manifest, *_trained(man))
        assert json.loads((folder / PEFT_CONFIG).read_text())["base_model_name_or_path"] == want


def test_save_rejects_tensors_that_do_not_fit(tmp_path):
    man = handbuilt_manifest("fa")
    params, frozen = _trained(man)
    with pytest.raises(ZooError, match="missing"):
        save_peft_adapter(tmp_path / "a", man, params, {})
    bad = {"layers.0.proj.lora_B": np.zeros((3, 8), np.float32)}
    with pytest.raises(ZooError, match=r"lora_B has shape \[3, 8\]"):
        save_peft_adapter(tmp_path / "a", man, bad, frozen)
    assert not (tmp_path / "a" / PEFT_CONFIG).exists()


def test_load_rejects_adapters_of_other_bundles(tmp_path):
    man = handbuilt_manifest("fa")
    params, frozen = _trained(man)
    out = save_peft_adapter(tmp_path / "adapter", man, params, frozen)

    other_rank = json.loads((out / PEFT_CONFIG).read_text()) | {"r": 4}
    folder = tmp_path / "rank"
    folder.mkdir()
    (folder / PEFT_CONFIG).write_text(json.dumps(other_rank))
    (folder / PEFT_WEIGHTS).write_bytes((out / PEFT_WEIGHTS).read_bytes())
    with pytest.raises(ZooError, match="was made for a different bundle: rank 4"):
        load_peft_adapter(folder, man)

    renamed = {
        k.replace("layers.0", "layers.1"): v for k, v in load_tensors(out / PEFT_WEIGHTS).items()
    }
    save_tensors(out / PEFT_WEIGHTS, renamed)
    with pytest.raises(ZooError, match="different bundle: 2 tensor.s. missing.*2 unexpected"):
        load_peft_adapter(out, man)

    wrong_shape = {k: v[:, :1] if k.endswith("lora_B.weight") else v for k, v in renamed.items()}
    save_tensors(
        out / PEFT_WEIGHTS, {k.replace("layers.1", "layers.0"): v for k, v in wrong_shape.items()}
    )
    with pytest.raises(ZooError, match=r"lora_B.weight has shape \[8, 1\], expected \[8, 2\]"):
        load_peft_adapter(out, man)

    with pytest.raises(ZooError, match="no adapter_config.json"):
        load_peft_adapter(tmp_path / "nothing", man)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / PEFT_CONFIG).write_text((folder / PEFT_CONFIG).read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ZooError, match="safetensors only, never pickle"):
        load_peft_adapter(pickled, man)


def test_load_folds_a_different_alpha_into_b(tmp_path):
    man = handbuilt_manifest("fa")  # alpha 4, rank 2: scale 2
    params, frozen = _trained(man)
    out = save_peft_adapter(tmp_path / "adapter", man, params, frozen)
    config = json.loads((out / PEFT_CONFIG).read_text())
    (out / PEFT_CONFIG).write_text(json.dumps(config | {"lora_alpha": 8.0}))  # scale 4
    loaded = load_peft_adapter(out, man)
    np.testing.assert_allclose(loaded["layers.0.proj.lora_B"], 2.0 * params["layers.0.proj.lora_B"])
    (out / PEFT_CONFIG).write_text(json.dumps(config | {"lora_alpha": 4.0, "use_rslora": True}))
    loaded = load_peft_adapter(out, man)  # rsLoRA: 4/sqrt(2) instead of 4/2
    np.testing.assert_allclose(
        loaded["layers.0.proj.lora_B"], np.sqrt(2.0) * params["layers.0.proj.lora_B"], rtol=1e-6
    )


# -- .onnx_adapter -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fa", "full"])
def test_onnx_adapter_reads_back_and_drives_a_one_row_run(tmp_path, mode):
    bundle = make_bundle(tmp_path / "b", mode)
    man = bundle.manifest
    params, frozen = _trained(man, seed=1)
    path = save_onnx_adapter(tmp_path / "out" / "run.onnx_adapter", man, params, frozen)
    assert [p.name for p in path.parent.iterdir()] == ["run.onnx_adapter"]  # nothing left over

    adapter = ort.AdapterFormat.read_adapter(str(path))
    assert adapter.get_adapter_version() == 1
    assert adapter.get_model_version() == onnx_adapter_model_version(man)
    got = {k: np.array(v.numpy(), copy=True) for k, v in adapter.get_parameters().items()}
    feeds = {}
    for t in man.lora_tensors():
        value = {**params, **frozen}[t.input]
        feeds[t.input] = value[None] if t.per_row else value
        np.testing.assert_array_equal(got[t.input], feeds[t.input])
    assert got["layers.0.proj.lora_B"].shape == (1, 2, 8)

    session = make_session(bundle.model_path, "cpu", {})
    batch = random_batch(np.random.default_rng(2), 1, 6, 2, 3)
    direct = session.run(["loss", "candidate_logprobs"], {**batch.arrays(), **feeds})
    lora_adapter = ort.LoraAdapter()
    lora_adapter.Load(str(path))
    run_options = ort.RunOptions()
    run_options.add_active_adapter(lora_adapter)
    names = ["loss", "candidate_logprobs"]
    try:
        via = session.run(names, batch.arrays(), run_options)
    except ValueError as e:
        # ORT's Python wrapper insists on every required input before the C++ session (which
        # applies active adapters) sees the call; the C/C++/C#/Java APIs have no such check.
        assert "missing from input feed" in str(e)
        via = session._sess.run(names, batch.arrays(), run_options)
    np.testing.assert_allclose(via[0], direct[0], rtol=1e-6)
    np.testing.assert_allclose(via[1], direct[1], rtol=1e-6)
    other = session.run(names, {**batch.arrays(), **{k: v * 0 for k, v in feeds.items()}})
    assert not np.allclose(other[0], via[0])  # the adapter made a difference


# -- PEFT itself: the adapter folder on the original Hugging Face model -------------------------
def test_peft_from_pretrained_gives_the_bundle_losses(tiny_bundle, tiny_model_dir, tmp_path):
    import torch
    from export_reference import pad, random_examples
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    bundle = load_bundle(tiny_bundle)
    man = bundle.manifest
    init = bundle.initial_lora()
    rng = np.random.default_rng(8)
    frozen = {t.input: init[t.input] for t in man.lora_tensors() if not t.per_row}
    params = {t.input: rng.normal(0, 0.3, t.shape).astype(np.float32) for t in man.trainable()}
    folder = save_peft_adapter(tmp_path / "adapter", man, params, frozen)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft notes the unknown "zoo_ort" config block
        model = PeftModel.from_pretrained(base, folder).eval()
    state = get_peft_model_state_dict(model)
    saved = load_tensors(folder / PEFT_WEIGHTS)
    assert set(state) == set(saved)  # every site loaded, nothing extra
    for key, value in saved.items():
        np.testing.assert_array_equal(state[key].numpy(), value)

    examples = random_examples(rng, 384, [6, 11, 4, 9], 3, 2)
    ref_loss, ref_cand = [], []
    for e in examples:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([e.tokens])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1).numpy()[e.target_pos]
        ref_loss.append(-logp[np.arange(len(e.target_ids)), e.target_ids].mean())
        ref_cand.append(logp[:, e.candidates])

    lora = {**frozen, **{k: np.repeat(v[None], len(examples), 0) for k, v in params.items()}}
    engine = OrtEngine(bundle, threads=1)
    out = engine.forward(pad(examples, "right"), lora)
    np.testing.assert_allclose(out.loss, ref_loss, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.candidate_logprobs, np.stack(ref_cand), rtol=1e-4, atol=1e-4)

    base_only = engine.forward(
        pad(examples, "right"), {**lora, **{k: 0 * v for k, v in lora.items() if k in params}}
    )
    assert np.abs(base_only.loss - out.loss).max() > 1e-3  # the adapter matters

    # `zoo-ort eval --adapter DIR` reads the folder back into the same engine inputs
    loaded = load_peft_adapter(folder, man)
    for name, value in {**frozen, **params}.items():
        np.testing.assert_allclose(loaded[name], value, rtol=0, atol=0)
