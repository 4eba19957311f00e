"""Which Hugging Face causal-LM families zoo-ort exports, and what it needs to know about each.

A supported family is a decoder-only causal LM whose backbone returns the final (normed) hidden
states and whose output embedding is a linear map, so scoring is
``lm_head(backbone(...).last_hidden_state)``. Nearly everything is discovered rather than listed:

* the LoRA targets are peft's own defaults (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``),
  so a bundle adapts exactly the modules ``get_peft_model`` would;
* the backbone is the model's ``base_model_prefix`` attribute and the LM head the child that
  ``get_output_embeddings()`` returns, both read from a weightless (meta-device) model;
* ``fan_in_fan_out`` is whether the targets are GPT-2 style ``Conv1D`` ([in, out] weights).

Written down are only what cannot be discovered: why a family is refused, which families build
ALiBi from the token mask, and example checkpoints for messages and docs.
``families_markdown()`` renders ``docs/families.md``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
)
from transformers.pytorch_utils import Conv1D

from zoo_ort.errors import ZooError

from .lora import Site, find_sites

# peft's default LoRA targets by model_type: a list of module names, or a regex string.
PEFT_LORA_TARGETS: dict[str, Any] = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.model_type
    default_targets: tuple[str, ...]  # LoRA target module names: peft's defaults
    backbone: str  # attribute of the *ForCausalLM model holding the decoder stack
    lm_head: str  # attribute of the *ForCausalLM model holding the output projection
    fan_in_fan_out: bool  # PEFT's flag: True where the targets are GPT-2 style Conv1D ([in, out])
    examples: str  # for error messages and docs
    # The backbone derives ALiBi positions from the [N, T] token mask (its cumulative sum), so it
    # is given that mask and builds its own causal mask instead of receiving a ready 4D one.
    token_mask: bool = False


# Families peft has default targets for that zoo-ort refuses for a reason the rules in
# `unsupported_reason` cannot see; each reason is what the user reads.
REFUSED: dict[str, str] = {
    "mixtral": (
        "a mixture-of-experts model: its experts are 3D parameters, not Linear modules, run by "
        "transformers' grouped_mm custom op, which the ONNX exporter cannot convert"
    ),
    "nemotron_h": (
        "a hybrid Mamba-2/attention/MoE model: its experts run by transformers' grouped_mm "
        "custom op (no ONNX conversion) and its Mamba layers need the [N, T] token mask"
    ),
    "rwkv": (
        "a recurrent model (RWKV) that ignores the attention mask: its state runs through "
        "padding, so padded rows would not score as they do alone"
    ),
}

# Backbones that turn the [N, T] token mask into ALiBi biases (cumulative sum of real tokens).
TOKEN_MASK = frozenset({"bloom", "falcon"})

# Example checkpoints (documentation only).
EXAMPLES: dict[str, str] = {
    "bloom": "BLOOM, BLOOMZ",
    "codegen": "CodeGen",
    "falcon": "Falcon 7B/40B/180B",
    "gemma": "Gemma 2B/7B",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 1B (text-only)",
    "gpt2": "GPT-2, DistilGPT2",
    "gpt_bigcode": "StarCoder, SantaCoder",
    "gpt_neo": "GPT-Neo",
    "gpt_neox": "Pythia, GPT-NeoX-20B",
    "gptj": "GPT-J",
    "llama": "SmolLM2, TinyLlama, Llama 2/3",
    "mistral": "Mistral 7B",
    "mpt": "MPT",
    "opt": "OPT",
    "phi": "Phi-1, Phi-1.5, Phi-2",
    "qwen2": "Qwen2, Qwen2.5",
    "qwen3": "Qwen3",
    "stablelm": "StableLM, StableLM 2",
}


# What the table of verified families cannot say (documentation only).
NOTES: tuple[str, ...] = (
    "Each family is verified on one tiny random configuration (`zoo_ort.exporters.tiny`): its "
    "transformers defaults with hidden size 32, 1 layer (2 where full and windowed attention "
    "layers alternate) and sliding windows of 4 tokens where the family has them. Variants of a "
    "family (e.g. Falcon's `new_decoder_architecture`) are not exported by the tests.",
    "",
    "- Sliding windows (mistral, gemma2, gemma3_text; Qwen with `use_sliding_window`) and "
    "Gemma 2's final logit soft-capping are built into the scoring graph. bloom and falcon "
    "derive ALiBi from the token mask (falcon only with `alibi=true`), so their backbone gets "
    "that mask and builds its own causal mask.",
    "- falcon with `alibi=true` (Falcon-RW) exports transformers' eager attention, which scales "
    "the ALiBi bias with the scores as the original code did; transformers' SDPA path does not, "
    "so the two disagree, and only rotary Falcon is verified.",
    "- NPU targets (`target=`, docs/mobile.md) pass one ready attention mask and no soft-capping: "
    "they are verified for llama, qwen2, gpt2 and opt only.",
)


def unsupported_reason(model_type: str) -> str | None:
    """Why zoo-ort cannot export ``model_type`` (a short clause), or None if it can."""
    if model_type not in CONFIG_MAPPING_NAMES:
        if model_type in PEFT_LORA_TARGETS:
            return "needs remote code (not a transformers model type)"
        return "not a transformers model type"
    if (
        model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
        or CONFIG_MAPPING[model_type].is_encoder_decoder
    ):
        return "an encoder-decoder model, not decoder-only"
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "an encoder (bidirectional) model, not decoder-only"
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "transformers has no causal-LM class for it"
    if model_type in REFUSED:
        return REFUSED[model_type]
    if model_type not in PEFT_LORA_TARGETS:
        return "peft has no default LoRA targets for it"
    if not isinstance(PEFT_LORA_TARGETS[model_type], list) or _is_composite(model_type):
        return "a multimodal model (its config nests a text config beside vision/audio ones)"
    return None


def _is_composite(model_type: str) -> bool:
    return "text_config" in CONFIG_MAPPING[model_type].sub_configs


SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(
    sorted(t for t in PEFT_LORA_TARGETS if unsupported_reason(t) is None)
)


@functools.cache
def architecture(model_type: str) -> Architecture:
    """What zoo-ort needs to export ``model_type``; a ZooError says why it cannot."""
    reason = unsupported_reason(model_type)
    if reason is not None:
        raise ZooError(
            f"unsupported architecture {model_type!r}: {reason}; zoo-ort exports: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    model = default_meta_model(model_type)
    targets = tuple(PEFT_LORA_TARGETS[model_type])
    sites = find_sites(model, list(targets))
    return Architecture(
        model_type=model_type,
        default_targets=targets,
        backbone=_backbone_name(model),
        lm_head=_lm_head_name(model),
        fan_in_fan_out=any(isinstance(model.get_submodule(s.module), Conv1D) for s in sites),
        examples=EXAMPLES.get(model_type, model_type),
        token_mask=model_type in TOKEN_MASK,
    )


def default_meta_model(model_type: str) -> torch.nn.Module:
    """The family's default-size model without weights: enough to read names and shapes."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            AutoConfig.for_model(model_type), attn_implementation="eager"
        )


