"""int8 base weights: weight-only 8-bit quantization of the exported fp32 graph.

Every MatMul whose weight is an initializer becomes ONNX Runtime's ``MatMulNBits`` (8 bits,
symmetric, one scale per block of 32 input rows); activations stay fp32. The LoRA matmuls take
their weights from graph inputs, which the quantizer leaves alone, so the adapters stay fp32 and
trainable (and LoRA inputs must never get default initializers).

Why not ``quantize_dynamic`` (int8 weights *and* dynamically quantized uint8 activations)? On
SmolLM2-135M it wrecks the model, whose activations have large outliers: with a random LoRA on
8 SST-2 prompts the per-row loss moved by up to 1.8 nats (per-tensor weights) or 9.1 nats
(per-channel), and the LoRA's effect on the loss no longer correlated with fp32's (r = 0.49 and
-0.06). Weight-only int8 moved losses by at most 0.09 nats with r = 0.997, for 228 MB instead of
216 MB (the tied embedding stays fp32 for the Gather) versus 520 MB in fp32. The benchmark's
"Quantized bases and the ZO signal" table (``benchmarks/quant_signal.py``) re-measures this on
the projected gradients themselves: correlation with fp32's g is 0.994 for this base and 0.30 for
``quantize_dynamic``.
"""

from __future__ import annotations

import logging
from pathlib import Path

BITS = 8
BLOCK_SIZE = 32


def quantize_int8(src: Path, dst: Path) -> None:
    """Write an int8-weight copy of the graph at ``src`` to ``dst`` (weights in ``dst``.data)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quant_log = logging.getLogger("onnxruntime.quantization")
    level = quant_log.level
    quant_log.setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        model = onnx.load(str(src))
        quantizer = MatMulNBitsQuantizer(model, bits=BITS, block_size=BLOCK_SIZE, is_symmetric=True)
        del model  # the quantizer holds its own reference
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=True)
    finally:
        quant_log.setLevel(level)
