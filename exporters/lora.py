"""Per-row LoRA: find the target modules, wrap them, and make PEFT-compatible initial tensors.

Each wrapped module computes ``base(x) + (alpha/r) * (x @ A) @ B`` where ``B`` (and in "full"
mode ``A``) carries a leading row dimension, so every row of a batch can run under its own
adapter. The wrappers read their tensors from a :class:`LoraContext` that the scoring model fills
from its forward arguments, which keeps the Hugging Face forward signatures untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from zoo_ort.bundle import LoraSite, LoraTensor
from zoo_ort.errors import ZooError

MODES = ("fa", "full")


@dataclass(frozen=True)
class Site:
    """One target module found in the model."""

    module: str
    in_features: int
    out_features: int


class LoraContext:
    """The LoRA tensors of the forward pass in progress, by site index."""

    def __init__(self) -> None:
        self.tensors: list[tuple[torch.Tensor, torch.Tensor]] = []


class RowLora(nn.Module):
    """A Linear (or GPT-2 Conv1D) plus a LoRA path whose weights come from the context."""

    def __init__(self, base: nn.Module, index: int, context: LoraContext, scale: float) -> None:
        super().__init__()
        self.base = base
        self.index = index
        self.scale = scale
        self._context = context  # a plain attribute: not a submodule, holds no parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self._context.tensors[self.index]
        # x [N, T, in] @ A ([in, r] shared or [N, in, r] per row) -> [N, T, r]; scaling the rank-r
        # activations is the cheapest place for alpha/r.
        return self.base(x) + ((x @ a) * self.scale) @ b


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, Conv1D):  # weight is [in, out] (fan_in_fan_out)
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return int(module.in_features), int(module.out_features)


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of target names: the module path equals or ends with ``.target``."""
    return name == target or name.endswith(f".{target}")


def find_sites(model: nn.Module, targets: list[str]) -> list[Site]:
    """The linear modules matching ``targets`` (as PEFT matches them), in model order.

    Works on a meta-device model too (only shapes are read), so callers can validate the targets
    before loading any weights.
    """
    linear = [(name, m) for name, m in model.named_modules() if name and _is_linear(m)]
    sites = [
        Site(name, *_features(m)) for name, m in linear if any(_matches(name, t) for t in targets)
    ]
    missing = [t for t in targets if not any(_matches(s.module, t) for s in sites)]
    if missing:
        available = sorted({name.rsplit(".", 1)[-1] for name, _ in linear})
        raise ZooError(
            f"LoRA target module(s) {', '.join(missing)} not found among the model's linear "
            f"modules: {', '.join(available)}"
        )
    return sites


def wrap_sites(model: nn.Module, sites: list[Site], scale: float) -> LoraContext:
    """Replace each site's module in ``model`` by a :class:`RowLora` sharing one context."""
    context = LoraContext()
    for index, site in enumerate(sites):
        parent_name, _, child = site.module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, RowLora(getattr(parent, child), index, context, scale))
    return context


def input_names(site: Site) -> tuple[str, str]:
    return f"{site.module}.lora_A", f"{site.module}.lora_B"


def lora_sites(sites: list[Site], rank: int, mode: str) -> list[LoraSite]:
    """The manifest's description of the sites: graph input names and shapes (without row dim)."""
    out = []
    for site in sites:
        a_name, b_name = input_names(site)
        out.append(
            LoraSite(
                module=site.module,
                peft_prefix=f"base_model.model.{site.module}",
                in_features=site.in_features,
                out_features=site.out_features,
                A=LoraTensor(a_name, [site.in_features, rank], per_row=(mode == "full")),
                B=LoraTensor(b_name, [rank, site.out_features], per_row=True),
            )
        )
    return out


def initial_tensors(sites: list[Site], rank: int, seed: int) -> dict[str, np.ndarray]:
    """PEFT's default init: A ~ kaiming_uniform(a=sqrt(5)) on its [r, in] weight, B = 0.

    Stored in zoo-ort's orientation (A [in, r], B [r, out]); one generator seeded by ``seed``
    walks the sites in order, so the same seed gives the same adapter.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, np.ndarray] = {}
    for site in sites:
        a_name, b_name = input_names(site)
        # kaiming_uniform_(a=sqrt(5)) on a [r, in] weight is U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / math.sqrt(site.in_features)
        weight = torch.empty(rank, site.in_features).uniform_(-bound, bound, generator=generator)
        tensors[a_name] = weight.T.contiguous().numpy()
        tensors[b_name] = np.zeros((rank, site.out_features), dtype=np.float32)
    return tensors


def decoder_layers(model: nn.Module, num_layers: int) -> str:
    """The path of the model's stack of decoder layers: the ``ModuleList`` of ``num_layers``
    modules (``model.layers``, ``transformer.h``, ``model.decoder.layers``, ...).

    Discovered rather than listed per family, like everything in ``architectures``; works on a
    meta-device model.
    """
    stacks = [
        name
        for name, module in model.named_modules()
        if name and isinstance(module, nn.ModuleList) and len(module) == num_layers
    ]
    if len(stacks) != 1:
        found = ", ".join(stacks) or "none"
        raise ZooError(
            f"cannot tell the decoder layers apart: {found} hold {num_layers} modules; "
            "restricting LoRA to a range of layers is not available for this model"
        )
    return stacks[0]


def layer_of(module: str, stack: str) -> int | None:
    """The index of the decoder layer holding ``module`` (a path), None if outside the stack."""
    if not module.startswith(f"{stack}."):
        return None
    head = module[len(stack) + 1 :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def sites_in_layers(
    sites: list[Site], stack: str, layers: tuple[int, int], num_layers: int
) -> list[Site]:
    """The sites inside decoder layers ``[start, stop)``; a ZooError for an impossible range or
    for a target outside the layer stack (a range would silently drop it)."""
    start, stop = layers
    if not 0 <= start < stop <= num_layers:
        raise ZooError(
            f"lora_layers {start}:{stop} is not a range of this model's layers "
            f"(0 <= start < stop <= {num_layers})"
        )
    outside = sorted({s.module for s in sites if layer_of(s.module, stack) is None})
    if outside:
        raise ZooError(
            f"LoRA target {outside[0]} lies outside the decoder layers ({stack}); "
            "lora_layers applies only to modules inside them"
        )
    return [s for s in sites if start <= (layer_of(s.module, stack) or 0) < stop]
