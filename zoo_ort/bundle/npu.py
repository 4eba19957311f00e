"""The NPU host-input scheme ("npu-v1"): the graph inputs a static NPU bundle takes, and how the
host builds them from a padded token batch.

Mobile EPs (NNAPI, CoreML) cannot run the ops that build attention masks, positions and target
selections, so a static NPU graph takes them ready-made. The exporter writes graphs with these
inputs and the engine feeds them: both read this one module, next to the manifest it extends.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from zoo_ort.bundle.manifest import CANDIDATES, ROWS, SEQ, TARGETS, TensorSpec

NPU_SCHEME = "npu-v1"
NPU_INPUTS = [
    TensorSpec("input_ids", "int64", [ROWS, SEQ], "token ids; padding anywhere, masked out"),
    TensorSpec(
        "attention_bias",
        "float32",
        [ROWS, 1, SEQ, SEQ],
        "additive attention mask: 0 where query i may see key j (causal, real key), -1e4 else",
    ),
    TensorSpec("position_ids", "int64", [ROWS, SEQ], "position of each token among real tokens"),
    TensorSpec(
        "target_select",
        "float32",
        [ROWS, TARGETS, SEQ],
        "one-hot of target_pos: row k selects the hidden state scored at slot k",
    ),
    TensorSpec(
        "target_index",
        "int64",
        [ROWS, TARGETS],
        "flat index (n*K + k)*V + target_id into the [N, K, V] softmax",
    ),
    TensorSpec(
        "target_weight",
        "float32",
        [ROWS, TARGETS],
        "-target_mask / max(1, real slots): loss = sum_k weight * log p(target)",
    ),
    TensorSpec(
        "candidate_index",
        "int64",
        [ROWS, TARGETS, CANDIDATES],
        "flat index (n*K + k)*V + candidate_id into the [N, K, V] softmax",
    ),
]
NPU_INPUT_NAMES = tuple(s.name for s in NPU_INPUTS)
MASKED = -1e4  # additive bias of a masked key; finite, so fp16 NPUs see no inf - inf


def npu_inputs(feeds: Mapping[str, np.ndarray], vocab_size: int) -> dict[str, np.ndarray]:
    """The host-built graph inputs of an NPU bundle (scheme "npu-v1") from a padded token batch.

    Mask, positions, target selection and loss weights are computed here with numpy instead of
    in the graph, because the mobile EPs (NNAPI, CoreML) cannot run the ops that build them.
    """
    mask = np.asarray(feeds["attention_mask"]).astype(bool)
    n, t = mask.shape
    target_pos = np.asarray(feeds["target_pos"], np.int64)
    k = target_pos.shape[1]
    positions = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None).astype(np.int64)
    allowed = np.tril(np.ones((t, t), dtype=bool))[None] & mask[:, None, :]
    bias = np.where(allowed, np.float32(0), np.float32(MASKED)).astype(np.float32)[:, None]
    select = np.zeros((n, k, t), np.float32)
    np.put_along_axis(select, target_pos[..., None], 1.0, axis=-1)
    base = (np.arange(n)[:, None] * k + np.arange(k)[None, :]) * vocab_size  # [N, K]
    target_mask = np.asarray(feeds["target_mask"], np.float32)
    count = np.maximum(target_mask.sum(-1, keepdims=True), 1.0)
    candidates = np.asarray(feeds["candidate_ids"], np.int64)
    return {
        "input_ids": np.asarray(feeds["input_ids"], np.int64),
        "attention_bias": bias,
        "position_ids": positions,
        "target_select": select,
        "target_index": base + np.asarray(feeds["target_ids"], np.int64),
        "target_weight": (-target_mask / count).astype(np.float32),
        "candidate_index": base[..., None] + candidates[:, None, :],
    }
