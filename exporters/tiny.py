"""Tiny random models with a tiny tokenizer, built offline, for tests and smoke runs.

``make_tiny_model(model_type, folder)`` writes a Hugging Face model folder (config, random
weights, tokenizer) that ``export_bundle`` accepts like any local model. The tokenizer is a
byte-level BPE trained on a built-in corpus, so it encodes any text (bytes are the fallback)
while the vocabulary stays small enough for a fast model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .architectures import SUPPORTED_ARCHITECTURES
from .sources import quiet_progress_bars

PAD, BOS, EOS = "<pad>", "<s>", "</s>"  # ids 0, 1, 2
# Families whose released tokenizers prepend BOS; the tiny tokenizer does the same for them.
_ADDS_BOS = frozenset({"llama", "opt", "mistral", "gemma", "gemma2", "gemma3_text"})

_CORPUS = [
    "Review: a great movie with a warm heart. Sentiment: positive",
    "Review: a dull and tedious film. Sentiment: negative",
    "It was great. It was terrible. It was good. It was bad.",
    "the story is funny , moving and beautifully acted .",
    "the plot is boring , the acting is awful and the jokes fall flat .",
    "Question: does the premise entail the hypothesis? Answer: yes. Answer: no.",
    "True or False? True. False. Yes. No. Maybe.",
    "The quick brown fox jumps over the lazy dog.",
    "one of the best films of the year , and a wonderful surprise .",
    "an unfunny , overlong mess that wastes its talented cast .",
]


def tiny_tokenizer(vocab_size: int = 384, add_bos: bool = True) -> Tokenizer:
    """A byte-level BPE with <pad>, <s>, </s> as ids 0, 1, 2; BOS prepended when ``add_bos``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if add_bos:
        bos = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


# Sizes every family gets, under transformers' canonical names; each config class takes them in
# its own spelling through its attribute_map (GPT-2's n_embd is hidden_size), and a name a
# family does not have is left out rather than stored as a stray attribute.
def _sizes(vocab_size: int, hidden: int, layers: int) -> dict[str, Any]:
    heads = 4
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads // 2,  # grouped-query attention where the family has it
        "head_dim": hidden // heads,  # Gemma's default is 256 whatever the width
        "intermediate_size": 2 * hidden,
        "max_position_embeddings": 256,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def _family_settings(model_type: str, hidden: int, layers: int) -> dict[str, Any]:
    """What the shared sizes cannot say for a family (each entry says why)."""
    # Windows shorter than the tests' rows (up to 9 tokens), so a wrong window shows.
    window = 4

    def alternate(first: Any, second: Any) -> list[Any]:
        return [(first, second)[i % 2] for i in range(layers)]

    settings: dict[str, dict[str, Any]] = {
        "opt": {"ffn_dim": 2 * hidden, "word_embed_proj_dim": hidden},  # OPT's own names
        "qwen2": {"tie_word_embeddings": True},  # as Qwen2.5-0.5B; keeps a tied head in the tests
        # Rotary dims default to 64, more than a tiny head has.
        "gptj": {"rotary_dim": 4},
        "codegen": {"rotary_dim": 4},
        # Alternating global and local (windowed) layers, as GPT-Neo's checkpoints have.
        "gpt_neo": {
            "attention_types": [[[kind], 1] for kind in alternate("global", "local")],
            "window_size": window,
        },
        "mistral": {"sliding_window": window},
        "gemma2": {"sliding_window": window},
        # Gemma 3 makes 5 of 6 layers sliding: alternate, so 2 layers show both kinds.
        "gemma3_text": {
            "sliding_window": window,
            "layer_types": alternate("sliding_attention", "full_attention"),
        },
    }
    return settings.get(model_type, {})


def _config(model_type: str, vocab_size: int, hidden: int, layers: int) -> PretrainedConfig:
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"no tiny model for {model_type!r}; known: {SUPPORTED_ARCHITECTURES}")
    config_class = CONFIG_MAPPING[model_type]
    known = {f.name for f in dataclasses.fields(config_class)} | set(config_class.attribute_map)
    wanted = _sizes(vocab_size, hidden, layers) | _family_settings(model_type, hidden, layers)
    return config_class(**{k: v for k, v in wanted.items() if k in known})


def layers_needed(model_type: str) -> int:
    """The fewest layers whose tiny model has every kind of layer the family has: 2 where
    full and windowed (sliding, local) attention layers alternate, else 1."""
    # Two layers are enough to see whether kinds alternate; vocabulary and width do not matter.
    config = _config(model_type, vocab_size=384, hidden=32, layers=2)
    # transformers' layer_types (Gemma 2/3, Qwen) or GPT-Neo's expanded attention_types
    kinds = getattr(config, "layer_types", None) or getattr(config, "attention_layers", None)
    return len(set(kinds)) if kinds else 1


def make_tiny_model(
    model_type: str,
    folder: str | Path,
    *,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    init_std: float = 0.1,
) -> Path:
    """Write a random ``model_type`` causal LM with the tiny tokenizer into ``folder``.

    ``init_std`` is larger than Hugging Face's 0.02 so that logits are far from uniform and
    tests comparing losses have something to compare.
    """
    folder = Path(folder)
    tok = tiny_tokenizer(add_bos=model_type in _ADDS_BOS)
    config = _config(model_type, tok.get_vocab_size(), hidden, layers)
    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS
    )
    with quiet_progress_bars():
        model.save_pretrained(folder)
        fast.save_pretrained(folder)
    return folder