def _backbone_name(model: torch.nn.Module) -> str:
    name = model.base_model_prefix
    if not isinstance(getattr(model, name, None), torch.nn.Module):
        raise ZooError(f"{type(model).__name__} has no backbone at .{name} (base_model_prefix)")
    return name


def _lm_head_name(model: torch.nn.Module) -> str:
    head = model.get_output_embeddings()
    names = [name for name, child in model.named_children() if child is head]
    if not names:
        raise ZooError(f"{type(model).__name__}'s output embedding is not a direct child")
    return names[0]


# -- docs/families.md -------------------------------------------------------------------------


def _target_summary(model: torch.nn.Module, targets: tuple[str, ...]) -> tuple[str, bool]:
    """``"c_attn 768→2304"``-style shapes of each target (first layer), and whether any is a
    fused attention projection (q with k and/or v: wider than the query projection alone)."""
    config = model.config
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    sites = find_sites(model, list(targets))
    parts, fused = [], False
    for target in targets:
        site = next(s for s in sites if s.module == target or s.module.endswith(f".{target}"))
        fused |= _in_attention(model, site) and site.out_features > heads * head_dim
        parts.append(f"`{target}` {site.in_features}→{site.out_features}")
    return ", ".join(parts), fused


def _in_attention(model: torch.nn.Module, site: Site) -> bool:
    parent = model.get_submodule(site.module.rpartition(".")[0])
    return "Attention" in type(parent).__name__


def families_markdown() -> str:
    """The text of docs/families.md, generated from the rules above and peft's table (its
    first paragraph gives the command that writes the file)."""
    lines = [
        "# Model families",
        "",
        "Generated by `python -c 'import zoo_ort.exporters.architectures as a; "
        'print(a.families_markdown(), end="")\' > docs/families.md`; '
        "`tests/test_families.py` checks that this file is current and exports a tiny random "
        "model of every family below, comparing the bundle with PyTorch + `peft.get_peft_model` "
        "row by row (LoRA-FA with a nonzero, per-row B; <= 1e-4) and checking that rows are "
        "independent.",
        "",
        "LoRA targets are peft's defaults "
        "(`peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`); shapes are "
        "those of the family's default (transformers) config. *Fused*: one target projects q "
        "together with k and v, so its LoRA adapts all three, as in peft.",
        "",
        "## Exported and verified",
        "",
        "| model_type | examples | LoRA targets (in→out) | fused | backbone | lm_head |",
        "|---|---|---|---|---|---|",
    ]
    for model_type in SUPPORTED_ARCHITECTURES:
        arch = architecture(model_type)
        targets, fused = _target_summary(default_meta_model(model_type), arch.default_targets)
        conv = " (Conv1D)" if arch.fan_in_fan_out else ""
        lines.append(
            f"| `{model_type}` | {arch.examples} | {targets}{conv} | {'yes' if fused else 'no'} "
            f"| `{arch.backbone}` | `{arch.lm_head}` |"
        )
    lines += ["", *NOTES]
    lines += [
        "",
        "## Refused, though peft has default targets",
        "",
        "| model_type | peft targets | reason |",
        "|---|---|---|",
    ]
    for model_type, targets in sorted(PEFT_LORA_TARGETS.items(), key=lambda kv: kv[0].lower()):
        reason = unsupported_reason(model_type)
        if reason is not None:
            shown = ", ".join(targets) if isinstance(targets, list) else targets
            lines.append(f"| `{model_type}` | `{shown}` | {reason} |")
    lines += ["", "## Refused: other model types with a transformers causal-LM class", ""]
    by_reason: dict[str, list[str]] = {}
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        reason = unsupported_reason(model_type)
        if model_type not in PEFT_LORA_TARGETS and reason is not None:
            by_reason.setdefault(reason, []).append(model_type)
    for reason, model_types in sorted(by_reason.items()):
        listed = ", ".join(f"`{t}`" for t in model_types)
        lines += [f"- {reason} ({len(model_types)}): {listed}.", ""]
    return "\n".join(lines)
