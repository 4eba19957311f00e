"""Prompts to token ids and generated ids back to text, as Hugging Face does it.

Tokenizing uses the folder's ``tokenizer.json`` with the ``tokenizers`` library (the same file and
library the bundle was trained with), not onnxruntime-genai's tokenizer: measured with 0.18.0 on
a byte-level BPE whose BOS comes from a ``TemplateProcessing`` post-processor, genai's tokenizer
drops the BOS and so conditions the model on a different prompt than training did.

A chat template (``chat_template.jinja`` or ``tokenizer_config.json``'s ``chat_template``) is
rendered with jinja2 in a sandbox, as ``transformers``' ``apply_chat_template`` renders it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from zoo_ort.errors import ZooError

Messages = Sequence[dict[str, str]]
REPLACEMENT = "\ufffd"  # what a decoder gives for an incomplete UTF-8 sequence


class TextCodec:
    """The folder's tokenizer and chat template."""

    def __init__(self, folder: Path, tokenizer_file: str) -> None:
        path = folder / tokenizer_file
        if not path.is_file():
            raise ZooError(f"{folder}: no {tokenizer_file}; the folder needs its tokenizer")
        self.tokenizer = Tokenizer.from_file(str(path))
        self._config = _tokenizer_config(folder)
        self.chat_template = _chat_template(folder, self._config)

    def encode(self, prompt: str | Messages, chat: bool | None = None) -> list[int]:
        """Token ids of ``prompt``; a chat template is applied when ``chat`` is True, or when it
        is None and the tokenizer has one. A list of messages always needs the template."""
        use_chat = self.chat_template is not None if chat is None else chat
        if not isinstance(prompt, str) and not use_chat:
            raise ZooError("a list of chat messages needs the chat template (chat=False given)")
        if use_chat:
            if self.chat_template is None:
                raise ZooError("this model's tokenizer has no chat template; drop the chat option")
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            text = self.render_chat(messages)
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        return self.tokenizer.encode(prompt).ids

    def render_chat(self, messages: Messages) -> str:
        template = _compile(self.chat_template or "")
        special = {k: _token_text(self._config.get(k)) for k in _SPECIAL_KEYS}
        try:
            return template.render(messages=list(messages), add_generation_prompt=True, **special)
        except Exception as e:  # a template's own raise_exception, or a bad template
            raise ZooError(f"the chat template failed: {e}") from None

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


class Detokenizer:
    """Turns a stream of token ids into a stream of text pieces.

    Decoding the whole sequence each time and emitting what is new keeps multi-token characters
    and decoder rules (byte-level, metaspace) exact; a piece ending in an incomplete character is
    held back until the next token completes it.
    """

    def __init__(self, codec: TextCodec) -> None:
        self._codec = codec
        self._ids: list[int] = []
        self._sent = ""

    def push(self, token: int) -> str:
        self._ids.append(token)
        text = self._codec.decode(self._ids)
        if text.endswith(REPLACEMENT) or not text.startswith(self._sent):
            return ""
        piece, self._sent = text[len(self._sent) :], text
        return piece

    def flush(self) -> str:
        text = self._codec.decode(self._ids)
        piece = text[len(self._sent) :] if text.startswith(self._sent) else ""
        self._sent = text
        return piece


_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _tokenizer_config(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ZooError(f"{path}: not valid JSON ({e})") from None


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _compile(source: str):
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ZooError(
            "chat templates need jinja2: pip install 'zoo-ort[genai]' (or pass chat=False)"
        ) from None

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(
        x, indent=indent, ensure_ascii=False
    )
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ZooError(f"the tokenizer's chat template does not parse: {e}") from None
