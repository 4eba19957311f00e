"""QNN: a static QDQ (uint8) quantization of an NPU graph's base, with the LoRA path left float.

A static quantization fixes one scale per activation from calibration batches. On the LoRA path
that is fatal: calibrated with the initial adapter (B = 0) the LoRA output's scale is ~0 and every
later update is clipped away. So the LoRA nodes (``x @ A``, the alpha/r scaling, ``@ B`` and the
Add that merges the delta into the base output) are excluded and stay fp32; so is the scoring
tail after the LM head (softmax, index, log, loss), where 8 bits would flatten the log-probs.
What is quantized: the base MatMuls (projections, attention products, LM head), the ops the HTP
backend runs best in 8 bits.

Calibration uses ``ONNX Runtime``'s QNN helper (``get_qnn_qdq_config``: uint8 activations and
weights, the QNN-specific overrides) on a few host-built batches of random token ids under the
initial adapter.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

QUANTIZED_OPS = ["MatMul"]
CALIBRATION_BATCHES = 4


def lora_path_nodes(model: Any, lora_inputs: Sequence[str]) -> list[str]:
    """Names of the nodes on the LoRA path of ``model`` (an onnx ModelProto).

    Walks forward from the LoRA graph inputs; the walk stops at each Add that joins the LoRA
    delta with a base activation (that Add is on the path, its output is not).
    """
    graph = model.graph
    constants = {i.name for i in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    tainted = set(lora_inputs)
    out: list[str] = []
    for node in graph.node:  # the exporter writes nodes in topological order
        hit = [i for i in node.input if i in tainted]
        if not hit:
            continue
        out.append(node.name)
        others = [i for i in node.input if i and i not in tainted and i not in constants]
        if node.op_type == "Add" and others:
            continue  # the merge: base + delta
        tainted.update(node.output)
    return out


def tail_nodes(model: Any) -> list[str]:
    """The scoring tail: the last Softmax (over the vocabulary) and every node after it."""
    graph = model.graph
    soft = [n for n in graph.node if n.op_type == "Softmax"][-1]  # attention ones come first
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    seen: set[str] = set()
    stack, out = [soft], []
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        out.append(node.name)
        for o in node.output:
            stack.extend(consumers.get(o, []))
    return out


class _Reader:
    """``CalibrationDataReader`` over a list of feed dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def quantize_qdq(
    src: Path, dst: Path, lora_inputs: Sequence[str], calibration: list[dict[str, np.ndarray]]
) -> dict[str, Any]:
    """Write the QDQ-quantized copy of ``src`` to ``dst`` (weights in ``dst``.data).

    Returns a summary: how many nodes were excluded as LoRA path and as scoring tail.
    """
    import onnx
    from onnxruntime.quantization import quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    model = onnx.load(str(src), load_external_data=False)
    lora = lora_path_nodes(model, lora_inputs)
    tail = tail_nodes(model)
    del model
    quant_log = logging.getLogger("onnxruntime.quantization")
    level = quant_log.level
    quant_log.setLevel(logging.WARNING)
    try:
        config = get_qnn_qdq_config(
            str(src),
            _Reader(calibration),
            op_types_to_quantize=QUANTIZED_OPS,
            nodes_to_exclude=sorted(set(lora) | set(tail)),
        )
        config.use_external_data_format = True
        quantize(str(src), str(dst), config)
    finally:
        quant_log.setLevel(level)
    return {"lora_path_nodes": len(lora), "tail_nodes": len(tail)}


def quantize_stage(
    stage: Path,
    graph_file: str,
    lora_feeds: dict[str, np.ndarray],
    token_feeds: list[dict[str, np.ndarray]],
    vocab_size: int,
) -> dict[str, Any]:
    """Replace ``stage/graph_file`` (an NPU graph) by its QDQ copy; returns manifest fields."""
    from zoo_ort.bundle import npu_inputs

    calibration = [npu_inputs(tokens, vocab_size) | lora_feeds for tokens in token_feeds]
    work = stage / "qdq"
    work.mkdir()
    summary = quantize_qdq(stage / graph_file, work / graph_file, list(lora_feeds), calibration)
    for name in (graph_file, f"{graph_file}.data"):
        os.replace(work / name, stage / name)
    for leftover in work.iterdir():
        leftover.unlink()
    work.rmdir()
    return {"base_precision": "qdq-uint8", "quantization": summary | {"ops": QUANTIZED_OPS}}


def calibration_tokens(
    rows: int, seq_len: int, targets: int, candidates: int, vocab_size: int, batches: int, seed: int
) -> list[dict[str, np.ndarray]]:
    """Random right-padded token batches shaped like the engine's static batches."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        lengths = rng.integers(max(1, seq_len // 2), seq_len + 1, size=rows)
        mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int64)
        pos = np.minimum(rng.integers(0, seq_len, size=(rows, targets)), lengths[:, None] - 1)
        out.append(
            {
                "input_ids": rng.integers(3, vocab_size, size=(rows, seq_len)) * mask,
                "attention_mask": mask,
                "target_pos": pos,
                "target_ids": rng.integers(3, vocab_size, size=(rows, targets)),
                "target_mask": np.ones((rows, targets), np.float32),
                "candidate_ids": rng.integers(3, vocab_size, size=(rows, candidates)),
            }
        )
    return out
