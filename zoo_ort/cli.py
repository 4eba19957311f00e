"""The `zoo-ort` command line: thin wrappers over the library, and the only place that prints."""

from __future__ import annotations

import signal
import sys
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

from zoo_ort.errors import ZooError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune language models with nothing but an inference engine (zeroth-order P-RGE).",
)
out = Console()
err = Console(stderr=True)

Opt = typer.Option


# -- export --
@app.command()
def export(
    model: Annotated[
        str, typer.Argument(help="Recipe name, Hugging Face hub id, model folder or .gguf")
    ],
    out_dir: Annotated[Path | None, Opt("--out", help="Bundle folder [models/<name>]")] = None,
    rank: Annotated[int | None, Opt(help="LoRA rank r [the recipe's, else 8]")] = None,
    alpha: Annotated[float | None, Opt(help="LoRA alpha [2·rank]")] = None,
    targets: Annotated[
        str | None, Opt(help="Comma-separated target modules [per architecture: q and v]")
    ] = None,
    mode: Annotated[
        str, Opt(help="fa: LoRA-FA, A frozen and shared, B per row; full: A and B")
    ] = "fa",
    rows: Annotated[int | None, Opt(help="Fixed row count N (static-shape graph)")] = None,
    seq_len: Annotated[int | None, Opt(help="Fixed sequence length T (static-shape graph)")] = None,
    int8: Annotated[
        bool, Opt("--int8", help="Weight-only int8 base (MatMulNBits); LoRA stays fp32")
    ] = False,
    slots: Annotated[int | None, Opt(help="Static graphs: scored positions K [T]")] = None,
    candidates: Annotated[int | None, Opt(help="Static graphs: candidate tokens C [2]")] = None,
    target: Annotated[str | None, Opt(help="Device target: nnapi, qnn or coreml")] = None,
    overwrite: Annotated[bool, Opt(help="Replace a non-empty --out folder")] = False,
    seed: Annotated[int, Opt(help="Seed of LoRA A's initialisation")] = 0,
) -> None:
    """Export a causal LM to an ONNX bundle with per-row LoRA inputs and a per-row loss."""
    try:
        from zoo_ort import exporters
    except ImportError as e:
        raise ZooError(
            f"export needs the export extra ({e.name} is missing): pip install 'zoo-ort[export]'"
        ) from None
    if out_dir is None:
        out_dir = Path("models") / _default_bundle_name(model)
    with err.status(f"exporting {model}") as status:
        path = exporters.export_bundle(
            model,
            out_dir,
            rank=rank,
            alpha=alpha,
            target_modules=[t.strip() for t in targets.split(",")] if targets else None,
            mode=mode,
            rows=rows,
            seq_len=seq_len,
            targets=slots,
            candidates=candidates,
            quantize="int8" if int8 else None,
            target=target,
            overwrite=overwrite,
            seed=seed,
            progress=lambda msg: status.update(msg),
        )
    out.print(f"bundle written to [bold]{escape(str(path))}[/bold]")


def _default_bundle_name(model: str) -> str:
    name = Path(model).name if "/" in model or model.endswith(".gguf") else model
    return name.removesuffix(".gguf").replace("/", "--") or "bundle"


