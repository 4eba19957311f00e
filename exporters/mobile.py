"""Mobile NPU targets: coverage reports (NNAPI, CoreML) and the ORT-format model for Android.

``coverage(model)`` runs ONNX Runtime's own mobile usability checker
(``onnxruntime.tools.mobile_helpers.usability_checker``, the code behind
``python -m onnxruntime.tools.check_onnx_model_mobile_usability``) on a graph, after the same
basic-level optimization that ORT applies when it converts to the ORT format, and returns the
numbers instead of logging them. ``convert_to_ort`` writes ``model.ort`` for Android builds of
ONNX Runtime (the NNAPI EP only exists there).

``NpuScoringModel`` is the graph that NPU targets (``export_bundle(..., target=...)``) get: the
same per-row loss and candidate log-probs as :class:`~.graph.ScoringModel`, but everything the
mobile EPs cannot run is moved to the host (``zoo_ort.engine.npu_inputs`` builds those inputs
from a token batch): the additive attention bias, the position ids, one-hot target selectors
and flat indices into the softmax, and the loss weights. Inside the graph only
MatMul/Softmax/Gather-style ops remain; rotary cos/sin become table look-ups and RMSNorm
divides by a square root instead of using Reciprocal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from zoo_ort.bundle import NPU_INPUTS
from zoo_ort.bundle import NPU_SCHEME as HOST_SCHEME  # manifest.graph["host_inputs"]["scheme"]

# Added to probabilities before the log so that a slot whose target underflows to p = 0 stays
# finite (a masked slot's weight 0 must not meet -inf); it moves log p only below about -60.
PROB_FLOOR = 1e-30

# The checker's tables: one per EP, shipped inside the onnxruntime wheel.
CHECKS = {
    "nnapi": None,
    "coreml_neuralnetwork": "coreml_supported_neuralnetwork_ops.md",
    "coreml_mlprogram": "coreml_supported_mlprogram_ops.md",
}
ORT_FILE = "model.ort"


@dataclass(frozen=True)
class Coverage:
    """How much of a graph one mobile EP takes, as ORT's usability checker estimates it."""

    ep: str
    nodes: int
    supported: int
    partitions: int
    unsupported_ops: list[str]
    suitability: str  # the checker's verdict: YES, MAYBE or NO

    @property
    def fraction(self) -> float:
        return self.supported / self.nodes if self.nodes else 0.0

    def line(self) -> str:
        ops = ", ".join(self.unsupported_ops) or "none"
        return (
            f"{self.ep}: {self.supported}/{self.nodes} nodes supported "
            f"({100 * self.fraction:.1f}%) in {self.partitions} partition(s); "
            f"unsupported ops: {ops}; verdict {self.suitability}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"fraction": round(self.fraction, 4)}


@contextlib.contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def coverage(model: str | Path, optimize: bool = True) -> dict[str, Coverage]:
    """NNAPI and CoreML (NeuralNetwork and MLProgram) coverage of the ONNX graph at ``model``.

    Shapes count: a node whose inputs are not fixed-size is unsupported, as on the device.
    ``optimize`` first applies ORT's basic optimizations, as the ORT-format conversion does.
    """
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    path = Path(model)
    with tempfile.TemporaryDirectory() as tmp:
        if optimize:
            optimized = Path(tmp) / path.name
            optimize_model(path, optimized, use_external_initializers=True)
            path = optimized
        model_proto = ModelProtoWithShapeInfo(path).model_with_shape_info
        out = {}
        for ep, table in CHECKS.items():
            with _quiet("usability_checker"):
                if table is None:
                    info = uc.check_nnapi_partitions(model_proto, require_fixed_input_sizes=True)
                else:
                    info = uc.check_coreml_partitions(
                        model_proto, require_fixed_input_sizes=True, config_filename=table
                    )
            out[ep] = Coverage(
                ep=ep,
                nodes=int(info.num_nodes),
                supported=int(info.num_supported_nodes),
                partitions=int(info.num_partitions),
                unsupported_ops=sorted(info.unsupported_ops),
                suitability=info.suitability().name,
            )
    return out


def report(bundle: str | Path | Any) -> dict[str, Coverage]:
    """:func:`coverage` of a bundle's graph (``bundle``: the folder or a loaded ``Bundle``)."""
    from zoo_ort.bundle import Bundle, load_bundle

    loaded = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    return coverage(loaded.model_path)


def convert_to_ort(model: Path, out: Path) -> Path:
    """Write the ORT-format model of ``model`` (an .onnx file) to ``out``; returns ``out``.

    Basic optimizations only: they are hardware independent, so the Android NNAPI EP still sees
    the nodes it can take (extended/all-level fusions produce CPU-only contrib ops).
    """
    import onnxruntime as ort

    # staged beside ``out`` and renamed into place, like every other file zoo-ort writes
    staged = out.with_name(f".{out.name}.partial")
    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(staged)
        options.add_session_config_entry("session.save_model_format", "ORT")
        options.log_severity_level = 3
        ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        os.replace(staged, out)
    finally:
        staged.unlink(missing_ok=True)
    return out


# -- the NPU graph ----------------------------------------------------------------------------


def _torch_modules():  # torch is imported lazily: coverage() and report() work without it
    import torch
    from torch import nn

    class TableRotary(nn.Module):
        """Rotary cos/sin for positions 0..T-1 precomputed, looked up by position id (Gather)."""

        def __init__(self, rotary: nn.Module, seq_len: int) -> None:
            super().__init__()
            with torch.no_grad():
                positions = torch.arange(seq_len)[None]
                cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
            self.register_buffer("cos", cos[0].contiguous(), persistent=False)
            self.register_buffer("sin", sin[0].contiguous(), persistent=False)

        def forward(self, x, position_ids):
            cos = nn.functional.embedding(position_ids, self.cos)
            sin = nn.functional.embedding(position_ids, self.sin)
            return cos.to(x.dtype), sin.to(x.dtype)

    class SqrtRMSNorm(nn.Module):
        """RMSNorm as x / sqrt(mean(x^2) + eps): Div and Sqrt instead of Reciprocal."""

        def __init__(self, norm: nn.Module) -> None:
            super().__init__()
            self.weight = norm.weight
            self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

        def forward(self, x):
            dtype = x.dtype
            x = x.float()
            x = x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps)
            return self.weight * x.to(dtype)

    class PlainLayerNorm(nn.Module):
        """LayerNorm from ReduceMean/Sub/Mul/Sqrt/Div: NNAPI has no LayerNormalization op."""

        def __init__(self, norm: nn.Module) -> None:
            super().__init__()
            self.weight, self.bias, self.eps = norm.weight, norm.bias, float(norm.eps)

        def forward(self, x):
            centered = x - x.mean(-1, keepdim=True)
            x = centered / torch.sqrt((centered * centered).mean(-1, keepdim=True) + self.eps)
            x = x * self.weight if self.weight is not None else x
            return x + self.bias if self.bias is not None else x

    return torch, nn, TableRotary, SqrtRMSNorm, PlainLayerNorm


