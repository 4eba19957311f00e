"""Generation folders from a bundle: onnxruntime-genai with LoRA inputs, and merged models.

``build_genai_model(bundle, out)`` runs onnxruntime-genai's model builder
(``python -m onnxruntime_genai.models.builder``, fp32 CPU) on the bundle's source model with a
placeholder PEFT adapter on the bundle's LoRA sites, then turns each LoRA weight the builder baked
in (``...lora_A.MatMul.weight`` ``[in, r]``, ``...lora_B.MatMul.weight`` ``[r, out]``, B already
scaled) into a graph input whose default initializer is empty (rank 0). With no adapter active the
folder is the base model; ``onnxruntime_genai.Adapters`` feeds an adapter's tensors as those
inputs, so an app switches adapters without reloading (``zoo_ort.generate`` converts zoo-ort's
adapters into that form).

``merge_adapter(bundle, adapter, out)`` folds an adapter into the weights
(``W += scale * (A @ B)^T``) and writes ``out/onnx/``, a plain ONNX graph
``input_ids, attention_mask -> logits`` in standard operators for any family zoo-ort exports, and
``out/genai/``, the builder's folder of the merged model, where the builder has a route.

The builder builds Llama and Qwen2 among zoo-ort's families (not GPT-2, OPT and the rest), and
its CPU attention (GroupQueryAttention) needs a head size that is a multiple of 16.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn
from transformers.pytorch_utils import Conv1D

from zoo_ort.adapters import save_peft_adapter
from zoo_ort.bundle import Manifest, load_bundle
from zoo_ort.errors import ZooError
from zoo_ort.generate.adapters import LoraWeights, read_adapter
from zoo_ort.generate.engines import import_genai
from zoo_ort.generate.folder import (
    GENAI_CONFIG,
    ONNX_GRAPH,
    FolderInfo,
    LoraInput,
    LoraInputs,
    write_info,
)
from zoo_ort.io import read_json

from .sources import load_config, load_model, load_tokenizer, quiet_progress_bars, resolve

log = logging.getLogger(__name__)

# model_type -> the Hugging Face class the builder dispatches on (config.architectures[0]).
GENAI_FAMILIES: dict[str, str] = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
HEAD_SIZE_MULTIPLE = 16  # GroupQueryAttention on CPU: "head_size shall be a multiple of 16"
OPSET = 18
_BUILDER_LORA = re.compile(r"\.lora_([AB])\.MatMul\.weight$")
_LAYER_LEAF = re.compile(r"layers\.(\d+)\.(?:.*\.)?([^.]+)$")

Progress = Callable[[str], None]


# -- public -------------------------------------------------------------------------------------


def genai_route(config: Any) -> str | None:
    """Why the builder cannot build ``config``'s model (a short clause), or None if it can."""
    model_type = config.model_type
    if model_type not in GENAI_FAMILIES:
        return (
            f"onnxruntime-genai's model builder has no route for {model_type} (of zoo-ort's "
            f"families it builds {', '.join(GENAI_FAMILIES)})"
        )
    heads = int(config.num_attention_heads)
    head_size = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    if head_size % HEAD_SIZE_MULTIPLE:
        return (
            f"onnxruntime-genai's CPU attention needs a head size that is a multiple of "
            f"{HEAD_SIZE_MULTIPLE}; this model's is {head_size}"
        )
    return None


