"""The bundle: the one contract between ``zoo-ort export`` and everything that trains or evaluates.

A bundle is a folder::

    model.onnx               the graph (model.onnx.data beside it when weights are external)
    manifest.json            this module's :class:`Manifest`
    tokenizer.json           loadable by ``tokenizers.Tokenizer.from_file`` alone
    adapter_init.safetensors the initial LoRA tensors by graph input name, without the row dim

A bundle exported with LoRA on a range of layers above the first (``lora_layers``) splits the
model in two: ``trunk.onnx`` (tokens -> the hidden states entering the first LoRA layer, the same
for every LoRA row) and the graph above, the *head* (those hidden states + per-row LoRA -> loss,
candidate_logprobs), which then takes ``hidden_states`` in place of ``input_ids``.
:attr:`Manifest.trunk` describes the trunk; the head is ``graph``/``inputs``/``outputs`` as in a
one-graph bundle. Bundles without the field read as before.

Reading needs the standard library and numpy only; nothing here knows torch or onnxruntime.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zoo_ort.errors import ZooError
from zoo_ort.io import atomic_write_json, load_tensors, read_json

FORMAT = "zoo-ort-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# Symbolic dimension names used in manifest shapes.
ROWS, SEQ, TARGETS, CANDIDATES = "N", "T", "K", "C"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, dtype, shape (ints or symbolic names) and meaning."""

    name: str
    dtype: str  # numpy dtype name: "int64", "float32", ...
    shape: list[int | str]
    meaning: str = ""


@dataclass(frozen=True)
class LoraTensor:
    input: str  # graph input name
    shape: list[int]  # without the row dimension; A is [in, r], B is [r, out] (y += s * x @ A @ B)
    per_row: bool  # True: the graph input is [N, *shape] and the tensor is trained


@dataclass(frozen=True)
class LoraSite:
    module: str  # module path in the Hugging Face model, e.g. "model.layers.0.self_attn.q_proj"
    peft_prefix: str  # PEFT's key prefix, e.g. "base_model.model.model.layers.0.self_attn.q_proj"
    in_features: int
    out_features: int
    A: LoraTensor
    B: LoraTensor


@dataclass(frozen=True)
class LoraSpec:
    mode: str  # "fa" (LoRA-FA: A frozen and shared, B per row) or "full" (A and B per row)
    rank: int
    alpha: float
    target_modules: list[str]
    fan_in_fan_out: bool  # PEFT's flag (True for GPT-2's Conv1D)
    sites: list[LoraSite]
    # [start, stop): the decoder layers carrying LoRA, when export restricted them; None: the
    # target modules in every layer (bundles from before the option read as None).
    layers: list[int] | None = None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class TrunkSpec:
    """The graph below the LoRA layers: run once per distinct example, shared by all its rows."""

    file: str  # "trunk.onnx"
    external_data: str | None  # "trunk.onnx.data" or None
    layers: list[int]  # [start, stop) of the LoRA layers; the trunk runs layers [0, start)
    inputs: list[TensorSpec]  # input_ids, attention_mask
    outputs: list[TensorSpec]  # hidden_states [N, T, hidden]: the head's input of that name


