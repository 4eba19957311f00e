"""The two engines behind a generation folder: onnxruntime-genai, and plain ONNX Runtime.

Both turn prompt ids into a stream of next tokens under a :class:`Sampling`; stopping at EOS and
at the token budget is the caller's job (:mod:`zoo_ort.generate.generator`), so both engines stop
the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Protocol

import numpy as np

from zoo_ort.errors import ZooError
from zoo_ort.generate.folder import GENAI_CONFIG, ONNX_GRAPH
from zoo_ort.io import read_json

GENAI_MISSING = "generation needs the genai extra: pip install 'zoo-ort[genai]'"
NO_ADAPTERS = (
    "this is a plain ONNX model (any adapter is merged in); adapters switch at run time only in "
    "a genai folder with LoRA inputs (`zoo-ort genai-export`)"
)


@dataclass(frozen=True)
class Sampling:
    """Greedy when ``temperature`` is 0; else sampling, optionally cut to top-k and top-p."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Engine(Protocol):
    def tokens(
        self, prompt: Sequence[int], max_new: int, sampling: Sampling, adapter: str | None
    ) -> Iterator[int]: ...

    def next_logits(self, prompt: Sequence[int], adapter: str | None) -> np.ndarray: ...

    def load_adapter(self, file: Path, name: str) -> None: ...

    def unload_adapter(self, name: str) -> None: ...


def import_genai() -> ModuleType:
    """``onnxruntime_genai``, imported on first use; a ZooError when the extra is missing."""
    try:
        import onnxruntime_genai
    except ImportError:
        raise ZooError(GENAI_MISSING) from None
    return onnxruntime_genai


class GenaiEngine:
    """An onnxruntime-genai model with its multi-LoRA ``Adapters``."""

    def __init__(self, folder: Path) -> None:
        self._og = import_genai()
        try:
            self.model = self._og.Model(str(folder))
        except Exception as e:  # genai raises RuntimeError with a multi-line message
            raise ZooError(
                f"{folder}: onnxruntime-genai cannot load it ({_first_line(e)})"
            ) from None
        self.adapters = self._og.Adapters(self.model)
        self._vocab_size = int(read_json(folder / GENAI_CONFIG)["model"].get("vocab_size", 0))

    def load_adapter(self, file: Path, name: str) -> None:
        try:
            self.adapters.load(str(file), name)
        except Exception as e:
            raise ZooError(f"{file}: onnxruntime-genai cannot load it ({_first_line(e)})") from None

    def unload_adapter(self, name: str) -> None:
        self.adapters.unload(name)

    def tokens(
        self, prompt: Sequence[int], max_new: int, sampling: Sampling, adapter: str | None
    ) -> Iterator[int]:
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(**self._search_options(len(prompt) + max_new, sampling))
        generator = self._og.Generator(self.model, params)
        if adapter is not None:
            generator.set_active_adapter(self.adapters, adapter)
        generator.append_tokens(np.asarray(prompt, dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])

    def next_logits(self, prompt: Sequence[int], adapter: str | None) -> np.ndarray:
        """The logits (float32 ``[vocab]``) of the token after ``prompt``."""
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(**self._search_options(len(prompt) + 1, Sampling()))
        generator = self._og.Generator(self.model, params)
        if adapter is not None:
            generator.set_active_adapter(self.adapters, adapter)
        generator.append_tokens(np.asarray(prompt, dtype=np.int32))
        return np.asarray(generator.get_logits(), dtype=np.float32).reshape(-1)

    def _search_options(self, max_length: int, sampling: Sampling) -> dict[str, float | bool]:
        # Every option is set: the folder's genai_config may carry other defaults (top_k=50).
        options: dict[str, float | bool] = {
            "max_length": max_length,
            "min_length": 0,
            "num_beams": 1,
            "repetition_penalty": 1.0,
            "do_sample": not sampling.greedy,
        }
        if not sampling.greedy:
            top_k = sampling.top_k or self._vocab_size or 0
            options |= {"temperature": sampling.temperature, "top_p": sampling.top_p}
            options |= {"top_k": top_k}
            if sampling.seed is not None:
                options["random_seed"] = sampling.seed
        return options


class OnnxEngine:
    """A plain ``input_ids, attention_mask -> logits`` graph on ONNX Runtime, without KV cache.

    Every step runs the whole sequence again: slower than genai, but it needs nothing beyond
    onnxruntime and runs every family zoo-ort exports.
    """

    def __init__(self, folder: Path, providers: Sequence[str] | None = None) -> None:
        import onnxruntime as ort

        path = folder / ONNX_GRAPH
        if not path.is_file():
            raise ZooError(f"{folder}: no {ONNX_GRAPH}")
        self.session = ort.InferenceSession(
            str(path), providers=list(providers or ["CPUExecutionProvider"])
        )

    def load_adapter(self, file: Path, name: str) -> None:
        raise ZooError(NO_ADAPTERS)

    def unload_adapter(self, name: str) -> None:
        raise ZooError(f"no adapter {name!r} is loaded")

    def next_logits(self, prompt: Sequence[int], adapter: str | None) -> np.ndarray:
        if adapter is not None:
            raise ZooError(NO_ADAPTERS)
        batch = np.asarray([list(prompt)], dtype=np.int64)
        feeds = {"input_ids": batch, "attention_mask": np.ones_like(batch)}
        return self.session.run(["logits"], feeds)[0][0, -1]

    def tokens(
        self, prompt: Sequence[int], max_new: int, sampling: Sampling, adapter: str | None
    ) -> Iterator[int]:
        if adapter is not None:
            raise ZooError(NO_ADAPTERS)
        ids = list(prompt)
        rng = np.random.default_rng(sampling.seed)
        for _ in range(max_new):
            batch = np.asarray([ids], dtype=np.int64)
            feeds = {"input_ids": batch, "attention_mask": np.ones_like(batch)}
            logits = self.session.run(["logits"], feeds)[0][0, -1]
            token = pick_token(logits, sampling, rng)
            yield token
            ids.append(token)


def pick_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """The next token from one row of logits: argmax, or a draw after top-k and top-p cuts."""
    if sampling.greedy:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / sampling.temperature
    order = np.argsort(-scaled, kind="stable")
    if sampling.top_k:
        order = order[: sampling.top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), sampling.top_p) + 1)
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(len(order), p=probs)])


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