def build_genai_model(
    bundle: str | Path,
    out: str | Path,
    *,
    source: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """An onnxruntime-genai folder of the bundle's base model with LoRA inputs at its sites.

    ``source`` replaces the model the bundle names (when it has moved). Returns ``out``.
    """
    say = progress or (lambda _message: None)
    loaded = load_bundle(bundle)
    manifest = loaded.manifest
    out = _check_out(Path(out).expanduser(), overwrite)
    import_genai()
    src = resolve(source or str(manifest.source.get("model")))
    config = load_config(src)
    reason = genai_route(config)
    if reason is not None:
        raise ZooError(f"{reason}; `zoo-ort merge` writes a plain ONNX model that generate runs")
    with tempfile.TemporaryDirectory(prefix="zoo-ort-genai-") as tmp:
        work = Path(tmp)
        say(f"writing {src.requested} as a Hugging Face folder")
        _write_hf_folder(load_model(src), load_tokenizer(src), work / "hf")
        init = loaded.initial_lora()
        trained = {t.input for t in manifest.trainable()}
        save_peft_adapter(
            work / "lora",
            manifest,
            {k: v for k, v in init.items() if k in trained},
            {k: v for k, v in init.items() if k not in trained},
        )
        say("running onnxruntime-genai's model builder")
        _run_builder(work / "hf", work / "built", work / "cache", adapter=work / "lora")
        with _staging(out) as stage:
            say("turning the LoRA weights into graph inputs")
            sites = _lora_to_inputs(work / "built", stage, manifest)
            _copy_side_files(work / "built", stage)
            write_info(stage, _genai_info(stage, manifest, _lora_spec(manifest, sites)))
    say(f"genai folder written to {out}")
    return out


def merge_adapter(
    bundle: str | Path,
    adapter: str | Path,
    out: str | Path,
    *,
    source: str | None = None,
    genai: bool | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Fold ``adapter`` (PEFT folder or ``.onnx_adapter``) into the bundle's source model.

    Writes ``out/onnx/`` (plain ONNX, every family) and, when ``genai`` is True, or None and the
    builder has a route and onnxruntime-genai is installed, ``out/genai/``. Returns ``out``.
    """
    say = progress or (lambda _message: None)
    manifest = load_bundle(bundle).manifest
    out = _check_out(Path(out).expanduser(), overwrite)
    weights = read_adapter(adapter, _bundle_info(manifest))
    src = resolve(source or str(manifest.source.get("model")))
    config = load_config(src)
    with_genai = _want_genai(config, genai, say)
    model, tokenizer = load_model(src), load_tokenizer(src)
    say(f"folding {adapter} into {len(weights.tensors)} modules")
    fold_lora(model, weights)
    record = {"adapter": str(adapter), "modules": sorted(weights.tensors)}
    with _staging(out) as stage, tempfile.TemporaryDirectory(prefix="zoo-ort-merge-") as tmp:
        say("exporting the plain ONNX graph")
        _write_onnx_folder(model, tokenizer, stage / "onnx", manifest, record)
        if with_genai:
            say("running onnxruntime-genai's model builder on the merged model")
            _write_hf_folder(model, tokenizer, Path(tmp) / "hf")
            _run_builder(Path(tmp) / "hf", stage / "genai", Path(tmp) / "cache")
            info = _genai_info(stage / "genai", manifest, None)
            write_info(stage / "genai", _with_record(info, record))
    say(f"merged model written to {out}")
    return out


def fold_lora(model: nn.Module, weights: LoraWeights) -> None:
    """``W += A @ B`` (scale already in B) for each module, in the module's own layout."""
    with torch.no_grad():
        for module_name, (a, b) in weights.tensors.items():
            module = model.get_submodule(module_name)
            delta = torch.from_numpy(np.asarray(a, np.float32) @ np.asarray(b, np.float32))
            weight = module.weight
            # nn.Linear keeps [out, in]; GPT-2's Conv1D keeps [in, out].
            update = delta if isinstance(module, Conv1D) else delta.T
            weight.add_(update.to(dtype=weight.dtype, device=weight.device))


class LogitsModel(nn.Module):
    """``input_ids, attention_mask -> logits`` of a causal LM, without a KV cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).logits.float()


def export_logits_graph(model: nn.Module, path: Path) -> None:
    """Export :class:`LogitsModel` with dynamic batch and sequence, weights beside the graph."""
    rows, seq = torch.export.Dim("N", min=1, max=1 << 16), torch.export.Dim("T", min=2, max=1 << 20)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                LogitsModel(model).eval(),
                (ids, mask),
                str(path),
                input_names=["input_ids", "attention_mask"],
                output_names=["logits"],
                opset_version=OPSET,
                dynamic_shapes=({0: rows, 1: seq}, {0: rows, 1: seq}),
                dynamo=True,
                external_data=True,
                optimize=True,
                verbose=False,
            )
    finally:
        registration.setLevel(level)


# -- the builder --------------------------------------------------------------------------------


def _run_builder(hf_dir: Path, out: Path, cache: Path, adapter: Path | None = None) -> None:
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder"]
    command += ["-i", str(hf_dir), "-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(cache)]
    if adapter is not None:
        command += ["--extra_options", f"adapter_path={adapter}"]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    log.debug("model builder output:\n%s\n%s", result.stdout[-4000:], result.stderr[-4000:])
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise ZooError(
            "onnxruntime-genai's model builder failed: "
            f"{lines[-1] if lines else f'exit code {result.returncode}'}"
        )


def _write_hf_folder(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    # A GGUF is de-quantized to plain fp32 weights on load, but transformers still marks the model
    # "quantized with gguf" and refuses to save it: the mark is dropped, the weights are plain.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
    with quiet_progress_bars():
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def _lora_to_inputs(built: Path, stage: Path, manifest: Manifest) -> list[LoraInput]:
    """Rewrite the builder's graph into ``stage`` with LoRA inputs; one LoraInput per site."""
    graph_model = onnx.load(str(built / ONNX_GRAPH))  # with its external data
    graph = graph_model.graph
    found = {}
    for init in graph.initializer:
        match = _BUILDER_LORA.search(init.name)
        if match:
            found[(_layer_leaf(init.name[: match.start()]), match.group(1))] = init.name
    sites = [_site_inputs(site, found) for site in manifest.lora.sites]
    used = {name for s in sites for name in (s.A, s.B)}
    if set(found.values()) != used:
        extra = sorted(set(found.values()) - used)
        raise RuntimeError(f"the builder made LoRA weights for no bundle site: {extra[:3]}")
    _make_inputs(graph, sites)
    onnx.save(
        graph_model,
        str(stage / ONNX_GRAPH),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{ONNX_GRAPH}.data",
    )
    return sites


def _layer_leaf(name: str) -> tuple[str, str] | None:
    match = _LAYER_LEAF.search(name)
    return (match.group(1), match.group(2)) if match else None


def _site_inputs(site: Any, found: dict) -> LoraInput:
    key = _layer_leaf(site.module)
    a, b = found.get((key, "A")), found.get((key, "B"))
    if key is None or a is None or b is None:
        raise ZooError(
            f"onnxruntime-genai's model builder made no LoRA input for {site.module}; "
            "`zoo-ort merge` folds such an adapter into a plain ONNX model instead"
        )
    return LoraInput(
        module=site.module,
        A=a,
        B=b,
        in_features=site.in_features,
        out_features=site.out_features,
        peft_prefix=site.peft_prefix,
        bundle_A=site.A.input,
        bundle_B=site.B.input,
    )


def _make_inputs(graph: onnx.GraphProto, sites: list[LoraInput]) -> None:
    """Each LoRA weight becomes an input of rank ``lora_rank_i`` defaulting to rank 0."""
    by_name = {init.name: init for init in graph.initializer}
    for index, site in enumerate(sites):
        rank = f"lora_rank_{index}"
        for name, shape, fixed in (
            (site.A, [site.in_features, rank], 0),
            (site.B, [rank, site.out_features], 1),
        ):
            old = by_name[name]
            if len(old.dims) != 2 or old.dims[fixed] != shape[fixed]:
                raise RuntimeError(f"{name} has shape {list(old.dims)}, expected {shape}")
            empty = np.zeros([0 if isinstance(d, str) else d for d in shape], dtype=np.float32)
            graph.initializer.remove(old)
            graph.initializer.append(numpy_helper.from_array(empty, name))
            graph.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape))