# -- options shared by train and eval --
ProviderOpt = Annotated[str, Opt("--provider", help="Execution provider (see `zoo-ort providers`)")]
FallbackOpt = Annotated[
    str | None, Opt(help="Allow falling back to this provider (only 'cpu') if the EP fails")
]
ProviderOptionOpt = Annotated[
    list[str] | None, Opt("--provider-option", help="Generic EP option key=value (repeatable)")
]
CudaDeviceOpt = Annotated[int | None, Opt(help="CUDA: device id")]
CudaMemOpt = Annotated[int | None, Opt(help="CUDA: arena limit in bytes")]
QnnBackendOpt = Annotated[str | None, Opt(help="QNN: htp, cpu or gpu")]
QnnPerfOpt = Annotated[str | None, Opt(help="QNN: HTP performance mode, e.g. burst")]
QnnFp16Opt = Annotated[bool | None, Opt(help="QNN: run fp32 graphs in fp16 on HTP")]
NnapiFp16Opt = Annotated[bool | None, Opt(help="NNAPI: allow fp16")]
NnapiNchwOpt = Annotated[bool | None, Opt(help="NNAPI: use NCHW layout")]
NnapiNoCpuOpt = Annotated[bool | None, Opt(help="NNAPI: never use the NNAPI CPU")]
# The typed per-device flags; each is an option of the provider table (its `cli_flag`).
PROVIDER_FLAGS = (
    "cuda_device_id",
    "cuda_mem_limit",
    "qnn_backend",
    "qnn_htp_performance_mode",
    "qnn_fp16",
    "nnapi_fp16",
    "nnapi_nchw",
    "nnapi_cpu_disabled",
)
BundleArg = Annotated[Path, typer.Argument(help="Bundle folder made by `zoo-ort export`")]
TaskOpt = Annotated[str | None, Opt(help="sst2, rte, boolq, sentiment, lm, or custom")]
DataOpt = Annotated[str | None, Opt(help="Data folder or file ('sentiment': the shipped set)")]
ConfigOpt = Annotated[Path | None, Opt(help="TOML config (e.g. a run's config.toml); flags win")]
EvalRowsOpt = Annotated[int | None, Opt(help="Evaluate on the first R rows (0: all)")]
MaxLengthOpt = Annotated[int | None, Opt(help="Truncate examples to this many tokens")]
TemplateOpt = Annotated[str | None, Opt(help="Prompt template, e.g. '{text} It was'")]
VerbalizerOpt = Annotated[str | None, Opt(help="Label words, e.g. '0= bad,1= good'")]
LabelFieldOpt = Annotated[str | None, Opt(help="Label column/field of custom data")]
ThreadsOpt = Annotated[int | None, Opt(help="CPU threads for ONNX Runtime")]


def _split_flags(given: dict[str, Any], drop: set[str]) -> dict[str, Any]:
    """Take the typed provider flags that were given out of ``given``; also drop ``drop``."""
    for k in drop:
        given.pop(k, None)
    flags = {k: given.pop(k) for k in PROVIDER_FLAGS}
    return {k: v for k, v in flags.items() if v is not None}


# -- train --
@app.command()
def train(
    bundle: BundleArg,
    task: TaskOpt = None,
    data: DataOpt = None,
    out_dir: Annotated[Path | None, Opt("--out", help="Run folder")] = None,
    config: ConfigOpt = None,
    resume: Annotated[bool, Opt(help="Continue from the last checkpoint in --out")] = False,
    steps: Annotated[int | None, Opt(help="Optimisation steps")] = None,
    lr: Annotated[float | None, Opt(help="Learning rate")] = None,
    eps: Annotated[float | None, Opt(help="Perturbation size ε")] = None,
    queries: Annotated[int | None, Opt(help="Random directions q per step")] = None,
    batch_size: Annotated[int | None, Opt(help="Examples B per step")] = None,
    save_every: Annotated[int | None, Opt(help="Checkpoint every K steps")] = None,
    eval_every: Annotated[int | None, Opt(help="Evaluate on the dev split every K steps")] = None,
    eval_rows: EvalRowsOpt = None,
    seed: Annotated[int | None, Opt(help="Run seed (data order and directions)")] = None,
    loss: Annotated[str | None, Opt(help="candidates (MeZO) or lm (label-token loss)")] = None,
    optimizer: Annotated[str | None, Opt(help="sgd, adam or sign")] = None,
    momentum: Annotated[float | None, Opt(help="Momentum (sgd, sign)")] = None,
    schedule: Annotated[str | None, Opt(help="constant, linear or cosine")] = None,
    warmup: Annotated[int | None, Opt(help="Warm-up steps")] = None,
    weight_decay: Annotated[float | None, Opt(help="Weight decay")] = None,
    estimator: Annotated[
        str | None, Opt(help="batched (P-RGE: one pass of 2qB rows) or sequential (MeZO)")
    ] = None,
    row_budget: Annotated[int | None, Opt(help="Most rows per forward pass (0: no limit)")] = None,
    max_length: MaxLengthOpt = None,
    template: TemplateOpt = None,
    verbalizer: VerbalizerOpt = None,
    label_field: LabelFieldOpt = None,
    threads: ThreadsOpt = None,
    provider: ProviderOpt = "cpu",
    fallback: FallbackOpt = None,
    provider_option: ProviderOptionOpt = None,
    cuda_device_id: CudaDeviceOpt = None,
    cuda_mem_limit: CudaMemOpt = None,
    qnn_backend: QnnBackendOpt = None,
    qnn_htp_performance_mode: QnnPerfOpt = None,
    qnn_fp16: QnnFp16Opt = None,
    nnapi_fp16: NnapiFp16Opt = None,
    nnapi_nchw: NnapiNchwOpt = None,
    nnapi_cpu_disabled: NnapiNoCpuOpt = None,
) -> None:
    """Fine-tune a bundle's LoRA with zeroth-order P-RGE."""
    from zoo_ort import run

    given = dict(locals())
    flags = _split_flags(given, {"bundle", "config", "resume", "run"})
    out_dir = given.pop("out_dir")
    given["out"] = str(out_dir) if out_dir else None
    cfg = run.resolve_config(bundle, given, config, provider_flags=flags, for_training=True)
    stop = _StopFlag()
    with stop, _TrainView() as view:
        summary = run.train_run(cfg, resume=resume, on_event=view.event, should_stop=stop)
    _print_summary(summary)


