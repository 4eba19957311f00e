"""Where the weights come from: a recipe, a local model folder, a ``.gguf`` file or a cached hub id.

Everything loads with ``local_files_only=True``: zoo-ort never reaches the network, so a hub id
must already be in the local Hugging Face cache.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.utils import logging as hf_logging

from zoo_ort.errors import ZooError

from .recipes import list_recipes, load_recipe, offline_gguf

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Source:
    requested: str  # what the user passed
    kind: str  # "recipe-gguf", "recipe-hub", "gguf", "folder" or "hub"
    location: str  # folder or hub id given to from_pretrained
    gguf_file: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"local_files_only": True}
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        return kw

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"model": self.requested, "kind": self.kind, "location": self.location}
        if self.gguf_file:
            d["gguf_file"] = self.gguf_file
        if self.recipe:
            d["recipe"] = self.recipe["name"]
            d["hub_id"] = self.recipe.get("hub_id")
        return d


def _gguf_source(path: Path, requested: str, kind: str, recipe: dict | None = None) -> Source:
    from gguf import GGUFReader

    try:
        GGUFReader(str(path), "r")
    except Exception as e:  # gguf raises ValueError, struct errors, ... on a bad file
        raise ZooError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    return Source(requested, kind, str(path.parent.resolve()), path.name, recipe or {})


def _hub_source(hub_id: str, requested: str, kind: str, recipe: dict | None = None) -> Source:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(hub_id, "config.json")
    if not isinstance(cached, str):
        raise ZooError(
            f"{hub_id!r} is not in the local Hugging Face cache and zoo-ort works offline; "
            f"download it first (`hf download {hub_id}`) or pass a local folder or .gguf file"
        )
    return Source(requested, kind, hub_id, None, recipe or {})


def resolve(model: str) -> Source:
    """Find ``model`` without loading it; unknown names and unreadable files are ZooErrors."""
    if model in list_recipes():
        recipe = load_recipe(model)
        gguf = offline_gguf(recipe)
        if gguf is not None:
            return _gguf_source(gguf, model, "recipe-gguf", recipe)
        if not recipe.get("hub_id"):
            raise ZooError(f"recipe {model!r} names no hub_id and its offline source is missing")
        return _hub_source(recipe["hub_id"], model, "recipe-hub", recipe)
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ZooError(f"{path}: a model file must be .gguf; otherwise pass the model folder")
        return _gguf_source(path, model, "gguf")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ZooError(f"{path}: not a Hugging Face model folder (no config.json)")
        return Source(model, "folder", str(path.resolve()))
    looks_like_path = model.startswith((".", "/", "~")) or model.lower().endswith(".gguf")
    unknown = ZooError(
        f"unknown model {model!r}: not a recipe ({', '.join(list_recipes())}), "
        f"an existing folder or .gguf file, or a hub id like org/name"
    )
    if looks_like_path or not _HUB_ID.match(model):
        raise unknown
    if "/" not in model:  # a legacy bare hub id ("distilgpt2") only if cached, else likely a typo
        try:
            return _hub_source(model, model, "hub")
        except ZooError:
            raise unknown from None
    return _hub_source(model, model, "hub")


def load_config(source: Source) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(source.location, **source.kwargs())
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ZooError(f"{source.requested}: cannot read the model config ({first})") from None


def meta_model(config: PretrainedConfig) -> torch.nn.Module:
    """The model's module tree without weights, to validate LoRA targets cheaply."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def load_tokenizer(source: Source):
    try:
        with quiet_progress_bars():
            tokenizer = AutoTokenizer.from_pretrained(source.location, **source.kwargs())
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ZooError(f"{source.requested}: cannot load its tokenizer ({first})") from None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ZooError(
            f"{source.requested}: its tokenizer has no `tokenizers` (tokenizer.json) form, "
            "which the zoo-ort runtime needs"
        )
    return tokenizer


def load_model(source: Source) -> torch.nn.Module:
    """The fp32 model with eager attention (plain MatMul/Softmax, no SDPA kernel in the graph)."""
    log.info("loading %s from %s", source.requested, source.location)
    with quiet_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(
            source.location, dtype=torch.float32, attn_implementation="eager", **source.kwargs()
        )
    return model.eval()


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Hide transformers' tqdm bars (nothing below the CLI prints).

    The GGUF de-quantizer uses a bare tqdm that ignores transformers' switch, so stderr is
    captured too and passed on to the log.
    """
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        if captured.getvalue().strip():
            log.debug("captured stderr: %s", captured.getvalue().strip()[-2000:])