def make_npu_scoring(model, arch, context, seq_len: int):
    """An ``nn.Module`` with the NPU signature (:data:`NPU_INPUTS` + LoRA) over ``model``."""
    torch, nn, TableRotary, SqrtRMSNorm, PlainLayerNorm = _torch_modules()
    backbone = getattr(model, arch.backbone)
    for name, module in list(backbone.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = backbone.get_submodule(parent_name) if parent_name else backbone
        if child and type(module).__name__.endswith("RotaryEmbedding"):
            setattr(parent, child, TableRotary(module, seq_len))
        elif child and type(module).__name__.endswith("RMSNorm"):
            setattr(parent, child, SqrtRMSNorm(module))
        elif child and isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
            setattr(parent, child, PlainLayerNorm(module))

    class NpuScoringModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.lm_head = getattr(model, arch.lm_head)
            self.modeling = sys.modules[type(model).__module__]  # its helpers get swapped

        def forward(
            self,
            input_ids,
            attention_bias,
            position_ids,
            target_select,
            target_index,
            target_weight,
            candidate_index,
            *lora,
        ):
            context.tensors = [(lora[i], lora[i + 1]) for i in range(0, len(lora), 2)]
            hidden = self.backbone(
                input_ids=input_ids,
                attention_mask=attention_bias,
                position_ids=position_ids,
                use_cache=False,
            ).last_hidden_state
            selected = torch.matmul(target_select, hidden)  # [N, K, H], one-hot MatMul
            logits = self.lm_head(selected).float()  # [N, K, V]
            probs = torch.softmax(logits, dim=-1).reshape(-1)
            n, k = target_index.shape
            target = torch.index_select(probs, 0, target_index.reshape(-1)).reshape(n, 1, k)
            logp = torch.log(target + PROB_FLOOR)
            loss = torch.matmul(logp, target_weight.reshape(n, k, 1)).reshape(n)
            cand = torch.index_select(probs, 0, candidate_index.reshape(-1))
            return loss, torch.log(cand + PROB_FLOOR).reshape(candidate_index.shape)

    return NpuScoringModel()


def npu_example_inputs(shapes, vocab_size: int) -> tuple:
    """A valid example batch for :data:`NPU_INPUTS`, built like the engine builds real ones."""
    import numpy as np
    import torch

    from zoo_ort.bundle import npu_inputs

    from .graph import example_inputs

    tokens = [t.numpy() for t in example_inputs(shapes, vocab_size)]
    names = ["input_ids", "attention_mask", "target_pos", "target_ids", "target_mask"]
    feeds = dict(zip([*names, "candidate_ids"], tokens, strict=True))
    built = npu_inputs(feeds, vocab_size)
    return tuple(torch.from_numpy(np.ascontiguousarray(built[s.name])) for s in NPU_INPUTS)


@contextlib.contextmanager
def _npu_friendly_helpers(modeling: Any):
    """Swap the modeling module's ``repeat_kv`` and ``rotate_half`` for equivalents without
    Expand and Neg (neither runs on NNAPI/CoreML) while the graph is traced."""
    import torch

    def repeat_kv(hidden, n_rep: int):
        if n_rep == 1:
            return hidden
        b, h, t, d = hidden.shape
        stacked = torch.cat([hidden.reshape(b, h, 1, t, d)] * n_rep, dim=2)
        return stacked.reshape(b, h * n_rep, t, d)

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((x[..., half:] * -1.0, x[..., :half]), dim=-1)

    saved = {}
    for name, fn in (("repeat_kv", repeat_kv), ("rotate_half", rotate_half)):
        if hasattr(modeling, name):
            saved[name] = getattr(modeling, name)
            setattr(modeling, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(modeling, name, fn)


def export_npu_graph(scoring, lora, lora_names, shapes, vocab_size: int, path: Path) -> None:
    """Export the NPU scoring module with fully static shapes to ``path`` (+ ``path``.data)."""
    import torch

    from zoo_ort.bundle import OUTPUTS

    from .graph import OPSET

    with torch.no_grad(), _npu_friendly_helpers(scoring.modeling):
        torch.onnx.export(
            scoring,
            (*npu_example_inputs(shapes, vocab_size), *lora),
            str(path),
            input_names=[s.name for s in NPU_INPUTS] + list(lora_names),
            output_names=[s.name for s in OUTPUTS],
            opset_version=OPSET,
            dynamo=True,
            external_data=True,
            optimize=True,
            verbose=False,
        )


def finish_target(
    stage: Path,
    graph_file: str,
    target: str,
    vocab_size: int,
    shapes: Any = None,
    lora_feeds: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Manifest ``graph`` fields of an NPU target. NNAPI: also writes ``model.ort``. QNN: replaces
    the graph by its QDQ copy (LoRA path float; needs ``shapes`` and ``lora_feeds``, the
    initial LoRA tensors with the row dim)."""
    info: dict[str, Any] = {"host_inputs": {"scheme": HOST_SCHEME, "vocab_size": vocab_size}}
    if target == "qnn" and shapes is not None and lora_feeds is not None:
        from .qdq import CALIBRATION_BATCHES, calibration_tokens, quantize_stage

        tokens = calibration_tokens(
            shapes.rows,
            shapes.seq_len,
            shapes.targets,
            shapes.candidates,
            vocab_size,
            CALIBRATION_BATCHES,
            seed=0,
        )
        info |= quantize_stage(stage, graph_file, lora_feeds, tokens, vocab_size)
    if target == "nnapi":
        convert_to_ort(stage / graph_file, stage / ORT_FILE)
        info["ort_file"] = ORT_FILE
    return info


def initial_lora_feeds(specs: list, init: dict[str, Any], rows: int) -> dict[str, Any]:
    """The initial LoRA tensors as graph feeds: per-row ones repeated over ``rows``."""
    import numpy as np

    feeds = {}
    for site in specs:
        for t in (site.A, site.B):
            base = np.asarray(init[t.input], np.float32)
            feeds[t.input] = np.repeat(base[None], rows, 0) if t.per_row else base
    return feeds
