"""The bundle contract: the manifest (what a bundle folder holds and means) and the NPU host-input
scheme. Export writes it, everything on the device reads it; nothing else is shared between them.
"""

from zoo_ort.bundle.manifest import (
    CANDIDATES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    OUTPUTS,
    ROWS,
    SEQ,
    TARGETS,
    TOKEN_INPUTS,
    Bundle,
    LoraSite,
    LoraSpec,
    LoraTensor,
    Manifest,
    TensorSpec,
    check_lora_tensors,
    load_bundle,
    write_manifest,
)
from zoo_ort.bundle.npu import MASKED, NPU_INPUT_NAMES, NPU_INPUTS, NPU_SCHEME, npu_inputs

__all__ = [
    "CANDIDATES",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "MASKED",
    "NPU_INPUTS",
    "NPU_INPUT_NAMES",
    "NPU_SCHEME",
    "OUTPUTS",
    "ROWS",
    "SEQ",
    "TARGETS",
    "TOKEN_INPUTS",
    "Bundle",
    "LoraSite",
    "LoraSpec",
    "LoraTensor",
    "Manifest",
    "TensorSpec",
    "check_lora_tensors",
    "load_bundle",
    "npu_inputs",
    "write_manifest",
]