def _copy_side_files(built: Path, stage: Path) -> None:
    for path in built.iterdir():
        if path.is_file() and path.name not in (ONNX_GRAPH, f"{ONNX_GRAPH}.data"):
            shutil.copy2(path, stage / path.name)


# -- folder info --------------------------------------------------------------------------------


def _bundle_lora_inputs(manifest: Manifest) -> list[LoraInput]:
    return [
        LoraInput(
            module=s.module,
            A=s.A.input,
            B=s.B.input,
            in_features=s.in_features,
            out_features=s.out_features,
            peft_prefix=s.peft_prefix,
            bundle_A=s.A.input,
            bundle_B=s.B.input,
        )
        for s in manifest.lora.sites
    ]


def _lora_spec(manifest: Manifest, sites: list[LoraInput]) -> LoraInputs:
    from zoo_ort.adapters import onnx_adapter_model_version

    return LoraInputs(manifest.lora.scale, onnx_adapter_model_version(manifest), sites)


def _bundle_info(manifest: Manifest) -> FolderInfo:
    """The bundle's LoRA sites in FolderInfo form, to read adapters written for it."""
    return FolderInfo(
        engine="onnx",
        model_type=str(manifest.architecture.get("model_type")),
        context_length=0,
        eos_token_ids=[],
        source=dict(manifest.source),
        lora=_lora_spec(manifest, _bundle_lora_inputs(manifest)),
    )


