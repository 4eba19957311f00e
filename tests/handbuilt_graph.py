"""A tiny hand-built bundle that follows the export contract, and a numpy reference for it.

The graph: token embedding -> masked causal prefix mean (stands in for attention: position t sees
the real tokens <= t) -> one linear layer with LoRA (``y = tanh(h W^T + s (h A) B)``) -> LM head
-> log-softmax -> gathered at target_pos / target_ids / candidate_ids, exactly the inputs and
outputs of :data:`zoo_ort.bundle.TOKEN_INPUTS` / ``OUTPUTS``. ``static`` fixes N, T, K and C.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from zoo_ort.bundle import (
    OUTPUTS,
    TOKEN_INPUTS,
    Bundle,
    LoraSite,
    LoraSpec,
    LoraTensor,
    Manifest,
    TensorSpec,
    load_bundle,
    write_manifest,
)
from zoo_ort.engine.protocol import TokenBatch
from zoo_ort.io import atomic_write_bytes, atomic_write_text, save_tensors

VOCAB, HIDDEN, RANK, ALPHA = 13, 8, 2, 4.0
PAD_ID = 0
MODULE = "layers.0.proj"
A_NAME, B_NAME = f"{MODULE}.lora_A", f"{MODULE}.lora_B"


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "embed": rng.normal(0, 1.0, (VOCAB, HIDDEN)).astype(np.float32),
        "proj": rng.normal(0, 0.5, (HIDDEN, HIDDEN)).astype(np.float32),  # [out, in]
        "head": rng.normal(0, 1.0, (VOCAB, HIDDEN)).astype(np.float32),  # [vocab, hidden]
    }


def _fixed(spec: TensorSpec, static: dict[str, int] | None) -> TensorSpec:
    """As the exporter writes static bundles: symbolic dims replaced by their sizes."""
    sizes = static or {}
    shape = [sizes.get(d, d) if isinstance(d, str) else d for d in spec.shape]
    return TensorSpec(spec.name, spec.dtype, shape, spec.meaning)


def manifest(mode: str = "fa", static: dict[str, int] | None = None) -> Manifest:
    a = LoraTensor(A_NAME, [HIDDEN, RANK], per_row=(mode == "full"))
    b = LoraTensor(B_NAME, [RANK, HIDDEN], per_row=True)
    site = LoraSite(MODULE, f"base_model.model.{MODULE}", HIDDEN, HIDDEN, a, b)
    lora_inputs = [
        TensorSpec(t.input, "float32", (["N"] if t.per_row else []) + list(t.shape), "LoRA")
        for t in (a, b)
    ]
    return Manifest(
        source={"model": "handbuilt/tiny", "recipe": "test"},
        architecture={
            "model_type": "handbuilt",
            "num_layers": 1,
            "hidden_size": HIDDEN,
            "vocab_size": VOCAB,
        },
        graph={
            "file": "model.onnx",
            "external_data": None,
            "opset": 18,
            "base_precision": "fp32",
            "target": "test",
        },
        lora=LoraSpec(
            mode=mode,
            rank=RANK,
            alpha=ALPHA,
            target_modules=["proj"],
            fan_in_fan_out=False,
            sites=[site],
        ),
        inputs=[_fixed(t, static) for t in list(TOKEN_INPUTS) + lora_inputs],
        outputs=[_fixed(t, static) for t in OUTPUTS],
        tokenizer={"file": "tokenizer.json", "pad_token_id": PAD_ID, "eos_token_id": 1},
        static=dict(static) if static else None,
    )


def graph(man: Manifest, w: dict[str, np.ndarray]) -> onnx.ModelProto:
    static = man.static or {}

    def dims(shape: list) -> list:
        return [static.get(d, d) if isinstance(d, str) else d for d in shape]

    onnx_type = {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT}
    inputs = [
        helper.make_tensor_value_info(t.name, onnx_type[t.dtype], dims(t.shape)) for t in man.inputs
    ]
    outputs = [
        helper.make_tensor_value_info(t.name, onnx_type[t.dtype], dims(t.shape))
        for t in man.outputs
    ]
    inits = [
        numpy_helper.from_array(w["embed"], "embed"),
        numpy_helper.from_array(np.ascontiguousarray(w["proj"].T), "proj_t"),
        numpy_helper.from_array(np.ascontiguousarray(w["head"].T), "head_t"),
        numpy_helper.from_array(np.array(man.lora.scale, np.float32), "scale"),
        numpy_helper.from_array(np.array(1, np.int64), "axis1"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array([2], np.int64), "ax2"),
        numpy_helper.from_array(np.array([1], np.int64), "ax1"),
    ]
    n = helper.make_node
    nodes = [
        n("Gather", ["embed", "input_ids"], ["x"]),
        n("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        n("Unsqueeze", ["m", "ax2"], ["m3"]),
        n("Mul", ["x", "m3"], ["xm"]),
        n("CumSum", ["xm", "axis1"], ["cs"]),
        n("CumSum", ["m3", "axis1"], ["cnt0"]),
        n("Max", ["cnt0", "one"], ["cnt"]),
        n("Div", ["cs", "cnt"], ["h"]),
        n("MatMul", ["h", "proj_t"], ["base"]),
        n("MatMul", ["h", A_NAME], ["ha"]),
        n("MatMul", ["ha", B_NAME], ["hab"]),
        n("Mul", ["hab", "scale"], ["delta"]),
        n("Add", ["base", "delta"], ["pre"]),
        n("Tanh", ["pre"], ["y"]),
        n("MatMul", ["y", "head_t"], ["logits"]),
        n("LogSoftmax", ["logits"], ["logp"], axis=-1),
        n("Unsqueeze", ["target_pos", "ax2"], ["tp"]),
        n("GatherND", ["logp", "tp"], ["sel"], batch_dims=1),
        n("Unsqueeze", ["target_ids", "ax2"], ["ti"]),
        n("GatherND", ["sel", "ti"], ["tlp"], batch_dims=2),
        n("Mul", ["tlp", "target_mask"], ["wlp"]),
        n("ReduceSum", ["wlp", "ax1"], ["num"], keepdims=0),
        n("ReduceSum", ["target_mask", "ax1"], ["den0"], keepdims=0),
        n("Max", ["den0", "one"], ["den"]),
        n("Div", ["num", "den"], ["mean"]),
        n("Neg", ["mean"], ["loss"]),
        n("Transpose", ["sel"], ["sel_t"], perm=[0, 2, 1]),
        n("Unsqueeze", ["candidate_ids", "ax2"], ["ci"]),
        n("GatherND", ["sel_t", "ci"], ["cg"], batch_dims=1),
        n("Transpose", ["cg"], ["candidate_logprobs"], perm=[0, 2, 1]),
    ]
    g = helper.make_graph(nodes, "handbuilt", inputs, outputs, inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def initial_lora(man: Manifest, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        A_NAME: rng.uniform(-0.5, 0.5, (HIDDEN, RANK)).astype(np.float32),
        B_NAME: np.zeros((RANK, HIDDEN), np.float32),
    }


def make_bundle(
    folder: str | Path, mode: str = "fa", static: dict[str, int] | None = None, seed: int = 0
) -> Bundle:
    folder = Path(folder)
    man = manifest(mode, static)
    atomic_write_bytes(folder / "model.onnx", graph(man, weights(seed)).SerializeToString())
    atomic_write_text(folder / "tokenizer.json", "{}\n")
    save_tensors(folder / man.adapter_init, initial_lora(man))
    write_manifest(folder, man)
    return load_bundle(folder)


def random_batch(rng: np.random.Generator, n: int, t: int, k: int, c: int) -> TokenBatch:
    """Rows of random lengths (right-padded), targets inside each row, a few masked slots."""
    lengths = rng.integers(2, t + 1, n)
    ids = rng.integers(2, VOCAB, (n, t))
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, PAD_ID)
    pos = np.stack([rng.integers(0, lengths[i] - 1, k) for i in range(n)])
    tgt = rng.integers(0, VOCAB, (n, k))
    tmask = (rng.random((n, k)) < 0.8).astype(np.float32)
    tmask[:, 0] = 1.0
    cand = rng.integers(0, VOCAB, (n, c))
    return TokenBatch(ids, mask, pos, tgt, tmask, cand)


def random_lora(man: Manifest, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for t in man.lora_tensors():
        shape = ((rows,) if t.per_row else ()) + tuple(t.shape)
        out[t.input] = rng.normal(0, 0.5, shape).astype(np.float32)
    return out


def reference(
    w: dict[str, np.ndarray], batch: TokenBatch, lora: dict[str, np.ndarray], scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """The graph's computation in float64 numpy: (loss [N], candidate_logprobs [N, K, C])."""
    x = w["embed"].astype(np.float64)[batch.input_ids]
    m = batch.attention_mask.astype(np.float64)[..., None]
    h = np.cumsum(x * m, axis=1) / np.maximum(np.cumsum(m, axis=1), 1.0)
    a, b = lora[A_NAME].astype(np.float64), lora[B_NAME].astype(np.float64)
    ha = np.einsum("nth,hr->ntr", h, a) if a.ndim == 2 else np.einsum("nth,nhr->ntr", h, a)
    pre = h @ w["proj"].T.astype(np.float64) + scale * np.einsum("ntr,nro->nto", ha, b)
    logits = np.tanh(pre) @ w["head"].T.astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    rows = np.arange(batch.rows)[:, None]
    sel = logp[rows, batch.target_pos]  # [N, K, V]
    tlp = np.take_along_axis(sel, batch.target_ids[..., None], axis=2)[..., 0]
    tm = batch.target_mask.astype(np.float64)
    loss = -(tlp * tm).sum(1) / np.maximum(tm.sum(1), 1.0)
    cand = np.take_along_axis(
        sel,
        np.broadcast_to(
            batch.candidate_ids[:, None, :], sel.shape[:2] + batch.candidate_ids.shape[1:]
        ),
        axis=2,
    )
    return loss, cand
