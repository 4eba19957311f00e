"""The `zoo-ort` command line: thin wrappers over the library, and the only place that prints."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from zoo_ort.app import flags
from zoo_ort.errors import ZooError

EP = flags.PROVIDER_PANEL
RAY = "Workers (Ray)"

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune language models with nothing but an inference engine (zeroth-order P-RGE).",
)
out = Console()
err = Console(stderr=True)

Opt = typer.Option


class _Command(typer.core.TyperCommand):
    """Usage lines read ``zoo-ort train [OPTIONS] BUNDLE``: typer's ``{BUNDLE}`` braces for a
    required argument read like a placeholder syntax to newcomers."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces]


def _version(value: bool) -> None:
    if value:
        from zoo_ort import __version__

        out.print(f"zoo-ort {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None,
        Opt("--version", callback=_version, is_eager=True, help="Print the version and exit"),
    ] = None,
) -> None:
    """Fine-tune language models with nothing but an inference engine (zeroth-order P-RGE)."""


# -- export --
STATIC = "Static graphs (NPUs)"


@app.command(cls=_Command)
def export(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL", help="Recipe name, Hugging Face hub id, model folder or .gguf"
        ),
    ],
    out_dir: Annotated[Path | None, Opt("--out", help="Bundle folder [models/<name>]")] = None,
    rank: Annotated[int | None, Opt(help="LoRA rank r [the recipe's, else 8]")] = None,
    alpha: Annotated[float | None, Opt(help="LoRA alpha [2·rank]")] = None,
    lora_modules: Annotated[
        str | None,
        Opt(help="Comma-separated LoRA target modules [the family's, e.g. q_proj,v_proj]"),
    ] = None,
    mode: Annotated[
        str | None,
        Opt(
            help="fa: LoRA-FA, A frozen and shared, B per row; full: A and B "
            "[the recipe's, else fa]"
        ),
    ] = None,
    int8: Annotated[
        bool, Opt("--int8", help="Weight-only int8 base (MatMulNBits); LoRA stays fp32")
    ] = False,
    overwrite: Annotated[bool, Opt("--overwrite", help="Replace a non-empty --out folder")] = False,
    seed: Annotated[int, Opt(help="Seed of LoRA A's initialisation")] = 0,
    rows: Annotated[int | None, Opt(help="Fixed row count N", rich_help_panel=STATIC)] = None,
    seq_len: Annotated[
        int | None, Opt(help="Fixed sequence length T", rich_help_panel=STATIC)
    ] = None,
    npu: Annotated[
        str | None, Opt(help="NPU family: nnapi, qnn or coreml", rich_help_panel=STATIC)
    ] = None,
    static_slots: Annotated[
        int | None, Opt(help="Scored positions K [T]", rich_help_panel=STATIC)
    ] = None,
    static_candidates: Annotated[
        int | None, Opt(help="Candidate tokens C [2]", rich_help_panel=STATIC)
    ] = None,
    lora_layers: Annotated[
        str | None,
        Opt(
            help="LoRA only on decoder layers START:STOP; the layers below become a trunk graph "
            "[the recipe's, else all]"
        ),
    ] = None,
    one_graph: Annotated[
        bool, Opt("--one-graph", help="With --lora-layers: keep one graph (no trunk)")
    ] = False,
) -> None:
    """Export a causal LM to an ONNX bundle with per-row LoRA inputs and a per-row loss."""
    with third_party_quiet():
        try:
            from zoo_ort import exporters
        except ImportError as e:
            raise ZooError(
                f"export needs the export extra ({e.name} is missing): "
                "pip install 'zoo-ort[export]'"
            ) from None
        if out_dir is None:
            out_dir = Path("models") / _default_bundle_name(model)
        started = time.perf_counter()

        def stage(msg: str) -> None:
            err.print(f"[{time.perf_counter() - started:6.1f} s] {escape(msg)}", highlight=False)

        path = exporters.export_bundle(
            model,
            out_dir,
            rank=rank,
            alpha=alpha,
            target_modules=[t.strip() for t in lora_modules.split(",")] if lora_modules else None,
            mode=mode,
            rows=rows,
            seq_len=seq_len,
            targets=static_slots,
            candidates=static_candidates,
            quantize="int8" if int8 else None,
            target=npu,
            overwrite=overwrite,
            seed=seed,
            progress=stage,
            lora_layers=_layer_range(lora_layers),
            split=not one_graph,
        )
    out.print(f"bundle written to [bold]{escape(str(path))}[/bold]")


