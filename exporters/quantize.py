"""int8 base weights: ONNX Runtime's dynamic quantization of the exported fp32 graph.

Only MatMuls whose weight is an initializer are quantized; the LoRA matmuls take their weights
from graph inputs, which ``quantize_dynamic`` leaves alone, so the adapters stay fp32 and
trainable. (That is also why LoRA inputs must never get default initializers.)
"""

from __future__ import annotations

import logging
from pathlib import Path


def quantize_int8(src: Path, dst: Path) -> None:
    """Write an int8-weight copy of the graph at ``src`` to ``dst`` (weights in ``dst``.data)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer logs a "run pre-processing first" hint at WARNING level for every model;
    # the hint is about shape inference for static quantization and does not apply here.
    quant_log = logging.getLogger("onnxruntime.quantization")
    old_level = quant_log.level
    quant_log.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            src,
            dst,
            op_types_to_quantize=["MatMul"],
            weight_type=QuantType.QInt8,
            per_channel=True,
            use_external_data_format=True,
        )
    finally:
        quant_log.setLevel(old_level)