@dataclass(frozen=True)
class Manifest:
    source: dict[str, Any]  # {"model": hub id or path, "gguf_file": ..., "recipe": ..., ...}
    architecture: dict[str, Any]  # {"model_type", "num_layers", "hidden_size", "vocab_size", ...}
    graph: dict[str, Any]  # {"file", "external_data", "opset", "base_precision", "target"}
    lora: LoraSpec
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    tokenizer: dict[str, Any]  # {"file", "bos_token_id", "eos_token_id", "pad_token_id", ...}
    adapter_init: str = "adapter_init.safetensors"
    static: dict[str, int] | None = None  # {"N": rows, "T": seq len, "K": ..., "C": ...} or None
    defaults: dict[str, Any] = field(default_factory=dict)  # training defaults from the recipe
    trunk: TrunkSpec | None = None  # two-graph bundles only: the graph below the LoRA layers
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    # -- derived views -------------------------------------------------------------------------
    def lora_tensors(self) -> list[LoraTensor]:
        return [t for s in self.lora.sites for t in (s.A, s.B)]

    def trainable(self) -> list[LoraTensor]:
        return [t for t in self.lora_tensors() if t.per_row]

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        order = ["format", "format_version"]
        return {k: d[k] for k in order} | {k: v for k, v in d.items() if k not in order}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a zoo-ort manifest (format={d.get('format')!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"manifest format_version {d.get('format_version')} is not supported "
                f"(this zoo-ort reads {FORMAT_VERSION}); re-export the bundle"
            )
        lo = d["lora"]
        sites = [
            LoraSite(
                module=s["module"],
                peft_prefix=s["peft_prefix"],
                in_features=int(s["in_features"]),
                out_features=int(s["out_features"]),
                A=LoraTensor(**s["A"]),
                B=LoraTensor(**s["B"]),
            )
            for s in lo["sites"]
        ]
        lora = LoraSpec(
            mode=lo["mode"],
            rank=int(lo["rank"]),
            alpha=float(lo["alpha"]),
            target_modules=list(lo["target_modules"]),
            fan_in_fan_out=bool(lo["fan_in_fan_out"]),
            sites=sites,
            layers=[int(i) for i in lo["layers"]] if lo.get("layers") is not None else None,
        )
        trunk = d.get("trunk")
        return cls(
            source=dict(d["source"]),
            architecture=dict(d["architecture"]),
            graph=dict(d["graph"]),
            lora=lora,
            inputs=[TensorSpec(**t) for t in d["inputs"]],
            outputs=[TensorSpec(**t) for t in d["outputs"]],
            tokenizer=dict(d["tokenizer"]),
            adapter_init=d.get("adapter_init", "adapter_init.safetensors"),
            static=d.get("static"),
            defaults=dict(d.get("defaults", {})),
            trunk=None if trunk is None else _trunk_spec(trunk),
        )


def _trunk_spec(d: dict[str, Any]) -> TrunkSpec:
    return TrunkSpec(
        file=d["file"],
        external_data=d.get("external_data"),
        layers=[int(i) for i in d["layers"]],
        inputs=[TensorSpec(**t) for t in d["inputs"]],
        outputs=[TensorSpec(**t) for t in d["outputs"]],
    )


# The fixed (non-LoRA) graph inputs and outputs, in order. Exporters must produce exactly these.
TOKEN_INPUTS = [
    TensorSpec("input_ids", "int64", [ROWS, SEQ], "token ids; padding anywhere, masked out"),
    TensorSpec("attention_mask", "int64", [ROWS, SEQ], "1 for real tokens, 0 for padding"),
    TensorSpec("target_pos", "int64", [ROWS, TARGETS], "positions whose next token is scored"),
    TensorSpec("target_ids", "int64", [ROWS, TARGETS], "expected next token at each target_pos"),
    TensorSpec("target_mask", "float32", [ROWS, TARGETS], "1.0 for real target slots, 0.0 else"),
    TensorSpec("candidate_ids", "int64", [ROWS, CANDIDATES], "tokens scored at every target slot"),
]
OUTPUTS = [
    TensorSpec(
        "loss", "float32", [ROWS], "per-row mean NLL of target_ids over slots with target_mask=1"
    ),
    TensorSpec(
        "candidate_logprobs",
        "float32",
        [ROWS, TARGETS, CANDIDATES],
        "log-softmax over the vocabulary at each target slot, gathered at candidate_ids",
    ),
]


# Two-graph bundles: the trunk's output and the head's first input.
HIDDEN = "hidden_states"
TRUNK_INPUTS = [s for s in TOKEN_INPUTS if s.name in ("input_ids", "attention_mask")]


def hidden_spec(hidden_size: int) -> TensorSpec:
    return TensorSpec(
        HIDDEN,
        "float32",
        [ROWS, SEQ, int(hidden_size)],
        "hidden states entering the first LoRA layer (the trunk's output, the head's input)",
    )


def head_inputs(hidden_size: int) -> list[TensorSpec]:
    """The head's fixed inputs: the trunk's hidden states instead of the token ids."""
    return [hidden_spec(hidden_size), *(s for s in TOKEN_INPUTS if s.name != "input_ids")]


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.graph["file"]

    @property
    def trunk_path(self) -> Path | None:
        trunk = self.manifest.trunk
        return None if trunk is None else self.path / trunk.file

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest.tokenizer["file"]

    def initial_lora(self) -> dict[str, np.ndarray]:
        """The initial LoRA tensors by graph input name, checked against the manifest."""
        tensors = load_tensors(self.path / self.manifest.adapter_init)
        check_lora_tensors(
            self.manifest, tensors, where=str(self.path / self.manifest.adapter_init)
        )
        return tensors


def check_lora_tensors(manifest: Manifest, tensors: dict[str, np.ndarray], where: str) -> None:
    """Raise ZooError unless ``tensors`` holds exactly the manifest's LoRA tensors and shapes."""
    want = {t.input: tuple(t.shape) for t in manifest.lora_tensors()}
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        raise ZooError(
            f"{where}: LoRA tensors do not match the bundle "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})"
        )
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise ZooError(
                f"{where}: {name} has shape {list(tensors[name].shape)}, "
                f"the bundle expects {list(shape)}"
            )


def write_manifest(path: str | Path, manifest: Manifest) -> None:
    atomic_write_json(Path(path) / MANIFEST, manifest.to_dict())


def load_bundle(path: str | Path) -> Bundle:
    """Read and validate a bundle folder; any problem is a one-line ZooError."""
    path = Path(path)
    if not path.is_dir():
        raise ZooError(f"{path}: no such bundle folder (make one with `zoo-ort export`)")
    if not (path / MANIFEST).is_file():
        raise ZooError(f"{path}: no {MANIFEST}; not a zoo-ort bundle")
    raw = read_json(path / MANIFEST)
    try:
        manifest = Manifest.from_dict(raw)
    except (KeyError, TypeError, ValueError) as e:
        detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise ZooError(f"{path / MANIFEST}: malformed manifest ({detail})") from None
    files = [manifest.graph["file"], manifest.tokenizer["file"], manifest.adapter_init]
    if manifest.trunk is not None:
        files.append(manifest.trunk.file)
    for rel in files:
        if not (path / rel).is_file():
            raise ZooError(f"{path}: the manifest names {rel}, which is missing")
    return Bundle(path=path, manifest=manifest)