def _layer_range(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    start, sep, stop = text.partition(":")
    if not sep or not start.strip().lstrip("-").isdigit() or not stop.strip().isdigit():
        raise ZooError(f"--lora-layers takes START:STOP, e.g. 20:30 (got {text!r})")
    return int(start), int(stop)


@contextlib.contextmanager
def third_party_quiet() -> Iterator[None]:
    """torch and transformers warn about their own deprecations; that is not the user's business.
    Their warnings go to the ``py.warnings`` log (shown with ZOO_ORT_DEBUG=1), not the terminal."""
    logging.captureWarnings(True)
    log = logging.getLogger("py.warnings")
    if not os.environ.get("ZOO_ORT_DEBUG"):
        log.addHandler(logging.NullHandler())
        log.propagate = False
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        try:
            yield
        finally:
            logging.captureWarnings(False)


def _default_bundle_name(model: str) -> str:
    name = Path(model).name if "/" in model or model.endswith(".gguf") else model
    return name.removesuffix(".gguf").replace("/", "--") or "bundle"


# -- train and eval: their settings flags come from zoo_ort.settings, provider flags from the table
BundleArg = Annotated[
    Path, typer.Argument(metavar="BUNDLE", help="Bundle folder made by `zoo-ort export`")
]
ConfigOpt = Annotated[
    Path | None,
    Opt(help="TOML settings (e.g. a run's config.toml); flags win", rich_help_panel="Run folder"),
]
ProviderOpt = Annotated[
    str,
    Opt("--provider", help="Execution provider (see `zoo-ort providers`)", rich_help_panel=EP),
]
FallbackOpt = Annotated[
    str | None,
    Opt(help="Fall back to this provider (only 'cpu') if the EP fails", rich_help_panel=EP),
]
ProviderOptionOpt = Annotated[
    list[str] | None,
    Opt("--provider-option", help="Generic EP option key=value (repeatable)", rich_help_panel=EP),
]
RECIPE_NOTE = "; a recipe may set another"
EVAL_FLAGS = ("data", "task", "template", "verbalizer", "label_field", "max_length")
EVAL_FLAGS += ("eval_rows", "threads")


def _resolve(bundle: Path, options: dict[str, Any], config: Path | None, for_training: bool):
    from zoo_ort.app import wiring

    typed = {k: options.pop(k) for k in flags.provider_flag_keys()}
    return wiring.resolve(
        bundle,
        options,
        config,
        provider_flags={k: v for k, v in typed.items() if v is not None},
        provider_option=options.pop("provider_option", None),
        for_training=for_training,
    )


@app.command(
    cls=_Command,
    epilog="Defaults shown are zoo-ort's; a bundle's recipe (models/*.toml) may set others. "
    "--show-config prints the values a run will use and where each comes from.",
)
@flags.with_options(
    flags.setting_params(flags.training_flag_names(), RECIPE_NOTE) + flags.provider_params()
)
def train(
    bundle: BundleArg,
    out_dir: Annotated[Path, Opt("--out", help="Run folder", rich_help_panel="Run folder")],
    config: ConfigOpt = None,
    resume: Annotated[
        bool,
        Opt(
            "--resume",
            help="Continue from the last checkpoint in --out",
            rich_help_panel="Run folder",
        ),
    ] = False,
    show_config: Annotated[
        bool, Opt("--show-config", help="Print the resolved settings and their sources, then exit")
    ] = False,
    provider: ProviderOpt = "cpu",
    fallback: FallbackOpt = None,
    provider_option: ProviderOptionOpt = None,
    workers: Annotated[
        int | None, Opt(help="Spread each step over N Ray workers", rich_help_panel=RAY)
    ] = None,
    share: Annotated[
        str, Opt(help="How workers share a step: query or example", rich_help_panel=RAY)
    ] = "query",
    ray_address: Annotated[
        str | None, Opt(help="Join this Ray cluster [a local one]", rich_help_panel=RAY)
    ] = None,
    **options: Any,
) -> None:
    """Fine-tune a bundle's LoRA adapter with zeroth-order steps (P-RGE)."""
    from zoo_ort.app import wiring

    if ray_address and not workers:
        raise ZooError("--ray-address needs --workers N")
    options |= {"out": str(out_dir), "provider": provider, "fallback": fallback}
    options["provider_option"] = provider_option
    resolved = _resolve(bundle, options, config, for_training=True)
    if show_config:
        _print_settings(resolved)
        return
    run = wiring.train_run
    if workers:
        from zoo_ort.scale.ray_workers import train_with_workers

        run = functools.partial(
            train_with_workers, workers=workers, share=share, ray_address=ray_address
        )
    stop = _StopFlag()
    quiet = third_party_quiet() if workers else contextlib.nullcontext()
    with quiet, stop, _TrainView() as view:
        summary = run(resolved.settings, resume=resume, on_event=view.event, should_stop=stop)
    _print_summary(summary)
    if summary["result"].stopped and stop.requested:
        raise typer.Exit(130)  # interrupted: saved, but not finished (so `train && next` stops)


@app.command(cls=_Command, name="eval")
@flags.with_options(flags.setting_params(EVAL_FLAGS, RECIPE_NOTE) + flags.provider_params())
def eval_(
    bundle: BundleArg,
    adapter: Annotated[
        Path | None, Opt(help="Adapter folder, or a run folder (its best/) [the bundle's LoRA]")
    ] = None,
    split: Annotated[str, Opt(help="Split to evaluate")] = "dev",
    config: ConfigOpt = None,
    batch_size: Annotated[int | None, Opt("--batch-size", help="Rows per pass [32]")] = None,
    provider: ProviderOpt = "cpu",
    fallback: FallbackOpt = None,
    provider_option: ProviderOptionOpt = None,
    **options: Any,
) -> None:
    """Evaluate a bundle, optionally with a trained adapter: accuracy, or loss and perplexity."""
    from zoo_ort.app import wiring

    options |= {"eval_batch_size": batch_size, "provider": provider, "fallback": fallback}
    options["provider_option"] = provider_option
    resolved = _resolve(bundle, options, config, for_training=False)
    if adapter is not None:
        folder = wiring.adapter_folder(adapter)
        if folder != adapter:
            err.print(f"using the run's best adapter: {escape(str(folder))}")
        adapter = folder
    with err.status("evaluating"):
        metrics = wiring.eval_run(resolved.settings, adapter=adapter, split=split)
    table = Table(title=f"{split} split")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else escape(str(v)))
    out.print(table)


