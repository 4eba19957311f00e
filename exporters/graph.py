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

import contextlib
import gc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo_ort.bundle import OUTPUTS, TOKEN_INPUTS, TensorSpec
from zoo_ort.bundle.manifest import HIDDEN

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
        hidden = self.backbone_hidden(attention_mask, input_ids=input_ids)
        return self.score(hidden, target_pos, target_ids, target_mask, candidate_ids)

    def backbone_hidden(self, attention_mask: torch.Tensor, **embeds: torch.Tensor) -> torch.Tensor:
        """The backbone's last hidden states; ``embeds`` is ``input_ids=`` or ``inputs_embeds=``."""
        # Positions count real tokens only, so left and right padding score identically.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        mask = attention_mask if self.token_mask else self._masks(attention_mask, position_ids)
        return self.backbone(
            **embeds, attention_mask=mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state

    def score(
        self,
        hidden: torch.Tensor,
        target_pos: torch.Tensor,
        target_ids: torch.Tensor,
        target_mask: torch.Tensor,
        candidate_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row loss and candidate log-probabilities from the final hidden states."""
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


class TrunkModel(nn.Module):
    """Tokens -> the hidden states leaving ``last``, the layer just below the lowest LoRA layer.

    Exported while the layer stack is cut to the layers up to ``last`` (:func:`layers_cut`): the
    backbone runs its own forward (embeddings, positions, masks, whatever the family does before
    its layers) and a hook takes ``last``'s output; the final norm after it feeds nothing and is
    dropped. Cutting the top of the stack keeps every layer at its own index, which layer loops
    that look up per-layer settings by position (Qwen2, Gemma 2/3: ``layer_types[i]``) rely on.
    """

    def __init__(self, scoring: ScoringModel, last: nn.Module) -> None:
        super().__init__()
        self.scoring = scoring
        self.last = last

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        taken: list[torch.Tensor] = []

        def take(_module: nn.Module, _args: tuple, output: Any) -> None:
            # Decoder layers return the hidden states alone or first in a tuple, by family.
            taken.append(output[0] if isinstance(output, tuple) else output)

        handle = self.last.register_forward_hook(take)
        try:
            self.scoring.backbone_hidden(attention_mask, input_ids=input_ids)
        finally:
            handle.remove()
        if len(taken) != 1:
            raise RuntimeError(f"the layer below the LoRA ran {len(taken)} times, not once")
        return taken[0]


@contextlib.contextmanager
def layers_cut(model: nn.Module, stack: str, stop: int) -> Iterator[None]:
    """Within the block, the decoder layer stack at ``stack`` holds only its first ``stop``
    layers (the same module objects)."""
    parent_name, _, name = stack.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    full = getattr(parent, name)
    setattr(parent, name, nn.ModuleList(list(full)[:stop]))
    try:
        yield
    finally:
        setattr(parent, name, full)


class HeadModel(nn.Module):
    """The trunk's hidden states + per-row LoRA -> the bundle's outputs.

    The backbone runs its own forward on placeholder embeddings (zeros), so that positions,
    rotary tables, ALiBi and masks are built exactly as in the one-graph bundle; a pre-hook on
    ``first`` replaces that layer's input by ``hidden_states``. Everything computed from the
    placeholder below ``first`` then feeds nothing and the exporter drops it (the head holds no
    weights of the trunk's layers).
    """

    def __init__(self, scoring: ScoringModel, first: nn.Module) -> None:
        super().__init__()
        self.scoring = scoring
        self.first = first
        self.embed_dim = int(scoring.backbone.get_input_embeddings().embedding_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        target_pos: torch.Tensor,
        target_ids: torch.Tensor,
        target_mask: torch.Tensor,
        candidate_ids: torch.Tensor,
        *lora: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scoring = self.scoring
        scoring._context.tensors = [(lora[i], lora[i + 1]) for i in range(0, len(lora), 2)]

        def inject(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (hidden_states, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden_states}

        embeds = hidden_states.new_zeros(*hidden_states.shape[:2], self.embed_dim)
        handle = self.first.register_forward_pre_hook(inject, with_kwargs=True)
        try:
            hidden = scoring.backbone_hidden(attention_mask, inputs_embeds=embeds)
        finally:
            handle.remove()
        return scoring.score(hidden, target_pos, target_ids, target_mask, candidate_ids)


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
    inputs: Sequence[TensorSpec] = TOKEN_INPUTS,
    outputs: Sequence[TensorSpec] = OUTPUTS,
    hidden_size: int | None = None,
) -> None:
    """Export ``scoring`` to ``path``, weights in ``path``.data beside it.

    ``inputs`` and ``outputs`` are the graph's non-LoRA inputs and its outputs: by default the
    one-graph bundle's; a trunk or head (two-graph bundles) passes its own, taking example tokens
    by name and an example ``hidden_states`` of width ``hidden_size``.
    """
    examples = dict(
        zip([s.name for s in TOKEN_INPUTS], example_inputs(shapes, vocab_size), strict=True)
    )
    if hidden_size is not None:
        generator = torch.Generator().manual_seed(1)
        examples[HIDDEN] = torch.randn(
            shapes.rows, shapes.seq_len, hidden_size, generator=generator
        )
    tokens = [examples[spec.name] for spec in inputs]
    dynamic_shapes = None
    if shapes.dynamic:
        dims = {name: torch.export.Dim(name, min=1, max=1 << 20) for name in ("N", "T", "K", "C")}
        token_dims = tuple(
            {axis: dims[sym] for axis, sym in enumerate(spec.shape) if isinstance(sym, str)}
            for spec in inputs
        )
        # Varargs take their dynamic shapes as one nested tuple.
        lora_dims = tuple({0: dims["N"]} if per_row else {} for per_row in lora_per_row)
        dynamic_shapes = (*token_dims, lora_dims) if lora_names else token_dims
    with torch.no_grad():
        torch.onnx.export(
            scoring,
            (*tokens, *lora),
            str(path),
            input_names=[spec.name for spec in inputs] + list(lora_names),
            output_names=[spec.name for spec in outputs],
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