# -- eval --
@app.command(name="eval")
def eval_(
    bundle: BundleArg,
    adapter: Annotated[Path | None, Opt(help="PEFT adapter folder [the bundle's LoRA]")] = None,
    task: TaskOpt = None,
    data: DataOpt = None,
    split: Annotated[str, Opt(help="Split to evaluate")] = "dev",
    config: ConfigOpt = None,
    eval_rows: EvalRowsOpt = None,
    eval_batch_size: Annotated[int | None, Opt("--batch-size", help="Rows per pass")] = None,
    max_length: MaxLengthOpt = None,
    template: TemplateOpt = None,
    verbalizer: VerbalizerOpt = None,
    label_field: LabelFieldOpt = None,
    threads: ThreadsOpt = None,
    provider: ProviderOpt = "cpu",
    fallback: FallbackOpt = None,
    provider_option: ProviderOptionOpt = None,
    cuda_device_id: CudaDeviceOpt = None,
    cuda_mem_limit: CudaMemOpt = None,
    qnn_backend: QnnBackendOpt = None,
    qnn_htp_performance_mode: QnnPerfOpt = None,
    qnn_fp16: QnnFp16Opt = None,
    nnapi_fp16: NnapiFp16Opt = None,
    nnapi_nchw: NnapiNchwOpt = None,
    nnapi_cpu_disabled: NnapiNoCpuOpt = None,
) -> None:
    """Evaluate a bundle, optionally with a trained adapter: accuracy, or loss and perplexity."""
    from zoo_ort import run

    given = dict(locals())
    flags = _split_flags(given, {"bundle", "config", "adapter", "split", "run"})
    cfg = run.resolve_config(bundle, given, config, provider_flags=flags, for_training=False)
    with err.status("evaluating"):
        metrics = run.eval_run(cfg, adapter=adapter, split=split)
    table = Table(title=f"{split} split")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else escape(str(v)))
    out.print(table)


# -- providers --
@app.command()
def providers() -> None:
    """List execution providers: usable here or why not, and their options."""
    from zoo_ort.providers import describe_all

    table = Table(title="Execution providers")
    for col in ("name", "ORT provider", "usable here", "package / build", "options"):
        table.add_column(col)
    for p in describe_all():
        usable = "[green]yes[/green]" if p["available"] else f"[red]no[/red]: {escape(p['why'])}"
        opts = ", ".join(o["name"] for o in p["options"])
        table.add_row(p["name"], p["ort_name"], usable, escape(p["package"]), opts)
    out.print(table)


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
        if kind == "step":
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


def main() -> None:
    try:
        app()
    except ZooError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
