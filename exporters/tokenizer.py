"""The bundle's tokenizer.json and the facts the runtime needs about it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from zoo_ort.io import atomic_write_text

FILE = "tokenizer.json"


def _adds(tok: Tokenizer, token_id: int | None, where: int) -> bool:
    """Whether encoding with special tokens puts ``token_id`` at ``where`` (0 or -1)."""
    if token_id is None:
        return False
    with_special = tok.encode("a b", add_special_tokens=True).ids
    plain = tok.encode("a b", add_special_tokens=False).ids
    return len(with_special) > len(plain) and with_special[where] == token_id


def write_tokenizer(hf_tokenizer: Any, config: Any, folder: Path) -> dict[str, Any]:
    """Write ``tokenizer.json`` into ``folder``; return the manifest's tokenizer section.

    ``add_bos``/``add_eos`` say whether tokenizer.json's post-processor already adds them, so the
    runtime knows whether to add them itself.
    """
    text = hf_tokenizer.backend_tokenizer.to_str()
    atomic_write_text(folder / FILE, text)
    tok = Tokenizer.from_str(text)

    def pick(name: str) -> int | None:
        value = getattr(hf_tokenizer, name, None)
        if value is None:
            value = getattr(config, name, None)
        if isinstance(value, list):  # some configs list several eos ids; the first is canonical
            value = value[0] if value else None
        return None if value is None else int(value)

    bos, eos, pad = pick("bos_token_id"), pick("eos_token_id"), pick("pad_token_id")
    chat_template = getattr(hf_tokenizer, "chat_template", None)
    return {
        "file": FILE,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad if pad is not None else eos,
        "add_bos": _adds(tok, bos, 0),
        "add_eos": _adds(tok, eos, -1),
        "chat_template": chat_template if isinstance(chat_template, str) else None,
    }
