"""The generation library: load a folder (and adapters), then stream text or token ids."""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoo_ort.errors import ZooError
from zoo_ort.generate.adapters import convert_adapter
from zoo_ort.generate.engines import Engine, GenaiEngine, OnnxEngine, Sampling
from zoo_ort.generate.folder import FolderInfo, read_info, resolve_folder
from zoo_ort.generate.text import Detokenizer, Messages, TextCodec

log = logging.getLogger(__name__)

DEFAULT_ADAPTER = "default"
_NAME = re.compile(r"^[\w.-]+$")


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate: greedy unless ``temperature`` > 0.

    ``chat`` None applies the tokenizer's chat template when it has one. Generation stops at an
    EOS token (not returned), after ``max_new_tokens``, or at the end of the model's context.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    chat: bool | None = None

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ZooError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ZooError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ZooError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ZooError(f"top_k must be 0 (off) or more, got {self.top_k}")

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.top_k, self.seed)


class TextGenerator:
    """A loaded generation folder: its engine, tokenizer and (genai) adapters."""

    def __init__(self, folder: Path, info: FolderInfo, engine: Engine, codec: TextCodec) -> None:
        self.folder = folder
        self.info = info
        self.engine = engine
        self.codec = codec
        self.active: str | None = None
        self._adapters: dict[str, Path] = {}
        self._scratch: tempfile.TemporaryDirectory | None = None

    # -- adapters ----------------------------------------------------------------------------------
    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self._adapters)

    def load_adapter(self, adapter: str | Path, name: str = DEFAULT_ADAPTER) -> str:
        """Convert ``adapter`` (PEFT folder or ``.onnx_adapter``) and load it as ``name``.

        The base model stays loaded; :meth:`use_adapter` switches between loaded adapters.
        """
        if not _NAME.match(name):
            raise ZooError(f"adapter name {name!r}: use letters, digits, '.', '_' and '-'")
        if name in self._adapters:
            raise ZooError(f"an adapter named {name!r} is already loaded; unload it first")
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="zoo-ort-adapters-")
        file = convert_adapter(
            adapter, self.info, Path(self._scratch.name) / f"{name}.onnx_adapter"
        )
        self.engine.load_adapter(file, name)
        self._adapters[name] = file
        return name

    def unload_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise ZooError(f"no adapter {name!r} is loaded (loaded: {list(self._adapters)})")
        self.engine.unload_adapter(name)
        self._adapters.pop(name).unlink(missing_ok=True)
        if self.active == name:
            self.active = None

    def use_adapter(self, name: str | None) -> None:
        """Make ``name`` the adapter of the next generations (None: the base model)."""
        if name is not None and name not in self._adapters:
            raise ZooError(f"no adapter {name!r} is loaded (loaded: {list(self._adapters)})")
        self.active = name

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    # -- generation --------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str | Messages, chat: bool | None = None) -> list[int]:
        ids = self.codec.encode(prompt, chat)
        if not ids:
            raise ZooError("the prompt is empty")
        if len(ids) >= self.info.context_length:
            raise ZooError(
                f"the prompt is {len(ids)} tokens; the model's context is "
                f"{self.info.context_length} tokens, prompt and output together"
            )
        return ids

    def choose(
        self, prompt: str | Messages, choices: Sequence[str], chat: bool | None = None
    ) -> list[tuple[str, float]]:
        """The ``choices`` ranked by the probability of their first token after ``prompt``,
        normalised over the choices: how zoo-ort scores a classification task (its label words),
        asked of the generation model."""
        ids = self.prompt_ids(prompt, chat)
        firsts = []
        for choice in choices:
            tokens = self.codec.tokenizer.encode(choice, add_special_tokens=False).ids
            if not tokens:
                raise ZooError(f"choice {choice!r} has no tokens")
            firsts.append(tokens[0])
        if len(set(firsts)) < len(firsts):
            raise ZooError("two choices start with the same token; make their first words differ")
        logits = np.asarray(self.engine.next_logits(ids, self.active), np.float64)[firsts]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        ranked = sorted(zip(choices, probs.tolist(), strict=True), key=lambda c: -c[1])
        return [(c, float(p)) for c, p in ranked]

    def generate_ids(
        self, prompt: str | Messages | Sequence[int], config: GenerationConfig | None = None
    ) -> Iterator[int]:
        """Stream generated token ids (prompt given as text, messages or ids)."""
        config = config or GenerationConfig()
        config.check()
        ids = self._as_ids(prompt, config.chat)
        budget = min(config.max_new_tokens, self.info.context_length - len(ids))
        if budget < config.max_new_tokens:
            log.info("output cut to %d tokens by the model's context", budget)
        eos = set(self.info.eos_token_ids)
        stream = self.engine.tokens(ids, budget, config.sampling(), self.active)
        for count, token in enumerate(stream, start=1):
            if token in eos:
                return
            yield token
            if count >= budget:
                return

    def generate(
        self, prompt: str | Messages, config: GenerationConfig | None = None
    ) -> Iterator[str]:
        """Stream the generated text, piece by piece as tokens complete characters."""
        detok = Detokenizer(self.codec)
        for token in self.generate_ids(prompt, config):
            piece = detok.push(token)
            if piece:
                yield piece
        tail = detok.flush()
        if tail:
            yield tail

    def complete(self, prompt: str | Messages, config: GenerationConfig | None = None) -> str:
        return "".join(self.generate(prompt, config))

    def _as_ids(self, prompt: str | Messages | Sequence[int], chat: bool | None) -> list[int]:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], dict)):
            return self.prompt_ids(prompt, chat)  # type: ignore[arg-type]
        ids = [int(t) for t in prompt]  # type: ignore[union-attr]
        if not ids or len(ids) >= self.info.context_length:
            raise ZooError(f"{len(ids)} prompt tokens; the context is {self.info.context_length}")
        return ids


def load_generator(
    model_dir: str | Path,
    adapter: str | Path | None = None,
    *,
    providers: Sequence[str] | None = None,
) -> TextGenerator:
    """Load a generation folder (genai or plain ONNX), with ``adapter`` loaded and active.

    ``model_dir`` may also be the output folder of ``zoo-ort merge`` (its ``genai/`` subfolder is
    used when onnxruntime-genai is installed, else ``onnx/``). ``providers`` applies to plain ONNX
    folders; a genai folder runs on the providers its ``genai_config.json`` names.
    """
    folder = resolve_folder(model_dir)
    info = read_info(folder)
    engine: Engine = (
        GenaiEngine(folder) if info.engine == "genai" else OnnxEngine(folder, providers)
    )
    generator = TextGenerator(folder, info, engine, TextCodec(folder, info.tokenizer))
    if adapter is not None:
        generator.use_adapter(generator.load_adapter(adapter))
    return generator


def generate(
    model_dir: str | Path | TextGenerator,
    prompt: str | Messages,
    adapter: str | Path | None = None,
    **options: object,
) -> Iterator[str]:
    """One-shot streaming generation; ``options`` are :class:`GenerationConfig` fields."""
    try:
        config = GenerationConfig(**options)  # type: ignore[arg-type]
    except TypeError as e:
        raise ZooError(f"unknown generation option: {e}") from None
    if isinstance(model_dir, TextGenerator):
        if adapter is not None:
            raise ZooError("pass the adapter to load_generator, or call load_adapter")
        return model_dir.generate(prompt, config)
    generator = load_generator(model_dir, adapter)
    return _closing(generator, generator.generate(prompt, config))


def _closing(generator: TextGenerator, stream: Iterator[str]) -> Iterator[str]:
    try:
        yield from stream
    finally:
        generator.close()
