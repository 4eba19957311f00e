"""NPU targets: the restructured static graph against the dynamic bundle, ORT's mobile usability
checker's coverage of it, and the ORT-format model for Android."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from zoo_ort.bundle import load_bundle, npu_inputs
from zoo_ort.engine import OrtEngine
from zoo_ort.errors import ZooError

# ops that building the mask and the in-graph loss used to bring (ORT's checker: not NNAPI)
HOST_SIDE_OPS = {"And", "CumSum", "GatherElements", "GatherND", "LogSoftmax", "Where", "IsNaN"}


@pytest.fixture(scope="module")
def nnapi_bundle(tiny_model_dir, tmp_path_factory):
    from zoo_ort.exporters import export_bundle

    out = tmp_path_factory.mktemp("tiny-nnapi") / "bundle"
    src = str(tiny_model_dir("llama"))
    return export_bundle(
        src, out, rank=4, mode="fa", seed=0, rows=4, seq_len=16, targets=4, candidates=3,
        target="nnapi",
    )  # fmt: skip


def _batch_and_lora(bundle, rng):
    from export_reference import pad, random_examples, random_lora

    examples = random_examples(rng, 384, [5, 9, 12, 3, 7, 11], 3, 2)
    return pad(examples, "right"), random_lora(bundle, 6, rng)


def test_npu_graph_matches_dynamic_bundle(tiny_bundle, nnapi_bundle):
    dynamic, npu = load_bundle(tiny_bundle), load_bundle(nnapi_bundle)
    m = npu.manifest
    assert m.static == {"N": 4, "T": 16, "K": 4, "C": 3}
    assert m.graph["target"] == "nnapi" and m.graph["host_inputs"]["scheme"] == "npu-v1"
    from zoo_ort.exporters.mobile import NPU_INPUTS

    from zoo_ort.bundle import NPU_INPUT_NAMES

    assert [s.name for s in NPU_INPUTS] == list(NPU_INPUT_NAMES)
    assert [i.name for i in m.inputs][: len(NPU_INPUTS)] == list(NPU_INPUT_NAMES)
    rng = np.random.default_rng(5)
    batch, lora = _batch_and_lora(dynamic, rng)  # 6 rows: two runs of N=4, the second padded
    want = OrtEngine(dynamic, threads=1).forward(batch, lora)
    got = OrtEngine(npu, threads=1).forward(batch, lora)
    np.testing.assert_allclose(got.loss, want.loss, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.candidate_logprobs, want.candidate_logprobs, atol=1e-4, rtol=0)
    # and the LoRA rows still matter: another B for row 1 moves row 1's loss only
    name = next(t.input for t in m.trainable())
    moved = dict(lora)
    moved[name] = lora[name].copy()
    moved[name][1] += 0.5 * rng.standard_normal(moved[name][1].shape).astype(np.float32)
    again = OrtEngine(npu, threads=1).forward(batch, moved)
    changed = np.abs(again.loss - got.loss) > 1e-6
    assert changed.tolist() == [False, True, False, False, False, False]


def test_masked_slots_stay_finite(nnapi_bundle):
    """A masked target slot (weight 0) must not turn the loss into NaN, whatever its id."""
    from export_reference import pad, random_examples

    npu = load_bundle(nnapi_bundle)
    rng = np.random.default_rng(9)
    batch = pad(random_examples(rng, 384, [4, 6], 3, 2), "right")
    batch.target_mask[:, 1:] = 0.0
    lora = npu.initial_lora()
    lora = {
        t.input: np.repeat(lora[t.input][None], 2, 0) if t.per_row else lora[t.input]
        for t in npu.manifest.lora_tensors()
    }
    out = OrtEngine(npu, threads=1).forward(batch, lora)
    assert np.isfinite(out.loss).all() and np.isfinite(out.candidate_logprobs).all()


def test_npu_coverage_meets_target(nnapi_bundle):
    from zoo_ort.exporters.mobile import report

    cov = report(nnapi_bundle)
    nnapi, mlprogram = cov["nnapi"], cov["coreml_mlprogram"]
    assert nnapi.fraction >= 0.9 and nnapi.partitions == 1, nnapi.line()
    assert mlprogram.fraction >= 0.9 and mlprogram.partitions <= 3, mlprogram.line()
    assert cov["coreml_neuralnetwork"].fraction >= 0.9, cov["coreml_neuralnetwork"].line()
    for c in cov.values():
        assert not {op.split(":")[-1] for op in c.unsupported_ops} & HOST_SIDE_OPS, c.line()


def test_plain_static_export_is_below_target(tiny_model_dir, tmp_path):
    """The coverage check can fail: the plain static graph (in-graph mask and loss) misses it."""
    from zoo_ort.exporters import export_bundle
    from zoo_ort.exporters.mobile import report

    out = export_bundle(
        str(tiny_model_dir("llama")), tmp_path / "b", rank=4, rows=2, seq_len=8, targets=2
    )
    nnapi = report(out)["nnapi"]
    assert nnapi.fraction < 0.9 and nnapi.partitions > 3
    assert {op.split(":")[-1] for op in nnapi.unsupported_ops} & HOST_SIDE_OPS


def test_ort_format_model_runs_like_the_onnx_graph(nnapi_bundle):
    npu = load_bundle(nnapi_bundle)
    ort_file = npu.path / npu.manifest.graph["ort_file"]
    assert ort_file.name == "model.ort" and ort_file.read_bytes()[4:8] == b"ORTM"
    rng = np.random.default_rng(3)
    batch, lora = _batch_and_lora(npu, rng)
    rows = slice(0, 4)
    tokens = {k: np.pad(v[rows], ((0, 0), (0, 16 - v.shape[1]))) for k, v in batch.arrays().items()
              if k in ("input_ids", "attention_mask")}  # fmt: skip
    for k in ("target_pos", "target_ids", "target_mask", "candidate_ids"):
        tokens[k] = batch.arrays()[k][rows]
    tokens["target_pos"] = np.pad(tokens["target_pos"], ((0, 0), (0, 1)))
    tokens["target_ids"] = np.pad(tokens["target_ids"], ((0, 0), (0, 1)))
    tokens["target_mask"] = np.pad(tokens["target_mask"], ((0, 0), (0, 1)))
    tokens["candidate_ids"] = np.pad(tokens["candidate_ids"], ((0, 0), (0, 1)), mode="edge")
    feeds = npu_inputs(tokens, 384)
    feeds.update({k: (v[rows] if v.ndim == 3 else v) for k, v in lora.items()})
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in npu.manifest.inputs}}
    outs = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)
        for p in (npu.model_path, ort_file)
    ]
    for a, b in zip(*outs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_npu_target_needs_static_shapes(tiny_model_dir, tmp_path):
    from zoo_ort.exporters import export_bundle

    with pytest.raises(ZooError, match="needs static shapes"):
        export_bundle(str(tiny_model_dir("llama")), tmp_path / "b", target="nnapi")
    with pytest.raises(ZooError, match="sets its own precision"):
        export_bundle(
            str(tiny_model_dir("llama")), tmp_path / "b", rows=2, seq_len=8, target="qnn",
            quantize="int8",
        )  # fmt: skip
    assert not (tmp_path / "b").exists()


# -- QNN: QDQ base, float LoRA path -------------------------------------------------------------
@pytest.fixture(scope="module")
def qnn_bundle(tiny_model_dir, tmp_path_factory):
    from zoo_ort.exporters import export_bundle

    out = tmp_path_factory.mktemp("tiny-qnn") / "bundle"
    src = str(tiny_model_dir("llama"))
    return export_bundle(
        src, out, rank=4, mode="fa", seed=0, rows=4, seq_len=16, targets=4, candidates=3,
        target="qnn",
    )  # fmt: skip


def _lora_response(engine, batch, lora, moves):
    """Per-row loss change when every row's B tensors move by that row's ``moves``."""
    moved = {k: v + moves[k] if k in moves else v for k, v in lora.items()}
    return engine.forward(batch, moved).loss - engine.forward(batch, lora).loss


def _moves(bundle, rows, rng, only_row=None):
    moves = {}
    for t in bundle.manifest.trainable():
        m = 0.3 * rng.standard_normal((rows, *t.shape)).astype(np.float32)
        if only_row is not None:
            keep = np.zeros((rows, 1, 1), np.float32)
            keep[only_row] = 1.0
            m *= keep
        moves[t.input] = m
    return moves


def test_qdq_bundle_keeps_the_lora_signal(nnapi_bundle, qnn_bundle, tmp_path):
    import shutil

    import onnx
    from zoo_ort.exporters.qdq import calibration_tokens, quantize_qdq

    fp32, qdq = load_bundle(nnapi_bundle), load_bundle(qnn_bundle)
    assert qdq.manifest.graph["base_precision"] == "qdq-uint8"
    graph = onnx.load(str(qdq.model_path), load_external_data=False).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 10
    lora_inputs = {t.input for t in qdq.manifest.lora_tensors()}
    quantized = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    assert not quantized & lora_inputs  # no fixed scale on any LoRA tensor

    rng = np.random.default_rng(21)
    batch, lora = _batch_and_lora(fp32, rng)
    e_fp32, e_qdq = OrtEngine(fp32, threads=1), OrtEngine(qdq, threads=1)
    # one row's adapter moves: that row's loss moves, the others' stay exactly where they were
    single = _moves(fp32, 6, rng, only_row=2)
    d_qdq = _lora_response(e_qdq, batch, lora, single)
    assert np.abs(d_qdq[2]) > 1e-3 and np.all(d_qdq[[0, 1, 3, 4, 5]] == 0)
    # every row moves differently: the QDQ bundle's responses follow fp32's
    moves = _moves(fp32, 6, rng)
    d_fp32 = _lora_response(e_fp32, batch, lora, moves)
    d_qdq = _lora_response(e_qdq, batch, lora, moves)
    assert np.corrcoef(d_fp32, d_qdq)[0, 1] > 0.8, (d_fp32, d_qdq)

    # negative control: quantizing the LoRA path too (calibrated at B = 0) kills the signal
    control = tmp_path / "control"
    shutil.copytree(nnapi_bundle, control)
    s = fp32.manifest.static
    tokens = calibration_tokens(s["N"], s["T"], s["K"], s["C"], 384, 2, seed=0)
    init = fp32.initial_lora()
    lora_feeds = {
        t.input: np.repeat(init[t.input][None], s["N"], 0) if t.per_row else init[t.input]
        for t in fp32.manifest.lora_tensors()
    }
    calibration = [npu_inputs(tok, 384) | lora_feeds for tok in tokens]
    quantize_qdq(fp32.model_path, control / "model.onnx", [], calibration)
    d_control = _lora_response(OrtEngine(load_bundle(control), threads=1), batch, lora, moves)
    assert np.abs(d_control).max() < 0.1 * np.abs(d_fp32).max(), (d_control, d_fp32)
