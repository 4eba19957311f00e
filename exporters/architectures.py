"""What zoo-ort needs to know about each supported Hugging Face architecture, as one small table.

Every supported model is a decoder-only causal LM whose backbone returns the final (normed)
hidden states and whose output embedding is a plain linear map, so scoring is
``lm_head(backbone(...).last_hidden_state)``; only the names differ.
"""

from __future__ import annotations

from dataclasses import dataclass

from zoo_ort.errors import ZooError


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.model_type
    default_targets: tuple[str, ...]  # LoRA target module names (PEFT's target_modules)
    backbone: str  # attribute of the *ForCausalLM model holding the decoder stack
    lm_head: str  # attribute of the *ForCausalLM model holding the output projection
    fan_in_fan_out: bool  # PEFT's flag: True where the targets are GPT-2 style Conv1D ([in, out])
    examples: str  # for error messages and docs


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture(
            "llama",
            ("q_proj", "v_proj"),
            "model",
            "lm_head",
            False,
            "SmolLM2, TinyLlama, Llama 2/3",
        ),
        Architecture("qwen2", ("q_proj", "v_proj"), "model", "lm_head", False, "Qwen2, Qwen2.5"),
        # GPT-2 fuses q, k and v into one Conv1D, so LoRA on c_attn covers all three (as in PEFT).
        Architecture("gpt2", ("c_attn",), "transformer", "lm_head", True, "GPT-2, DistilGPT2"),
        Architecture("opt", ("q_proj", "v_proj"), "model", "lm_head", False, "OPT"),
    )
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(ARCHITECTURES)


def architecture(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(f"{a.model_type} ({a.examples})" for a in ARCHITECTURES.values())
        raise ZooError(
            f"unsupported architecture {model_type!r}; zoo-ort exports: {supported}"
        ) from None
