"""``zoo-ort genai-export``, ``merge`` and ``generate``: using a trained adapter on the same
engine (onnxruntime-genai, or a plain ONNX model)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from zoo_ort.app.cli import BundleArg, Opt, _Command, app, err, out, third_party_quiet
from zoo_ort.errors import ZooError


def _exporters(what: str) -> Any:
    with third_party_quiet():
        try:
            from zoo_ort.exporters import genai
        except ImportError as e:
            raise ZooError(
                f"{what} needs the export extra ({e.name} is missing): "
                "pip install 'zoo-ort[export]'"
            ) from None
    return genai


def _stage_printer() -> Any:
    started = time.perf_counter()
    return lambda msg: err.print(
        f"[{time.perf_counter() - started:6.1f} s] {escape(msg)}", highlight=False
    )


@app.command(cls=_Command, name="genai-export")
def genai_export(
    bundle: BundleArg,
    out_dir: Annotated[Path, Opt("--out", help="onnxruntime-genai model folder")],
    source: Annotated[str | None, Opt(help="Base model [the bundle's own source]")] = None,
    overwrite: Annotated[bool, Opt("--overwrite", help="Replace a non-empty --out")] = False,
) -> None:
    """Build the onnxruntime-genai model of a bundle's base, with switchable LoRA inputs."""
    genai = _exporters("genai-export")
    with third_party_quiet():
        path = genai.build_genai_model(
            bundle, out_dir, source=source, overwrite=overwrite, progress=_stage_printer()
        )
    out.print(f"generation folder written to [bold]{escape(str(path))}[/bold]")


@app.command(cls=_Command)
def merge(
    bundle: BundleArg,
    adapter: Annotated[Path, Opt(help="Adapter folder, or a run folder (its best/)")],
    out_dir: Annotated[Path, Opt("--out", help="Folder for onnx/ (and genai/)")],
    source: Annotated[str | None, Opt(help="Base model [the bundle's own source]")] = None,
    genai_folder: Annotated[
        bool | None,
        Opt("--genai/--no-genai", help="Also an onnxruntime-genai folder [if possible]"),
    ] = None,
    overwrite: Annotated[bool, Opt("--overwrite", help="Replace a non-empty --out")] = False,
) -> None:
    """Fold an adapter into the base weights: a plain ONNX model for engines without adapters."""
    from zoo_ort.app.wiring import adapter_folder

    genai = _exporters("merge")
    with third_party_quiet():
        path = genai.merge_adapter(
            bundle,
            adapter_folder(adapter),
            out_dir,
            source=source,
            genai=genai_folder,
            overwrite=overwrite,
            progress=_stage_printer(),
        )
    out.print(f"merged model written to [bold]{escape(str(path))}[/bold]")


@app.command(cls=_Command)
def generate(
    model_dir: Annotated[
        Path, typer.Argument(metavar="MODEL_DIR", help="genai-export or merge output folder")
    ],
    adapter: Annotated[Path | None, Opt(help="Adapter folder, or a run folder (its best/)")] = None,
    prompt: Annotated[list[str] | None, Opt(help="Prompt (repeatable)")] = None,
    prompts_file: Annotated[
        Path | None, Opt(help="One prompt per line; \\n in a line is a line break")
    ] = None,
    max_new_tokens: Annotated[int, Opt(help="Most tokens to generate")] = 64,
    temperature: Annotated[float, Opt(help="0: greedy; > 0: sampling")] = 0.0,
    top_p: Annotated[float, Opt(help="Nucleus sampling mass")] = 1.0,
    top_k: Annotated[int, Opt(help="Sample among the k likeliest (0: all)")] = 0,
    seed: Annotated[int | None, Opt(help="Sampling seed")] = None,
    chat: Annotated[
        bool | None, Opt("--chat/--no-chat", help="Apply the chat template [when there is one]")
    ] = None,
    choices: Annotated[
        str | None,
        Opt(help="Comma-separated answers (e.g. ' positive, negative'): print the likeliest"),
    ] = None,
) -> None:
    """Generate text with the base model, or with a trained adapter, on ONNX Runtime."""
    from zoo_ort.app.wiring import adapter_folder
    from zoo_ort.generate import GenerationConfig, load_generator

    prompts = list(prompt or [])
    if prompts_file is not None:
        try:
            lines = prompts_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ZooError(f"{prompts_file}: cannot read prompts ({e})") from None
        prompts += [line.replace("\\n", "\n") for line in lines if line.strip()]
    if not prompts:
        raise ZooError("no prompt: pass --prompt TEXT or --prompts-file FILE")
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        chat=chat,
    )
    generator = load_generator(model_dir, adapter_folder(adapter) if adapter else None)
    options = [c for c in (choices or "").split(",") if c.strip()]
    for text in prompts:
        if len(prompts) > 1:
            out.print(f"[bold]> {escape(text)}[/bold]")
        if options:
            ranked = generator.choose(text, options, chat)
            probs = ", ".join(f"{c.strip()} {p:.2f}" for c, p in ranked)
            out.print(f"{escape(ranked[0][0].strip())} ({escape(probs)})", highlight=False)
            continue
        for piece in generator.generate(text, config):
            out.print(escape(piece), end="", soft_wrap=True, highlight=False)
        out.print()


# -- providers --
