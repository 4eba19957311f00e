"""Text generation with a trained adapter: onnxruntime-genai (multi-LoRA) or plain ONNX Runtime.

``load_generator(folder, adapter)`` loads a generation folder made by
``zoo_ort.exporters.genai`` (``build_genai_model`` or ``merge_adapter``); ``generate`` streams
text. onnxruntime-genai is imported only when a genai folder is loaded, so this package imports
with the runtime's own dependencies (numpy, onnxruntime, tokenizers).
"""

from zoo_ort.generate.adapters import LoraWeights, convert_adapter, read_adapter
from zoo_ort.generate.engines import GENAI_MISSING, Sampling, import_genai, pick_token
from zoo_ort.generate.folder import (
    INFO_FILE,
    FolderInfo,
    LoraInput,
    LoraInputs,
    read_info,
    resolve_folder,
    write_info,
)
from zoo_ort.generate.generator import (
    DEFAULT_ADAPTER,
    GenerationConfig,
    TextGenerator,
    generate,
    load_generator,
)

__all__ = [
    "DEFAULT_ADAPTER",
    "GENAI_MISSING",
    "INFO_FILE",
    "FolderInfo",
    "GenerationConfig",
    "LoraInput",
    "LoraInputs",
    "LoraWeights",
    "Sampling",
    "TextGenerator",
    "convert_adapter",
    "generate",
    "import_genai",
    "load_generator",
    "pick_token",
    "read_adapter",
    "read_info",
    "resolve_folder",
    "write_info",
]
