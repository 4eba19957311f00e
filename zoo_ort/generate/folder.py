"""What a generation folder holds, as the exporter writes it and the runtime reads it.

A generation folder is one of two kinds, told apart by ``zoo_generate.json`` (the
:class:`FolderInfo` below):

* ``engine = "genai"``: an onnxruntime-genai model folder (``genai_config.json``, ``model.onnx``,
  tokenizer files) made by its model builder. When ``lora`` is set, every LoRA site is a pair of
  graph inputs (A ``[in, r]``, B ``[r, out]``, B already multiplied by the adapter's scale) whose
  default initializers are empty (rank 0), so the folder runs as the base model until an adapter
  is made active.
* ``engine = "onnx"``: a plain ONNX graph ``input_ids, attention_mask -> logits`` in standard
  operators (no KV cache, no contrib ops), for engines without adapter support or families the
  builder has no route for.

``zoo-ort merge`` writes both kinds into subfolders ``genai/`` and ``onnx/`` of its output; such a
parent folder is accepted too (:func:`resolve_folder`). A genai folder made elsewhere (no
``zoo_generate.json``) also loads, with what its ``genai_config.json`` says.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zoo_ort.errors import ZooError
from zoo_ort.io import atomic_write_json, read_json

INFO_FILE = "zoo_generate.json"
INFO_FORMAT = "zoo-ort-generate"
INFO_VERSION = 1
GENAI_CONFIG = "genai_config.json"
ONNX_GRAPH = "model.onnx"
TOKENIZER = "tokenizer.json"
ENGINES = ("genai", "onnx")
SUBFOLDERS = ("genai", "onnx")  # the order a merged parent folder is searched in


@dataclass(frozen=True)
class LoraInput:
    """One LoRA site of a genai folder: its graph inputs and the names adapters use for it."""

    module: str  # Hugging Face module path, e.g. "model.layers.0.self_attn.q_proj"
    A: str  # graph input [in, r]
    B: str  # graph input [r, out], scaled
    in_features: int
    out_features: int
    peft_prefix: str  # PEFT's key prefix for this module
    bundle_A: str  # the bundle's graph input names (keys of its .onnx_adapter files)
    bundle_B: str


@dataclass(frozen=True)
class LoraInputs:
    scale: float  # the bundle's alpha / rank, for .onnx_adapter files written for the bundle
    onnx_adapter_model_version: int  # the model_version those files carry
    sites: list[LoraInput]


@dataclass(frozen=True)
class FolderInfo:
    engine: str  # "genai" or "onnx"
    model_type: str
    context_length: int
    eos_token_ids: list[int]
    tokenizer: str = TOKENIZER
    source: dict[str, Any] = field(default_factory=dict)
    bundle_fingerprint: str | None = None
    lora: LoraInputs | None = None
    merged_adapter: dict[str, Any] | None = None  # what `merge` folded in, for the record
    format: str = INFO_FORMAT
    format_version: int = INFO_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FolderInfo:
        if d.get("format") != INFO_FORMAT or d.get("format_version") != INFO_VERSION:
            raise ValueError(f"format {d.get('format')!r} v{d.get('format_version')}")
        lora = d.get("lora")
        return cls(
            engine=str(d["engine"]),
            model_type=str(d["model_type"]),
            context_length=int(d["context_length"]),
            eos_token_ids=[int(i) for i in d["eos_token_ids"]],
            tokenizer=str(d.get("tokenizer", TOKENIZER)),
            source=dict(d.get("source") or {}),
            bundle_fingerprint=d.get("bundle_fingerprint"),
            lora=None
            if lora is None
            else LoraInputs(
                scale=float(lora["scale"]),
                onnx_adapter_model_version=int(lora["onnx_adapter_model_version"]),
                sites=[LoraInput(**s) for s in lora["sites"]],
            ),
            merged_adapter=d.get("merged_adapter"),
        )


def write_info(folder: str | Path, info: FolderInfo) -> None:
    atomic_write_json(Path(folder) / INFO_FILE, info.to_dict())


def resolve_folder(path: str | Path) -> Path:
    """The generation folder at ``path``, or its ``genai/`` / ``onnx/`` subfolder (merge output)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ZooError(f"{path}: no such model folder")
    if _is_generation_folder(path):
        return path
    for sub in SUBFOLDERS:
        if _is_generation_folder(path / sub) and (sub != "genai" or _genai_importable()):
            return path / sub
    if (path / "manifest.json").is_file():
        raise ZooError(
            f"{path} is a training bundle, not a generation folder; build one with "
            "`zoo-ort genai-export` or `zoo-ort merge`"
        )
    raise ZooError(f"{path}: no {INFO_FILE} or {GENAI_CONFIG}; not a generation folder")


def read_info(folder: Path) -> FolderInfo:
    """The folder's :class:`FolderInfo`; for a foreign genai folder, what genai_config says."""
    if (folder / INFO_FILE).is_file():
        try:
            info = FolderInfo.from_dict(read_json(folder / INFO_FILE))
        except (KeyError, TypeError, ValueError) as e:
            raise ZooError(f"{folder / INFO_FILE}: malformed ({e})") from None
        if info.engine not in ENGINES:
            raise ZooError(f"{folder / INFO_FILE}: unknown engine {info.engine!r}")
        return info
    return _info_from_genai_config(folder)


def _info_from_genai_config(folder: Path) -> FolderInfo:
    config = read_json(folder / GENAI_CONFIG)
    try:
        model = config["model"]
        eos = model["eos_token_id"]
        return FolderInfo(
            engine="genai",
            model_type=str(model["type"]),
            context_length=int(model["context_length"]),
            eos_token_ids=[int(i) for i in (eos if isinstance(eos, list) else [eos])],
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ZooError(f"{folder / GENAI_CONFIG}: malformed ({e})") from None


def _is_generation_folder(path: Path) -> bool:
    return (path / INFO_FILE).is_file() or (path / GENAI_CONFIG).is_file()


def _genai_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime_genai") is not None
