"""Tokenisation with the bundle's ``tokenizer.json`` and the ``tokenizers`` library alone."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from zoo_ort.errors import ZooError


class TextEncoder:
    """Text → token ids without special tokens, plus the prefix (BOS) every sequence starts with.

    The prefix is whatever the tokenizer's post-processor puts before a text (so BOS is never
    doubled), or ``[bos_token_id]`` when the manifest asks for ``add_bos`` and the post-processor
    adds nothing. Anything a post-processor appends (an EOS) is left out: a prompt must end at
    its last real token.
    """

    def __init__(self, tokenizer: Tokenizer, meta: Mapping[str, Any] | None = None) -> None:
        meta = dict(meta or {})
        self.tokenizer = tokenizer
        self.bos_id: int | None = _opt_int(meta.get("bos_token_id"))
        self.eos_id: int | None = _opt_int(meta.get("eos_token_id"))
        pad = _opt_int(meta.get("pad_token_id"))
        self.pad_id: int = (
            pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        )
        add_bos = bool(meta.get("add_bos", meta.get("add_bos_token", False)))
        self.prefix: list[int] = self._post_processor_prefix()
        if not self.prefix and add_bos and self.bos_id is not None:
            self.prefix = [self.bos_id]

    @classmethod
    def from_file(cls, path: str | Path, meta: Mapping[str, Any] | None = None) -> TextEncoder:
        path = Path(path)
        if not path.is_file():
            raise ZooError(f"{path}: tokenizer file not found")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise ZooError(f"{path}: not a loadable tokenizer.json ({e})") from None
        return cls(tokenizer, meta)

    @classmethod
    def from_bundle(cls, bundle: Any) -> TextEncoder:
        """From a :class:`zoo_ort.bundle.Bundle`: its tokenizer file and ``manifest.tokenizer``."""
        return cls.from_file(bundle.tokenizer_path, bundle.manifest.tokenizer)

    def _post_processor_prefix(self) -> list[int]:
        probe = "a b"
        bare = self.tokenizer.encode(probe, add_special_tokens=False).ids
        full = self.tokenizer.encode(probe, add_special_tokens=True).ids
        for start in range(len(full) - len(bare) + 1):
            if full[start : start + len(bare)] == bare:
                return full[:start]
        return []

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast skips offsets (tokenizers >= 0.20); same ids, less work.
        fast = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        return [e.ids for e in fast(texts, add_special_tokens=False)]

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def first_token(self, word: str) -> int:
        ids = self.encode(word)
        if not ids:
            raise ZooError(f"label word {word!r} encodes to no tokens")
        return ids[0]

    def label_tokens(self, words: list[str]) -> list[int]:
        """The first token of each label word (MeZO's convention); they must all differ."""
        ids = [self.first_token(w) for w in words]
        for i, a in enumerate(ids):
            for j in range(i):
                if ids[j] == a:
                    raise ZooError(
                        f"label words {words[j]!r} and {words[i]!r} start with the same token "
                        f"{self.tokenizer.id_to_token(a)!r}; choose words that differ at the start"
                    )
        return ids


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)
