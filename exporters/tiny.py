"""Tiny random models with a tiny tokenizer, built offline, for tests and smoke runs.

``make_tiny_model(model_type, folder)`` writes a Hugging Face model folder (config, random
weights, tokenizer) that ``export_bundle`` accepts like any local model. The tokenizer is a
byte-level BPE trained on a built-in corpus, so it encodes any text (bytes are the fallback)
while the vocabulary stays small enough for a fast model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from .architectures import SUPPORTED_ARCHITECTURES
from .sources import quiet_progress_bars

PAD, BOS, EOS = "<pad>", "<s>", "</s>"  # ids 0, 1, 2

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


def _config(model_type: str, vocab_size: int, hidden: int, layers: int):
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if model_type == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            **ids,
        )
    if model_type == "qwen2":
        return Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            **ids,
        )
    if model_type == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, **ids
        )
    if model_type == "opt":
        return OPTConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            ffn_dim=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=hidden,
            **ids,
        )
    raise ValueError(f"no tiny config for {model_type!r}; known: {SUPPORTED_ARCHITECTURES}")


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
    tok = tiny_tokenizer(add_bos=model_type in ("llama", "opt"))
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