def _print_settings(resolved: Any) -> None:
    table = Table(title="resolved settings")
    for col in ("setting", "value", "from"):
        table.add_column(col, overflow="fold")
    for name, value in resolved.settings.to_dict().items():
        table.add_row(name, escape(repr(value)), escape(resolved.sources.get(name, "default")))
    out.print(table)


# -- federated --
@app.command(cls=_Command)
def providers() -> None:
    """List execution providers: usable here or why not, and their options."""
    from zoo_ort.providers import describe_all

    # One block per provider rather than a table: names and reasons stay whole at any width.
    for p in describe_all():
        usable = "[green]yes[/green]" if p["available"] else f"[red]no[/red]: {escape(p['why'])}"
        out.print(f"[bold]{p['name']}[/bold] ({p['ort_name']}): usable here: {usable}")
        out.print(f"  package / build: {escape(p['package'])}", highlight=False)
        if p["options"]:
            opts = ", ".join(o["name"] for o in p["options"])
            out.print(f"  options: {opts}", highlight=False)


# -- presentation --
class _StopFlag:
    """Ctrl-C asks the trainer to checkpoint and stop; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopFlag:
        self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGINT, self._previous)


class _TrainView:
    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err,
        )
        self.task: Any = None
        self.pending: list[str] = []
        self.total: int | None = None
        self.first = 0

    def __enter__(self) -> _TrainView:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def event(self, kind: str, info: dict[str, Any]) -> None:
        # Nothing is shown before training really starts, so that an error raised while the run
        # is being checked stays the only line on stderr.
        if kind == "message":
            self.pending.append(info["text"])
            return
        if kind == "start":
            self.total, self.first = info["steps"], info.get("step", 0)
            return
        if self.task is None:
            for text in self.pending:
                self.progress.console.print(escape(text))
            self.task = self.progress.add_task(
                "train", total=self.total, completed=self.first, info=""
            )
        if kind == "resume":
            self.progress.console.print(f"resuming from step {info['step']} of {info['steps']}")
        elif kind == "step":
            speed = info.get("steps_per_s") or 0.0
            text = f"loss {info['loss']:.4f} lr {info['lr']:.2e} {speed:.2f} it/s"
            self.progress.update(self.task, completed=info["step"], info=text)
        elif kind == "eval":
            metrics = ", ".join(
                f"{k} {v:.4f}" for k, v in info["metrics"].items() if isinstance(v, float)
            )
            self.progress.console.print(f"step {info['step']}: {info['split']} {metrics}")


def _print_summary(summary: dict[str, Any]) -> None:
    for line in summary.get("lines", []):
        out.print(escape(line))  # library text: "[plot]" is not a rich style


# The federation and generation commands live in their own modules; importing them registers
# them on ``app``.
from zoo_ort.app import cli_federate, cli_generate  # noqa: E402, F401


def main() -> None:
    # Flower phones home unless told not to; nothing of zoo-ort's may reach the network.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a Ray tip
    try:
        app(prog_name="zoo-ort")
    except ZooError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
