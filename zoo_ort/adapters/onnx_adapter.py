"""Trained LoRA tensors as ONNX Runtime's ``.onnx_adapter`` file for the bundle's graph."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from zoo_ort.adapters.peft import all_tensors, bundle_fingerprint
from zoo_ort.bundle import Manifest
from zoo_ort.io import atomic_write_bytes


def onnx_adapter_model_version(manifest: Manifest) -> int:
    """The ``model_version`` of our ``.onnx_adapter`` files: 28 bits of the bundle fingerprint."""
    return int(bundle_fingerprint(manifest)[:7], 16)


def save_onnx_adapter(
    path: str | Path,
    manifest: Manifest,
    params: Mapping[str, np.ndarray],
    frozen: Mapping[str, np.ndarray],
) -> Path:
    """Write ONNX Runtime's ``.onnx_adapter`` for the bundle's graph, atomically.

    Parameters are keyed by graph input name. Per-row tensors get a leading row dimension of 1,
    so the adapter drives one-row runs (``onnxruntime.LoraAdapter`` + ``RunOptions.
    add_active_adapter`` in the C/C++/C#/Java APIs, or its tensors fed as inputs). The adapter
    version is 1; the model version is :func:`onnx_adapter_model_version`.
    """
    path = Path(path)
    tensors = all_tensors(manifest, params, frozen)
    dtypes = {t.name: t.dtype for t in manifest.inputs}
    arrays = {}
    for t in manifest.lora_tensors():
        array = tensors[t.input].astype(dtypes.get(t.input, "float32"))
        arrays[t.input] = np.ascontiguousarray(array[None] if t.per_row else array)
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(onnx_adapter_model_version(manifest))
    adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        staged = Path(tmp) / "adapter.onnx_adapter"
        adapter.export_adapter(str(staged))
        data = staged.read_bytes()
    atomic_write_bytes(path, data)
    return path
