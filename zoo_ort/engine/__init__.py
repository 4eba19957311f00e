"""Engines: the protocol the trainer talks to, and :class:`OrtEngine` over ONNX Runtime.

``OrtEngine`` is imported on first use, so code that brings its own engine (see
``examples/embed_own_engine.py``) never loads onnxruntime through this package.
"""

from typing import Any

from zoo_ort.engine.protocol import Engine, EngineOutput, LabeledBatch, TokenBatch

__all__ = ["Engine", "EngineOutput", "LabeledBatch", "OrtEngine", "TokenBatch"]


def __getattr__(name: str) -> Any:
    if name == "OrtEngine":
        from zoo_ort.engine.ort import OrtEngine

        return OrtEngine
    raise AttributeError(f"module 'zoo_ort.engine' has no attribute {name!r}")
