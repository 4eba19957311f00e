"""The scoring graph: token batch + per-row LoRA tensors in, per-row loss and candidate scores out.

Exported with ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript). Measured on
SmolLM2-135M against the TorchScript exporter (``dynamo=False``), which is deprecated but about 4x
faster to export: both graphs give the same losses (1e-5) and run equally fast in ONNX Runtime,
but dynamo keeps tied embeddings as one initializer (526 MB of weights instead of 637 MB),
writes external data as it goes, and peaks at 1.1 GB RSS where TorchScript needed 2.9 GB.
``optimize=True`` (onnxscript's optimizer) pre-folds constants such as transposed weights, so
ONNX Runtime loads the SmolLM2 graph in 585 MB RSS instead of 666 MB, and faster.
optimum is not used: optimum-onnx pins transformers<4.58 and knows nothing of per-row LoRA.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo_ort.bundle import OUTPUTS, TOKEN_INPUTS

from .architectures import Architecture
from .lora import LoraContext

OPSET = 18


class ScoringModel(nn.Module):
    """Wraps a LoRA-wrapped ``*ForCausalLM`` into the bundle's graph signature.

    The LM head runs only at the K target positions: gathering [N, K, H] hidden states first
    avoids ever materialising [N, T, V] logits, which dominate the cost for small models with
    large vocabularies.
    """

    def __init__(self, model: nn.Module, arch: Architecture, context: LoraContext) -> None:
        super().__init__()
        self.backbone = getattr(model, arch.backbone)
        self.lm_head = getattr(model, arch.lm_head)
        self._context = context
        self.token_mask = arch.token_mask
        self.windows = sliding_windows(model.config)
        # Gemma 2 squashes its logits (tanh) after the LM head, in the *ForCausalLM forward.
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        target_pos: torch.Tensor,
        target_ids: torch.Tensor,
        target_mask: torch.Tensor,
        candidate_ids: torch.Tensor,
        *lora: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._context.tensors = [(lora[i], lora[i + 1]) for i in range(0, len(lora), 2)]
        # Positions count real tokens only, so left and right padding score identically.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        mask = attention_mask if self.token_mask else self._masks(attention_mask, position_ids)
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        index = target_pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        logits = self.lm_head(torch.gather(hidden, 1, index)).float()  # [N, K, V]
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        logprobs = torch.log_softmax(logits, dim=-1)
        nll = -torch.gather(logprobs, 2, target_ids.unsqueeze(-1)).squeeze(-1)  # [N, K]
        count = target_mask.sum(-1)
        loss = (nll * target_mask).sum(-1) / torch.where(count > 0, count, torch.ones_like(count))
        candidates = candidate_ids.unsqueeze(1).expand(-1, target_ids.shape[1], -1)
        return loss, torch.gather(logprobs, 2, candidates)

    def _masks(
        self, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Ready 4D additive masks (causal + key padding, and the sliding window where a layer
        has one): they bypass each architecture's own mask construction, so all of them see the
        same, export-friendly mask. Models with several layer types take one mask per type."""
        seq = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        allowed = (seq[None, :] <= seq[:, None])[None, None] & attention_mask[
            :, None, None, :
        ].bool()
        if self.windows is None:
            return _additive(allowed)
        # Windows count real tokens (positions), as in the unpadded row.
        distance = position_ids[:, None, :, None] - position_ids[:, None, None, :]
        masks = {
            kind: _additive(allowed if window is None else allowed & (distance < window))
            for kind, window in self.windows.items()
        }
        return masks.get("", masks)


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.where(
        allowed,
        torch.zeros((), dtype=torch.float32),
        torch.tensor(torch.finfo(torch.float32).min, dtype=torch.float32),
    )


def sliding_windows(config: Any) -> dict[str, int | None] | None:
    """Sliding attention windows by layer type (transformers' ``layer_types``), ``{"": w}`` when
    every layer has window ``w`` (Mistral's ``sliding_window``), or None when no layer has one.

    transformers' rule, followed here: a key is visible if ``q - k < window``.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if "sliding_attention" not in layer_types:
            return None
        return {kind: (window if kind == "sliding_attention" else None) for kind in layer_types}
    return {"": int(window)} if window is not None else None


@dataclass(frozen=True)
class Shapes:
    """Sizes of the example batch; ``dynamic`` marks N, T, K and C as symbolic in the graph."""

    rows: int
    seq_len: int
    targets: int
    candidates: int
    dynamic: bool


def example_inputs(shapes: Shapes, vocab_size: int) -> tuple[torch.Tensor, ...]:
    n, t, k, c = shapes.rows, shapes.seq_len, shapes.targets, shapes.candidates
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(n, t, dtype=torch.int64)
    mask[0, : t // 3] = 0  # some left padding, so nothing specialises on a full mask
    return (
        torch.randint(0, vocab_size, (n, t), generator=generator),
        mask,
        torch.randint(t // 3, t, (n, k), generator=generator),
        torch.randint(0, vocab_size, (n, k), generator=generator),
        torch.ones(n, k, dtype=torch.float32),
        torch.randint(0, vocab_size, (n, c), generator=generator),
    )


def export_graph(
    scoring: ScoringModel,
    lora: Sequence[torch.Tensor],
    lora_names: Sequence[str],
    lora_per_row: Sequence[bool],
    shapes: Shapes,
    vocab_size: int,
    path: Path,
) -> None:
    """Export ``scoring`` to ``path``, weights in ``path``.data beside it."""
    tokens = example_inputs(shapes, vocab_size)
    dynamic_shapes = None
    if shapes.dynamic:
        dims = {name: torch.export.Dim(name, min=1, max=1 << 20) for name in ("N", "T", "K", "C")}
        token_dims = tuple(
            {axis: dims[str(sym)] for axis, sym in enumerate(spec.shape)} for spec in TOKEN_INPUTS
        )
        # Varargs take their dynamic shapes as one nested tuple.
        lora_dims = tuple({0: dims["N"]} if per_row else {} for per_row in lora_per_row)
        dynamic_shapes = (*token_dims, lora_dims)
    with torch.no_grad():
        torch.onnx.export(
            scoring,
            (*tokens, *lora),
            str(path),
            input_names=[spec.name for spec in TOKEN_INPUTS] + list(lora_names),
            output_names=[spec.name for spec in OUTPUTS],
            opset_version=OPSET,
            dynamic_shapes=dynamic_shapes,
            dynamo=True,
            external_data=True,
            optimize=True,
            verbose=False,
        )
    forget_last_graph()


def forget_last_graph() -> None:
    """Drop the exported graph that onnxscript's rewriter keeps alive after ``optimize=True``.

    Its pattern matchers are module-level rule objects that remember the last graph (and node)
    they matched; that graph holds every torch parameter of the exported model, so without this
    the weights outlive the export (0.4 GB for SmolLM2-135M). Each match re-initialises these
    attributes, so clearing them is safe; if onnxscript changes, this merely stops helping.
    """
    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:
        return
    for obj in gc.get_objects():
        if isinstance(obj, SimplePatternMatcher):
            for attr in ("_graph", "_current_node", "_match"):
                if hasattr(obj, attr):
                    setattr(obj, attr, None)
    gc.collect()
