"""OrtEngine against independent references: a numpy model of a hand-built graph, static padding
against the unpadded dynamic run, and the manifest/graph consistency check."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from handbuilt_graph import (
    make_bundle,
    random_batch,
    random_lora,
    reference,
    weights,
)
from zoo_ort.providers import parse_options

from zoo_ort.bundle import load_bundle
from zoo_ort.engine import OrtEngine
from zoo_ort.engine.protocol import Engine, TokenBatch
from zoo_ort.errors import ZooError

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
STATIC = {"N": 3, "T": 9, "K": 4, "C": 5}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    return {
        "fa": make_bundle(root / "fa", "fa"),
        "full": make_bundle(root / "full", "full"),
        "static": make_bundle(root / "static", "fa", STATIC),
        "static_full": make_bundle(root / "static_full", "full", STATIC),
    }


def _check(out, ref, rtol=2e-5, atol=2e-5):
    np.testing.assert_allclose(out.loss, ref[0], rtol=rtol, atol=atol)
    np.testing.assert_allclose(out.candidate_logprobs, ref[1], rtol=rtol, atol=atol)


@pytest.mark.parametrize("mode", ["fa", "full"])
def test_matches_the_numpy_reference(bundles, mode):
    bundle = bundles[mode]
    engine = OrtEngine(bundle, threads=1)
    assert isinstance(engine, Engine)
    assert engine.active_providers == ["CPUExecutionProvider"] and not engine.uses_io_binding
    rng = np.random.default_rng(0)
    batch = random_batch(rng, 6, 7, 3, 4)
    lora = random_lora(bundle.manifest, 6, rng)
    out = engine.forward(batch, lora)
    assert out.loss.dtype == np.float32 and out.loss.shape == (6,)
    assert out.candidate_logprobs.shape == (6, 3, 4)
    _check(out, reference(weights(), batch, lora, bundle.manifest.lora.scale))
    # rows really carry their own adapters: changing row 2's B changes row 2 only
    lora2 = {k: v.copy() for k, v in lora.items()}
    lora2[bundle.manifest.trainable()[-1].input][2] += 1.0
    out2 = engine.forward(batch, lora2)
    changed = ~np.isclose(out2.loss, out.loss)
    assert changed.tolist() == [False, False, True, False, False, False]


def test_zero_b_is_the_base_model(bundles):
    bundle = bundles["fa"]
    engine = OrtEngine(bundle, threads=1)
    batch = random_batch(np.random.default_rng(1), 2, 5, 2, 2)
    init = bundle.initial_lora()
    lora = {k: (np.repeat(v[None], 2, 0) if k.endswith("lora_B") else v) for k, v in init.items()}
    # the initial adapter (B = 0) must leave the base model untouched: same as no LoRA path at all
    no_lora = {**lora, "layers.0.proj.lora_A": np.zeros_like(init["layers.0.proj.lora_A"])}
    _check(engine.forward(batch, lora), reference(weights(), batch, no_lora, 0.0))


@pytest.mark.parametrize(
    ("rows", "t", "k", "c"), [(7, 6, 3, 2), (3, 9, 4, 5), (1, 2, 1, 1), (6, 9, 2, 5)]
)
@pytest.mark.parametrize("mode", ["fa", "full"])
def test_static_padding_is_invisible(bundles, mode, rows, t, k, c):
    static = bundles["static" if mode == "fa" else "static_full"]
    dynamic = bundles[mode]
    rng = np.random.default_rng(rows * 100 + t)
    batch = random_batch(rng, rows, t, k, c)
    lora = random_lora(static.manifest, rows, rng)
    out = OrtEngine(static, threads=1).forward(batch, lora)
    assert out.loss.shape == (rows,) and out.candidate_logprobs.shape == (rows, k, c)
    _check(out, reference(weights(), batch, lora, static.manifest.lora.scale))
    same = OrtEngine(dynamic, threads=1).forward(batch, lora)
    np.testing.assert_allclose(out.loss, same.loss, rtol=1e-6, atol=1e-6)


def test_static_limits(bundles):
    engine = OrtEngine(bundles["static"], threads=1)
    rng = np.random.default_rng(2)
    for t, k, c, symbol in ((10, 2, 2, "T=10"), (5, 5, 2, "K=5"), (5, 2, 6, "C=6")):
        batch = random_batch(rng, 2, t, k, c)
        with pytest.raises(ZooError, match=f"batch has {symbol} but the bundle was exported"):
            engine.forward(batch, random_lora(engine.manifest, 2, rng))


def test_bad_lora_feeds(bundles):
    engine = OrtEngine(bundles["fa"], threads=1)
    rng = np.random.default_rng(3)
    batch = random_batch(rng, 3, 5, 2, 2)
    lora = random_lora(engine.manifest, 3, rng)
    with pytest.raises(ZooError, match="missing"):
        engine.forward(batch, {"layers.0.proj.lora_A": lora["layers.0.proj.lora_A"]})
    with pytest.raises(ZooError, match=r"lora_B has shape \[2, 2, 8\], expected \[3, 2, 8\]"):
        engine.forward(batch, {**lora, "layers.0.proj.lora_B": lora["layers.0.proj.lora_B"][:2]})
    with pytest.raises(ZooError, match="unexpected"):
        engine.forward(batch, {**lora, "extra": np.zeros(1)})
    short = TokenBatch(**{**batch.arrays(), "target_ids": batch.target_ids[:2]})
    with pytest.raises(ZooError, match="target_ids has shape"):
        engine.forward(short, lora)


def _edit_manifest(bundle, edit) -> None:
    path = bundle.path / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _input(data, name):
    return next(t for t in data["inputs"] if t["name"] == name)


@pytest.mark.parametrize(
    ("edit", "static", "message"),
    [
        (
            lambda d: _input(d, "target_mask").update(dtype="int64"),
            None,
            "input target_mask is tensor(float) in the graph, tensor(int64) expected",
        ),
        (lambda d: _input(d, "input_ids").update(name="tokens"), None, "input tokens is not in"),
        (
            lambda d: _input(d, "layers.0.proj.lora_B").update(shape=["N", 2, 8, 1]),
            None,
            "has rank 3 in the graph, 4 in the manifest",
        ),
        (
            lambda d: _input(d, "layers.0.proj.lora_A").update(shape=[8, 3]),
            None,
            "axis 1 is 2 in the graph, 3 in the manifest",
        ),
        (lambda d: d["outputs"].pop(), None, "the manifest lists no output candidate_logprobs"),
        (lambda d: d.update(static=None), STATIC, "axis 0 is fixed at 3 in the"),
        (
            lambda d: _input(d, "input_ids").update(shape=[3, 10]),
            STATIC,
            "input input_ids axis 1 is 9 in the graph, 10 in the manifest",
        ),
        (
            lambda d: d["lora"]["sites"][0]["B"].update(input="other"),
            None,
            "lists no input for LoRA tensor other",
        ),
    ],
)
def test_manifest_graph_mismatch(tmp_path, edit, static, message):
    bundle = make_bundle(tmp_path / "b", "fa", static)
    OrtEngine(bundle, threads=1)  # consistent as made
    _edit_manifest(bundle, edit)
    with pytest.raises(ZooError, match="bundle's manifest does not match its graph") as info:
        OrtEngine(load_bundle(bundle.path), threads=1)
    assert message in str(info.value)


def test_fallback_engine_runs_on_cpu(bundles):
    engine = OrtEngine(bundles["fa"], "cuda", parse_options("cuda", {}), fallback="cpu", threads=1)
    assert engine.active_providers == ["CPUExecutionProvider"] and not engine.uses_io_binding
    rng = np.random.default_rng(4)
    batch = random_batch(rng, 2, 4, 1, 1)
    lora = random_lora(engine.manifest, 2, rng)
    _check(engine.forward(batch, lora), reference(weights(), batch, lora, 2.0))


# -- an exported bundle (the exporter's tiny Llama) ----------------------------------------------
@pytest.fixture(scope="module")
def tiny_static(tiny_model_dir, tmp_path_factory):
    from zoo_ort.exporters import export_bundle

    out = tmp_path_factory.mktemp("tiny-static") / "bundle"
    src = str(tiny_model_dir("llama"))
    return export_bundle(
        src, out, rank=4, mode="fa", seed=0, rows=4, seq_len=16, targets=4, candidates=3
    )


def test_exported_bundles_static_and_dynamic_agree(tiny_bundle, tiny_static):
    from export_reference import OrtRunner, pad, random_examples
    from export_reference import random_lora as tiny_lora

    dynamic, static = load_bundle(tiny_bundle), load_bundle(tiny_static)
    assert static.manifest.static == {"N": 4, "T": 16, "K": 4, "C": 3}
    rng = np.random.default_rng(5)
    examples = random_examples(rng, 384, [5, 9, 12, 3, 7, 11], 3, 2)
    batch = pad(examples, "right")
    lora = tiny_lora(dynamic, 6, rng)
    out_dynamic = OrtEngine(dynamic, threads=1).forward(batch, lora)
    direct = OrtRunner(dynamic)(batch, lora)
    np.testing.assert_allclose(out_dynamic.loss, direct[0], rtol=1e-6)
    out_static = OrtEngine(static, threads=1).forward(batch, lora)
    np.testing.assert_allclose(out_static.loss, out_dynamic.loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        out_static.candidate_logprobs, out_dynamic.candidate_logprobs, rtol=1e-5, atol=1e-5
    )


# -- CUDA: IO binding ----------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and an NVIDIA GPU")
@pytest.mark.parametrize("kind", ["fa", "static"])
def test_cuda_engine_matches_cpu_and_keeps_tensors_on_the_device(bundles, kind):
    bundle = bundles[kind]
    gpu = OrtEngine(bundle, "cuda", parse_options("cuda", {}))
    assert gpu.active_providers[0] == "CUDAExecutionProvider" and gpu.uses_io_binding
    cpu = OrtEngine(bundle, "cpu")
    rng = np.random.default_rng(6)
    batch = random_batch(rng, 3, 6, 2, 3)
    name = "layers.0.proj.lora_B"
    pointers = []
    for _ in range(3):
        lora = random_lora(bundle.manifest, 3, rng)
        out_gpu, out_cpu = gpu.forward(batch, lora), cpu.forward(batch, lora)
        np.testing.assert_allclose(out_gpu.loss, out_cpu.loss, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(
            out_gpu.candidate_logprobs, out_cpu.candidate_logprobs, rtol=1e-4, atol=1e-4
        )
        value = gpu._device.value(name)
        assert value.device_name().lower().startswith("cuda")
        pointers.append(value.data_ptr())
    assert len(set(pointers)) == 1  # LoRA tensors were updated in place, not reallocated


# -- the IO-binding path, exercised with host memory (no GPU needed) ------------------------------
def test_io_binding_path_on_the_host(bundles):
    from zoo_ort.engine.ort import _DeviceFeeds

    bundle = bundles["static"]
    engine = OrtEngine(bundle, threads=1)
    engine._device = _DeviceFeeds(engine.session, "cpu", 0)
    rng = np.random.default_rng(9)
    batch = random_batch(rng, 5, 6, 2, 3)
    pointers = []
    for _ in range(3):
        lora = random_lora(bundle.manifest, 5, rng)
        _check(engine.forward(batch, lora), reference(weights(), batch, lora, 2.0))
        pointers.append(engine._device.value("layers.0.proj.lora_B").data_ptr())
    assert len(set(pointers)) == 1  # same shape every step: updated in place
    assert engine.uses_io_binding


def test_io_binding_failure_on_first_use_falls_back_to_host_feeds(bundles):
    engine = OrtEngine(bundles["fa"], threads=1)

    class Broken:
        def run(self, feeds):
            raise RuntimeError("no device allocator")

    engine._device = Broken()
    rng = np.random.default_rng(10)
    batch = random_batch(rng, 2, 4, 1, 2)
    lora = random_lora(engine.manifest, 2, rng)
    _check(engine.forward(batch, lora), reference(weights(), batch, lora, 2.0))
    assert not engine.uses_io_binding


def test_empty_batch(bundles):
    for kind in ("fa", "static"):
        engine = OrtEngine(bundles[kind], threads=1)
        batch = random_batch(np.random.default_rng(11), 2, 4, 2, 3).take(slice(0, 0))
        out = engine.forward(batch, random_lora(engine.manifest, 0, np.random.default_rng(0)))
        assert out.loss.shape == (0,) and out.candidate_logprobs.shape == (0, 2, 3)