def _fingerprint(manifest: Manifest) -> str:
    from zoo_ort.adapters import bundle_fingerprint

    return bundle_fingerprint(manifest)


def _genai_info(folder: Path, manifest: Manifest, lora: LoraInputs | None) -> FolderInfo:
    model = read_json(folder / GENAI_CONFIG)["model"]
    eos = model["eos_token_id"]
    return FolderInfo(
        engine="genai",
        model_type=str(manifest.architecture.get("model_type")),
        context_length=int(model["context_length"]),
        eos_token_ids=[int(i) for i in (eos if isinstance(eos, list) else [eos])],
        source=dict(manifest.source),
        bundle_fingerprint=_fingerprint(manifest),
        lora=lora,
    )


def _with_record(info: FolderInfo, record: dict[str, Any]) -> FolderInfo:
    return dataclasses.replace(info, merged_adapter=record)


def _write_onnx_folder(
    model: nn.Module, tokenizer: Any, folder: Path, manifest: Manifest, record: dict[str, Any]
) -> None:
    export_logits_graph(model, folder / ONNX_GRAPH)
    with quiet_progress_bars():
        tokenizer.save_pretrained(folder)
    config = model.config
    context = getattr(config, "max_position_embeddings", None) or config.n_positions
    info = FolderInfo(
        engine="onnx",
        model_type=str(config.model_type),
        context_length=int(context),
        eos_token_ids=_eos_ids(model, tokenizer),
        source=dict(manifest.source),
        bundle_fingerprint=_fingerprint(manifest),
        merged_adapter=record,
    )
    write_info(folder, info)


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    generation = getattr(model, "generation_config", None)
    for value in (
        getattr(generation, "eos_token_id", None),
        model.config.eos_token_id,
        tokenizer.eos_token_id,
    ):
        if value is not None:
            return [int(i) for i in (value if isinstance(value, list) else [value])]
    return []


def _want_genai(config: Any, genai: bool | None, say: Progress) -> bool:
    if genai is False:
        return False
    reason = genai_route(config)
    if reason is None:
        try:
            import_genai()
        except ZooError as e:
            reason = str(e)
    if reason is not None and genai:
        raise ZooError(reason)
    if reason is not None:
        say(f"no genai folder: {reason}")
    return reason is None


# -- output folders -----------------------------------------------------------------------------


def _check_out(out: Path, overwrite: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise ZooError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ZooError(f"{out} exists and is not empty; pass overwrite to replace it")
    if out.is_dir() and out.resolve() == Path.cwd().resolve():
        raise ZooError(f"{out} is the current folder; write into a new folder")
    return out


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A hidden folder beside ``out`` that replaces ``out`` on success and vanishes on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
    try:
        yield stage
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
