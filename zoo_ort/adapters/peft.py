"""Trained LoRA tensors as a PEFT adapter folder (the interchange format), and back.

zoo-ort's orientation is ``A [in, r]``, ``B [r, out]`` (``y += (alpha/r) * x @ A @ B``); PEFT
stores ``lora_A.weight [r, in] = A^T`` and ``lora_B.weight [out, r] = B^T`` with the same
``alpha/r`` scaling, so a folder written here loads with ``peft.PeftModel.from_pretrained`` onto
the original Hugging Face model and gives the bundle's outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from zoo_ort.bundle import FORMAT_VERSION, Manifest, check_lora_tensors
from zoo_ort.errors import ZooError
from zoo_ort.io import atomic_write_json, load_tensors, read_json, save_tensors

log = logging.getLogger(__name__)

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
# zoo-ort's own metadata sits beside PEFT's files, so adapter_config.json stays exactly what peft
# expects (peft warns about keys it does not know).
ZOO_META = "zoo_ort_adapter.json"
ADAPTER_FORMAT = "zoo-ort-adapter"


def bundle_fingerprint(manifest: Manifest) -> str:
    """A short hash of what an adapter must agree with: base model, LoRA layout and shapes."""
    lo = manifest.lora
    key = {
        "model": manifest.source.get("model"),
        "mode": lo.mode,
        "rank": lo.rank,
        "sites": [(s.module, s.in_features, s.out_features) for s in lo.sites],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def all_tensors(
    manifest: Manifest, params: Mapping[str, np.ndarray], frozen: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    tensors = {**dict(frozen), **dict(params)}
    check_lora_tensors(manifest, tensors, where="adapter to save")
    return {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}


def _peft_keys(prefix: str) -> tuple[str, str]:
    return f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"


def save_peft_adapter(
    out_dir: str | Path,
    manifest: Manifest,
    params: Mapping[str, np.ndarray],
    frozen: Mapping[str, np.ndarray],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` into ``out_dir``.

    ``params`` are the trained tensors and ``frozen`` the shared ones (LoRA-FA's A), both keyed
    by graph input name without the row dimension. ``extra`` is merged into the config's
    ``zoo_ort`` block (e.g. the run's step). Both files are written atomically.
    """
    out = Path(out_dir)
    tensors = all_tensors(manifest, params, frozen)
    weights = {}
    for site in manifest.lora.sites:
        a_key, b_key = _peft_keys(site.peft_prefix)
        weights[a_key] = np.ascontiguousarray(tensors[site.A.input].T)
        weights[b_key] = np.ascontiguousarray(tensors[site.B.input].T)
    lo = manifest.lora
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_source(manifest),
        "r": lo.rank,
        "lora_alpha": lo.alpha,
        "target_modules": list(lo.target_modules),
        "fan_in_fan_out": lo.fan_in_fan_out,
        "bias": "none",
        "lora_dropout": 0.0,
        "inference_mode": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }
    if lo.layers is not None:  # LoRA on a layer range (a trunk + head bundle): peft wraps only it
        config["layers_to_transform"] = list(range(lo.layers[0], lo.layers[1]))
    meta = {
        "format": ADAPTER_FORMAT,
        "format_version": 1,
        "bundle_fingerprint": bundle_fingerprint(manifest),
        "bundle_format_version": FORMAT_VERSION,
        "source": dict(manifest.source),
        "mode": lo.mode,
        "sites": [s.module for s in lo.sites],
        **dict(extra or {}),
    }
    save_tensors(
        out / PEFT_WEIGHTS,
        weights,
        metadata={"format": "pt", "zoo_ort_bundle": bundle_fingerprint(manifest)},
    )
    atomic_write_json(out / PEFT_CONFIG, config)
    atomic_write_json(out / ZOO_META, meta)
    return out


def base_model_source(manifest: Manifest) -> str | None:
    """The base model as ``from_pretrained`` takes it: hub id, else the local folder or file."""
    source = manifest.source
    return source.get("hub_id") or source.get("location") or source.get("model")


def _different(folder: Path, detail: str) -> ZooError:
    return ZooError(f"adapter {folder} was made for a different bundle: {detail}")


def load_peft_adapter(folder: str | Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """The LoRA tensors of a PEFT adapter folder, by graph input name, in zoo-ort's orientation.

    The adapter must cover exactly this bundle's sites with its rank; a different ``lora_alpha``
    (or rsLoRA scaling) is folded into B so the bundle's ``alpha/r`` reproduces it.
    """
    folder = Path(folder)
    if not (folder / PEFT_CONFIG).is_file():
        raise ZooError(f"{folder}: no {PEFT_CONFIG}; not a PEFT adapter folder")
    if not (folder / PEFT_WEIGHTS).is_file():
        raise ZooError(
            f"{folder}: no {PEFT_WEIGHTS} (zoo-ort reads safetensors only, never pickle)"
        )
    config = read_json(folder / PEFT_CONFIG)
    lo = manifest.lora
    if config.get("peft_type") != "LORA":
        raise ZooError(
            f"{folder}: peft_type is {config.get('peft_type')!r}, only LORA is supported"
        )
    if config.get("use_dora"):
        raise ZooError(f"{folder}: DoRA adapters are not supported")
    rank = config.get("r")
    if rank != lo.rank:
        raise _different(folder, f"rank {rank}, the bundle's LoRA rank is {lo.rank}")
    alpha = float(config.get("lora_alpha", rank))
    file_scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    b_factor = file_scale / lo.scale
    base, ours = config.get("base_model_name_or_path"), base_model_source(manifest)
    if base and ours and base != ours:
        log.warning("adapter %s names base model %s, the bundle %s", folder, base, ours)

    raw = load_tensors(folder / PEFT_WEIGHTS)
    # PEFT strips the adapter name when saving; tolerate files that kept ".default".
    weights = {k.replace(".default.weight", ".weight"): v for k, v in raw.items()}
    expected = {}
    for site in lo.sites:
        a_key, b_key = _peft_keys(site.peft_prefix)
        expected[a_key] = (rank, site.in_features)
        expected[b_key] = (site.out_features, rank)
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
        if extra:
            parts.append(f"{len(extra)} unexpected, e.g. {extra[0]}")
        raise _different(folder, "; ".join(parts))
    for key, shape in expected.items():
        if tuple(weights[key].shape) != shape:
            raise _different(
                folder, f"{key} has shape {list(weights[key].shape)}, expected {list(shape)}"
            )
    out = {}
    for site in lo.sites:
        a_key, b_key = _peft_keys(site.peft_prefix)
        out[site.A.input] = np.ascontiguousarray(weights[a_key].T, dtype=np.float32)
        b = weights[b_key].T.astype(np.float32)
        out[site.B.input] = np.ascontiguousarray(b * b_factor if b_factor != 1.0 else b)
    return out
