"""Adapter files: PEFT's folder (the interchange format) and ONNX Runtime's ``.onnx_adapter``."""

from zoo_ort.adapters.onnx_adapter import onnx_adapter_model_version, save_onnx_adapter
from zoo_ort.adapters.peft import (
    ADAPTER_FORMAT,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    ZOO_META,
    base_model_source,
    bundle_fingerprint,
    load_peft_adapter,
    save_peft_adapter,
)

__all__ = [
    "ADAPTER_FORMAT",
    "PEFT_CONFIG",
    "PEFT_WEIGHTS",
    "ZOO_META",
    "base_model_source",
    "bundle_fingerprint",
    "load_peft_adapter",
    "onnx_adapter_model_version",
    "save_onnx_adapter",
    "save_peft_adapter",
]
