"""zoo-ort's adapters, turned into the ``.onnx_adapter`` files that ``onnxruntime_genai.Adapters``
loads for a genai folder with LoRA inputs.

Three kinds of input are read into one form, :class:`LoraWeights` (per Hugging Face module:
A ``[in, r]`` and B ``[r, out]`` with the LoRA scale already folded into B):

* a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``), as
  :func:`zoo_ort.adapters.save_peft_adapter` writes it or any PEFT LoRA on the same base model;
  its scale is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` for rsLoRA);
* an ``.onnx_adapter`` written for the training bundle (keys are the bundle's graph inputs, B with
  a leading row dimension of 1); its scale is the bundle's, recorded in the folder's info, and
  its ``model_version`` must be the bundle's;
* an ``.onnx_adapter`` already in genai form (keys are the folder's LoRA inputs), passed through.

Only numpy, onnxruntime and safetensors are used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from zoo_ort.errors import ZooError
from zoo_ort.generate.folder import FolderInfo, LoraInput, LoraInputs, read_info, resolve_folder
from zoo_ort.io import load_tensors, read_json

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
ADAPTER_SUFFIX = ".onnx_adapter"


@dataclass(frozen=True)
class LoraWeights:
    """Per module path: (A ``[in, r]``, B ``[r, out]`` times the adapter's scale)."""

    tensors: dict[str, tuple[np.ndarray, np.ndarray]]
    base_model: str | None = None  # what the adapter says it was trained on, if anything


def read_adapter(path: str | Path, info: FolderInfo) -> LoraWeights:
    """Read a PEFT folder or a bundle ``.onnx_adapter`` for the folder described by ``info``."""
    path = Path(path).expanduser()
    lora = _lora_of(info, path)
    if path.is_dir():
        weights = _read_peft(path, lora.sites)
    elif path.is_file() and path.suffix == ADAPTER_SUFFIX:
        weights = _read_bundle_onnx_adapter(path, info)
    else:
        raise ZooError(
            f"{path}: not an adapter (a PEFT folder with {PEFT_CONFIG}, or a {ADAPTER_SUFFIX} file)"
        )
    check_weights(weights, lora.sites, path)
    return weights


def write_genai_adapter(weights: LoraWeights, info: FolderInfo, out: str | Path) -> Path:
    """Write ``weights`` as an ``.onnx_adapter`` keyed by the folder's LoRA inputs."""
    sites = {s.module: s for s in _lora_of(info, Path(out)).sites}
    params = {}
    for module, (a, b) in weights.tensors.items():
        site = sites[module]
        params[site.A] = np.ascontiguousarray(a, dtype=np.float32)
        params[site.B] = np.ascontiguousarray(b, dtype=np.float32)
    return _export(params, info, Path(out))


def convert_adapter(adapter: str | Path, model: FolderInfo | str | Path, out: str | Path) -> Path:
    """``adapter`` (PEFT folder or any ``.onnx_adapter``) as a genai ``.onnx_adapter`` at ``out``,
    for ``model`` (a generation folder, or its :class:`FolderInfo`)."""
    info = model if isinstance(model, FolderInfo) else read_info(resolve_folder(model))
    adapter = Path(adapter).expanduser()
    if adapter.is_file() and adapter.suffix == ADAPTER_SUFFIX and _is_genai_form(adapter, info):
        params = {k: v.numpy() for k, v in _read_onnx_adapter(adapter).get_parameters().items()}
        _check_genai_params(params, info, adapter)
        return _export(params, info, Path(out))
    return write_genai_adapter(read_adapter(adapter, info), info, out)


def check_weights(weights: LoraWeights, sites: list[LoraInput], where: Path) -> None:
    """Every module must be a LoRA site of the folder, with matching shapes (rank is free)."""
    by_module = {s.module: s for s in sites}
    if not weights.tensors:
        raise ZooError(f"{where}: the adapter holds no LoRA tensors")
    for module, (a, b) in weights.tensors.items():
        site = by_module.get(module)
        if site is None:
            known = ", ".join(sorted({s.module.rsplit(".", 1)[-1] for s in sites}))
            raise ZooError(
                f"{where}: adapter for another model: it targets {module}, which this model "
                f"folder has no LoRA input for (its sites: {known})"
            )
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ZooError(f"{where}: {module}: A {list(a.shape)} and B {list(b.shape)} mismatch")
        if a.shape[0] != site.in_features or b.shape[1] != site.out_features:
            raise ZooError(
                f"{where}: adapter for another model: {module} is {a.shape[0]}->{b.shape[1]}, "
                f"this model's is {site.in_features}->{site.out_features}"
            )


# -- readers ------------------------------------------------------------------------------------


def _lora_of(info: FolderInfo, where: Path) -> LoraInputs:
    if info.lora is None:
        raise ZooError(
            f"{where}: this model folder has no LoRA inputs (a merged or foreign model); "
            "build one with `zoo-ort genai-export` to switch adapters at run time"
        )
    return info.lora


def _peft_scale(config: dict, folder: Path) -> float:
    if config.get("peft_type") != "LORA":
        raise ZooError(
            f"{folder}: peft_type is {config.get('peft_type')!r}, only LORA is supported"
        )
    if config.get("use_dora"):
        raise ZooError(f"{folder}: DoRA adapters are not supported")
    if config.get("bias", "none") != "none":
        raise ZooError(f"{folder}: LoRA biases (bias={config.get('bias')!r}) are not supported")
    rank = int(config.get("r", 0))
    if rank <= 0:
        raise ZooError(f"{folder}: {PEFT_CONFIG} gives no positive rank r")
    alpha = float(config.get("lora_alpha", rank))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _read_peft(folder: Path, sites: list[LoraInput]) -> LoraWeights:
    if not (folder / PEFT_CONFIG).is_file():
        raise ZooError(f"{folder}: no {PEFT_CONFIG}; not a PEFT adapter folder")
    if not (folder / PEFT_WEIGHTS).is_file():
        raise ZooError(f"{folder}: no {PEFT_WEIGHTS} (safetensors only, never pickle)")
    config = read_json(folder / PEFT_CONFIG)
    scale = _peft_scale(config, folder)
    raw = load_tensors(folder / PEFT_WEIGHTS)
    by_prefix = {s.peft_prefix: s.module for s in sites}
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in raw.items():
        prefix, which = _split_peft_key(key, folder)
        module = by_prefix.get(prefix) or prefix.removeprefix("base_model.model.")
        pairs.setdefault(module, {})[which] = value
    tensors = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ZooError(f"{folder}: {module} has lora_{''.join(pair)} only")
        a = pair["A"].T.astype(np.float32)  # PEFT: lora_A.weight [r, in], lora_B.weight [out, r]
        b = pair["B"].T.astype(np.float32) * np.float32(scale)
        tensors[module] = (a, b)
    return LoraWeights(tensors, config.get("base_model_name_or_path"))


def _split_peft_key(key: str, folder: Path) -> tuple[str, str]:
    for which in ("A", "B"):
        for tail in (f".lora_{which}.weight", f".lora_{which}.default.weight"):
            if key.endswith(tail):
                return key[: -len(tail)], which
    raise ZooError(f"{folder}: unexpected tensor {key} (only LoRA A/B weights are supported)")


def _read_onnx_adapter(path: Path) -> ort.AdapterFormat:
    try:
        return ort.AdapterFormat.read_adapter(str(path))
    except Exception as e:  # onnxruntime raises its own error types for unreadable files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ZooError(f"{path}: not a readable {ADAPTER_SUFFIX} file ({first})") from None


def _is_genai_form(path: Path, info: FolderInfo) -> bool:
    keys = set(_read_onnx_adapter(path).get_parameters())
    lora = info.lora
    inputs = {n for s in lora.sites for n in (s.A, s.B)} if lora else set()
    return bool(keys) and (keys <= inputs or lora is None)


def _read_bundle_onnx_adapter(path: Path, info: FolderInfo) -> LoraWeights:
    lora = _lora_of(info, path)
    adapter = _read_onnx_adapter(path)
    if adapter.get_model_version() != lora.onnx_adapter_model_version:
        raise ZooError(
            f"{path}: adapter for another model: made for bundle version "
            f"{adapter.get_model_version()}, this folder's bundle is "
            f"{lora.onnx_adapter_model_version}"
        )
    params = {k: v.numpy() for k, v in adapter.get_parameters().items()}
    tensors = {}
    for site in lora.sites:
        if site.bundle_A not in params or site.bundle_B not in params:
            raise ZooError(f"{path}: adapter for another model: no tensors for {site.module}")
        a, b = _drop_row_dim(params.pop(site.bundle_A)), _drop_row_dim(params.pop(site.bundle_B))
        tensors[site.module] = (a.astype(np.float32), b.astype(np.float32) * np.float32(lora.scale))
    if params:
        raise ZooError(f"{path}: adapter for another model: unexpected {sorted(params)[0]}")
    return LoraWeights(tensors, info.source.get("model"))


def _drop_row_dim(array: np.ndarray) -> np.ndarray:
    """A per-row tensor of a one-row ``.onnx_adapter`` is ``[1, ...]``."""
    return array[0] if array.ndim == 3 and array.shape[0] == 1 else array


def _check_genai_params(params: Mapping[str, np.ndarray], info: FolderInfo, where: Path) -> None:
    if info.lora is None:
        return  # a foreign genai folder: onnxruntime-genai checks the names itself
    tensors = {}
    for site in info.lora.sites:
        if site.A in params and site.B in params:
            tensors[site.module] = (params[site.A], params[site.B])
    check_weights(LoraWeights(tensors), info.lora.sites, where)


def _export(params: Mapping[str, np.ndarray], info: FolderInfo, out: Path) -> Path:
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    if info.lora is not None:
        adapter.set_model_version(info.lora.onnx_adapter_model_version)
    adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    adapter.export_adapter(str(out))
    return out
