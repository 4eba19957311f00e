"""``export_bundle``: a Hugging Face causal LM (or GGUF) in, a zoo-ort bundle folder out.

All user errors are detected before anything is written; the bundle is assembled in a hidden
folder beside ``out`` and renamed into place at the end, so a failed export leaves nothing.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx
import torch

from zoo_ort.bundle import (
    CANDIDATES,
    NPU_INPUTS,
    OUTPUTS,
    ROWS,
    SEQ,
    TARGETS,
    TOKEN_INPUTS,
    LoraSpec,
    Manifest,
    TensorSpec,
    write_manifest,
)
from zoo_ort.bundle.manifest import TRUNK_INPUTS, TrunkSpec, head_inputs, hidden_spec
from zoo_ort.errors import ZooError
from zoo_ort.io import save_tensors

from .architectures import Architecture, architecture
from .graph import (
    OPSET,
    HeadModel,
    ScoringModel,
    Shapes,
    TrunkModel,
    export_graph,
    forget_last_graph,
    layers_cut,
)
from .lora import (
    MODES,
    decoder_layers,
    find_sites,
    initial_tensors,
    lora_sites,
    sites_in_layers,
    wrap_sites,
)
from .mobile import (
    export_npu_graph,
    finish_target,
    initial_lora_feeds,
    make_npu_scoring,
)
from .quantize import quantize_int8
from .sources import load_config, load_model, load_tokenizer, meta_model, resolve
from .tokenizer import write_tokenizer

GRAPH_FILE = "model.onnx"  # the one graph, or the head of a two-graph bundle
TRUNK_FILE = "trunk.onnx"
ADAPTER_INIT = "adapter_init.safetensors"
TARGETS_KNOWN = ("nnapi", "qnn", "coreml")
QUANTIZE_KNOWN = ("int8",)
DEFAULT_RANK = 8
DEFAULT_MODE = "fa"
# The NPU graph (mobile.py) builds plain causal masks: no sliding windows, ALiBi token masks or
# logit soft-capping, so only these families are exported for it.
NPU_FAMILIES = ("llama", "qwen2", "gpt2", "opt")
DEFAULT_CANDIDATES = 2  # static graphs: two label words (binary classification)

Progress = Callable[[str], None]


def export_bundle(
    model: str,
    out: str | Path,
    *,
    rank: int | None = None,
    alpha: float | None = None,
    target_modules: list[str] | None = None,
    mode: str | None = None,
    rows: int | None = None,
    seq_len: int | None = None,
    quantize: str | None = None,
    target: str | None = None,
    overwrite: bool = False,
    seed: int = 0,
    progress: Progress | None = None,
    targets: int | None = None,
    candidates: int | None = None,
    lora_layers: tuple[int, int] | None = None,
    split: bool = True,
) -> Path:
    """Export ``model`` (recipe name, hub id, model folder or .gguf file) as a bundle at ``out``.

    ``rank`` defaults to the recipe's (else 8), ``alpha`` to the recipe's (else ``2 * rank``),
    ``target_modules`` to the recipe's (else the architecture's), ``mode`` and ``lora_layers`` to
    the recipe's ``mode`` and ``layers`` (else "fa" and every layer). ``mode`` is "fa" (LoRA-FA: A
    shared and frozen, B per row) or "full" (A and B per row). ``rows`` and ``seq_len`` together
    fix N and T (static shapes, for NPUs); then the number of target slots K defaults to T
    (``targets``) and the number of candidates C to the recipe's ``[static] candidates`` (else 2).
    ``quantize="int8"`` stores the base weights as int8, weight-only (LoRA stays fp32).
    ``target`` (an NPU family) is recorded in the manifest.
    ``lora_layers=(start, stop)`` puts LoRA on the target modules of decoder layers
    ``[start, stop)`` only; the layers below then do not depend on the adapter, and with ``split``
    (the default) the bundle carries two graphs: ``trunk.onnx`` (tokens -> hidden states entering
    layer ``start``) and the head (``model.onnx``: those hidden states + LoRA -> the outputs),
    which the engine runs once per distinct example and once per row respectively.
    ``split=False`` keeps one graph with the same LoRA sites. Returns ``out``.
    """
    say = progress or (lambda _message: None)
    out = Path(out).expanduser()
    _check_options(rank, rows, seq_len, quantize, target, targets, candidates)
    _check_out(out, overwrite)

    source = resolve(model)  # cheap (no weights read): the recipe's LoRA choices are checked next
    recipe = source.recipe
    lora_recipe = recipe.get("lora", {})
    rank, alpha, mode, layers = _lora_choices(
        lora_recipe, rank, alpha, mode, lora_layers, split, rows, target
    )
    config = load_config(source)
    arch = architecture(config.model_type)
    if target is not None and arch.model_type not in NPU_FAMILIES:
        raise ZooError(
            f"static NPU graphs are verified for {', '.join(NPU_FAMILIES)} only; "
            f"{arch.model_type} needs masks or soft-capping the NPU graph does not build yet"
        )
    chosen = list(target_modules or lora_recipe.get("target_modules") or arch.default_targets)
    skeleton = meta_model(config)
    sites = find_sites(skeleton, chosen)
    stack = None
    if layers is not None:
        num_layers = int(config.num_hidden_layers)
        stack = decoder_layers(skeleton, num_layers)
        sites = sites_in_layers(sites, stack, layers, num_layers)
    del skeleton
    two_graphs = layers is not None and split
    shapes = _shapes(config, recipe, rows, seq_len, targets, candidates)
    tokenizer = load_tokenizer(source)

    say(f"loading {model} ({config.model_type})")
    hf_model = load_model(source)
    arch_info = _architecture_info(config, hf_model)
    with _staging(out) as stage:
        say("writing tokenizer.json")
        tokenizer_info = write_tokenizer(tokenizer, config, stage)
        init = initial_tensors(sites, rank, seed)
        specs = lora_sites(sites, rank, mode)
        what = "the graph" if not two_graphs else f"the trunk and the head (layers {layers[0]}+)"
        say(f"exporting {what} ({len(sites)} LoRA sites, mode {mode}, rank {rank})")
        fp32_dir = stage / "fp32" if quantize else stage
        fp32_dir.mkdir(exist_ok=True)
        # The two graphs meet at the lowest LoRA layer: (the layer stack's path, its index).
        split_at = (stack, layers[0]) if two_graphs and stack and layers else None
        _export(
            hf_model,
            arch,
            sites,
            specs,
            init,
            rank,
            alpha,
            shapes,
            config,
            fp32_dir,
            split_at,
            target,
        )
        _release_weights(hf_model)
        del hf_model
        graphs = [GRAPH_FILE, TRUNK_FILE] if two_graphs else [GRAPH_FILE]
        if quantize == "int8":
            say("quantizing base weights to int8")
            for file in graphs:
                quantize_int8(fp32_dir / file, stage / file)
            shutil.rmtree(fp32_dir)
        graph_info = _graph_info(stage, quantize, target)
        if target is not None:  # NPU graph: host-built inputs, and model.ort for NNAPI
            lora_feeds = initial_lora_feeds(specs, init, shapes.rows)
            vocab = int(config.vocab_size)
            graph_info |= finish_target(stage, GRAPH_FILE, target, vocab, shapes, lora_feeds)
        save_tensors(stage / ADAPTER_INIT, init, metadata={"seed": str(seed), "mode": mode})
        manifest = Manifest(
            source=source.describe(),
            architecture=arch_info,
            graph=graph_info,
            lora=LoraSpec(
                mode=mode,
                rank=rank,
                alpha=float(alpha),
                target_modules=chosen,
                fan_in_fan_out=arch.fan_in_fan_out,
                sites=specs,
                layers=None if layers is None else list(layers),
            ),
            inputs=_input_specs(
                specs, shapes, target, int(config.hidden_size) if two_graphs else None
            ),
            outputs=[_static_spec(s, shapes) for s in OUTPUTS],
            tokenizer=tokenizer_info,
            adapter_init=ADAPTER_INIT,
            static=None if shapes.dynamic else _static_dims(shapes),
            defaults=dict(recipe.get("train", {})),  # zoo_ort.settings owns the rest
            trunk=_trunk_spec(stage, layers, int(config.hidden_size)) if two_graphs else None,
        )
        _check_graph_io(stage / GRAPH_FILE, manifest.inputs, manifest.outputs)
        if manifest.trunk is not None:
            _check_graph_io(stage / TRUNK_FILE, manifest.trunk.inputs, manifest.trunk.outputs)
        write_manifest(stage, manifest)
    say(f"bundle written to {out}")
    return out


# -- validation -------------------------------------------------------------------------------


def _check_options(
    rank: int | None,
    rows: int | None,
    seq_len: int | None,
    quantize: str | None,
    target: str | None,
    targets: int | None,
    candidates: int | None,
) -> None:
    if rank is not None and rank <= 0:
        raise ZooError(f"LoRA rank must be a positive integer, got {rank}")
    if (rows is None) != (seq_len is None):
        raise ZooError("static shapes need both rows and seq_len (or neither, for dynamic shapes)")
    for name, value in (("rows", rows), ("seq_len", seq_len), ("targets", targets)):
        if value is not None and value <= 0:
            raise ZooError(f"{name} must be a positive integer, got {value}")
    if candidates is not None and candidates <= 0:
        raise ZooError(f"candidates must be a positive integer, got {candidates}")
    if (targets is not None or candidates is not None) and rows is None:
        raise ZooError(
            "targets and candidates fix K and C of a static graph; give rows and seq_len"
        )
    if quantize not in (None, *QUANTIZE_KNOWN):
        raise ZooError(f"unknown quantization {quantize!r}; choose one of: {QUANTIZE_KNOWN}")
    if target not in (None, *TARGETS_KNOWN):
        raise ZooError(f"unknown target {target!r}; choose one of: {', '.join(TARGETS_KNOWN)}")
    if target is not None and rows is None:
        raise ZooError(f"target {target} needs static shapes; give rows and seq_len")
    if target is not None and quantize is not None:
        raise ZooError(f"target {target} sets its own precision; drop quantize={quantize!r}")


def _lora_choices(
    lora_recipe: dict[str, Any],
    rank: int | None,
    alpha: float | None,
    mode: str | None,
    lora_layers: tuple[int, int] | None,
    split: bool,
    rows: int | None,
    target: str | None,
) -> tuple[int, float, str, tuple[int, int] | None]:
    """rank, alpha, mode and layer range: each as given, else the recipe's, else zoo-ort's."""
    rank = rank if rank is not None else int(lora_recipe.get("rank", DEFAULT_RANK))
    if alpha is None:
        alpha = float(lora_recipe["alpha"]) if "alpha" in lora_recipe else 2.0 * rank
    mode = mode if mode is not None else str(lora_recipe.get("mode", DEFAULT_MODE))
    if mode not in MODES:
        raise ZooError(f"unknown LoRA mode {mode!r}; choose one of: {', '.join(MODES)}")
    if lora_layers is None:
        lora_layers = lora_recipe.get("layers")
    return rank, alpha, mode, _check_layers(lora_layers, split, rows, target)


def _check_layers(
    lora_layers: tuple[int, int] | None, split: bool, rows: int | None, target: str | None
) -> tuple[int, int] | None:
    """What can be said of ``lora_layers`` before the model is read (the range against the
    model's depth is checked once its config is known)."""
    if lora_layers is None:
        return None
    try:
        start, stop = (int(i) for i in lora_layers)
    except (TypeError, ValueError):
        raise ZooError(
            f"lora_layers must be two layer indices (start, stop), got {lora_layers!r}"
        ) from None
    if not 0 <= start < stop:
        raise ZooError(f"lora_layers {start}:{stop} is not a range of layers (0 <= start < stop)")
    if split and start == 0:
        raise ZooError(
            f"lora_layers {start}:{stop} starts at layer 0: no layer lies below the LoRA to form "
            "a trunk; start higher, or export one graph (split=False)"
        )
    if split and (rows is not None or target is not None):
        raise ZooError(
            f"lora_layers {start}:{stop} make a trunk + head bundle, which has dynamic shapes "
            "only; drop rows/seq_len/target, or keep one graph (split=False, --one-graph)"
        )
    return start, stop


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ZooError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ZooError(
            f"{out} exists and is not empty; pass --overwrite (overwrite=True) to replace it"
        )
    if out.is_dir() and out.resolve() == Path.cwd().resolve():
        raise ZooError(f"{out} is the current folder; export into a new folder")


def _shapes(
    config: Any,
    recipe: dict[str, Any],
    rows: int | None,
    seq_len: int | None,
    targets: int | None,
    candidates: int | None,
) -> Shapes:
    if rows is None or seq_len is None:
        return Shapes(rows=2, seq_len=9, targets=3, candidates=4, dynamic=True)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and seq_len > limit:
        raise ZooError(f"seq_len {seq_len} exceeds the model's maximum of {limit} positions")
    if targets is not None and targets > seq_len:
        raise ZooError(f"targets ({targets}) cannot exceed seq_len ({seq_len})")
    default_c = int(recipe.get("static", {}).get("candidates", DEFAULT_CANDIDATES))
    return Shapes(
        rows=rows,
        seq_len=seq_len,
        targets=targets or seq_len,
        candidates=candidates or default_c,
        dynamic=False,
    )


# -- the work ---------------------------------------------------------------------------------


def _export(
    hf_model: torch.nn.Module,
    arch: Architecture,
    sites: list,
    specs: list,
    init: dict,
    rank: int,
    alpha: float,
    shapes: Shapes,
    config: Any,
    folder: Path,
    split_at: tuple[str, int] | None,
    target: str | None = None,
) -> None:
    """Export the graph(s) into ``folder``: one, or with ``split_at`` (the layer stack's path and
    the lowest LoRA layer) the trunk below that layer and the head from it up."""
    context = wrap_sites(hf_model, sites, alpha / rank)
    if target is not None:
        scoring = make_npu_scoring(hf_model, arch, context, shapes.seq_len).eval()
    else:
        scoring = ScoringModel(hf_model, arch, context).eval()
    generator = torch.Generator().manual_seed(0)
    example, names, per_row = [], [], []
    for spec in specs:
        for tensor in (spec.A, spec.B):
            base = torch.from_numpy(init[tensor.input])
            if tensor is spec.B:  # nonzero, so no part of the LoRA path looks constant
                base = 0.01 * torch.randn(base.shape, generator=generator)
            example.append(base.expand(shapes.rows, *base.shape) if tensor.per_row else base)
            names.append(tensor.input)
            per_row.append(tensor.per_row)
    # The exporter warns about things that are fine here (Dim names shared by several inputs,
    # missing torchvision).
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if target is not None:
                export_npu_graph(
                    scoring, example, names, shapes, config.vocab_size, folder / GRAPH_FILE
                )
                return
            if split_at is None:
                export_graph(
                    scoring, example, names, per_row, shapes, config.vocab_size, folder / GRAPH_FILE
                )
                return
            stack, start = split_at
            hidden = int(config.hidden_size)
            trunk = TrunkModel(scoring, hf_model.get_submodule(f"{stack}.{start - 1}")).eval()
            with layers_cut(hf_model, stack, start):
                export_graph(
                    trunk,
                    [],
                    [],
                    [],
                    shapes,
                    config.vocab_size,
                    folder / TRUNK_FILE,
                    inputs=TRUNK_INPUTS,
                    outputs=[hidden_spec(hidden)],
                )
            head = HeadModel(scoring, hf_model.get_submodule(f"{stack}.{start}")).eval()
            export_graph(
                head,
                example,
                names,
                per_row,
                shapes,
                config.vocab_size,
                folder / GRAPH_FILE,
                inputs=head_inputs(hidden),
                hidden_size=hidden,
            )
        finally:
            registration.setLevel(level)


def _release_weights(model: torch.nn.Module) -> None:
    """Free the torch weights now that the graph is on disk (before int8 quantization loads it).

    Dropping our reference is not enough while onnxscript's rewriter still holds the exported
    graph (see ``forget_last_graph``); emptying the parameters frees what it cannot reach.
    """
    forget_last_graph()
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = torch.empty(0, dtype=tensor.dtype)
    gc.collect()


def _architecture_info(config: Any, hf_model: torch.nn.Module) -> dict[str, Any]:
    return {
        "model_type": config.model_type,
        "num_layers": int(config.num_hidden_layers),
        "hidden_size": int(config.hidden_size),
        "vocab_size": int(config.vocab_size),
        "num_parameters": sum(p.numel() for p in hf_model.parameters()),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
    }


def _graph_info(stage: Path, quantize: str | None, target: str | None) -> dict[str, Any]:
    header = onnx.load(str(stage / GRAPH_FILE), load_external_data=False)
    opset = next((o.version for o in header.opset_import if o.domain in ("", "ai.onnx")), OPSET)
    data = stage / f"{GRAPH_FILE}.data"
    return {
        "file": GRAPH_FILE,
        "external_data": data.name if data.is_file() else None,
        "opset": int(opset),
        "base_precision": "int8" if quantize == "int8" else "fp32",
        "target": target,
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        "attn_implementation": "eager",
    }


def _static_spec(spec: TensorSpec, shapes: Shapes) -> TensorSpec:
    if shapes.dynamic:
        return spec
    sizes = {
        ROWS: shapes.rows,
        SEQ: shapes.seq_len,
        TARGETS: shapes.targets,
        CANDIDATES: shapes.candidates,
    }
    shape = [sizes.get(d, d) if isinstance(d, str) else d for d in spec.shape]
    return TensorSpec(spec.name, spec.dtype, shape, spec.meaning)


def _static_dims(shapes: Shapes) -> dict[str, int]:
    return {
        ROWS: shapes.rows,
        SEQ: shapes.seq_len,
        TARGETS: shapes.targets,
        CANDIDATES: shapes.candidates,
    }


def _input_specs(
    specs: list, shapes: Shapes, target: str | None = None, hidden: int | None = None
) -> list[TensorSpec]:
    if hidden is not None:  # the head of a two-graph bundle
        inputs = head_inputs(hidden)
    else:
        inputs = list(NPU_INPUTS if target is not None else TOKEN_INPUTS)
    for site in specs:
        for which, tensor in (("A", site.A), ("B", site.B)):
            shape: list[int | str] = [ROWS, *tensor.shape] if tensor.per_row else list(tensor.shape)
            role = "per row, trained" if tensor.per_row else "shared, frozen"
            meaning = f"LoRA {which} of {site.module} ({role})"
            inputs.append(TensorSpec(tensor.input, "float32", shape, meaning))
    return [_static_spec(s, shapes) for s in inputs]


def _trunk_spec(stage: Path, layers: tuple[int, int] | None, hidden: int) -> TrunkSpec:
    assert layers is not None
    data = stage / f"{TRUNK_FILE}.data"
    return TrunkSpec(
        file=TRUNK_FILE,
        external_data=data.name if data.is_file() else None,
        layers=list(layers),
        inputs=list(TRUNK_INPUTS),
        outputs=[hidden_spec(hidden)],
    )


def _check_graph_io(path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    """The graph's inputs and outputs must be exactly the manifest's, in order (a bug otherwise)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    got = [i.name for i in graph.input], [o.name for o in graph.output]
    want = [s.name for s in inputs], [s.name for s in outputs]
    if got != want:
        raise RuntimeError(f"exported graph I/O {got} differs from the manifest's {want}")


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A hidden folder beside ``out`` that replaces ``out`` on success and vanishes on failure."""
    created = []  # parent folders this export creates, removed again if it fails
    parent = out.absolute().parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    for folder in reversed(created):
        folder.mkdir()
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.absolute().parent))
    stage.chmod(0o755)  # mkdtemp makes it private; the bundle is an ordinary folder
    try:
        yield stage
        old = None
        if out.exists():  # an empty folder, or overwrite=True: swap it out, then delete it
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=stage.parent))
            os.replace(out, old / out.name)
        for file in stage.iterdir():  # some writers create private (0600) files
            file.chmod(0o644)
        os.replace(stage, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
