"""zoo-ort's contenders of the benchmark suite, each a function for :func:`run_in_subprocess`.

Every contender builds its run as the CLI does: :func:`run_settings` (zoo-ort's ``sst2`` task,
whose prompt, label words and loss are the PyTorch baselines'; `tests/test_benchmarks_run.py`
checks that), :func:`zoo_ort.app.wiring.prepare` (engine, tokenised data, initial adapter) and
``Prepared.batches()`` (the rows of each step, which the baselines draw too). What is timed goes
through the public step functions; each contender returns a JSON-able dict:

* :func:`prge_modes` -- P-RGE batched (one forward of 2·q·B rows) against sequential (2·q
  forwards of B rows) through :func:`zoo_ort.zo.evaluate_queries`, same rows, same engine.
* :func:`zoo_train` -- :func:`zoo_ort.loop.train.train` (the CLI's loop) with a dev-accuracy
  curve against training time, stopped by a wall-clock budget; evaluation is kept off the clock.
* :func:`zoo_overhead` -- :func:`zoo_ort.zo.zo_step` against a bare ``InferenceSession.run`` of
  the forwards it made, timed alternately in one process.
* :func:`zoo_forward` -- inference only on the same rows: rows/s, peak RSS, zero-shot accuracy.

Bundles are built by :func:`prepare_bundles`, the only function here that imports torch (through
the exporter); it runs in its own process, so no contender's memory includes torch.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.common import DATA_DIR, MIN_STEPS, PeakRSS, ids_digest

if TYPE_CHECKING:  # annotations only: each function imports the runtime it runs where it runs it
    from zoo_ort.app.wiring import Prepared
    from zoo_ort.engine.protocol import Engine, EngineOutput, LabeledBatch, TokenBatch
    from zoo_ort.settings import Settings
    from zoo_ort.zo import QueryResult

TARGETS = ("q_proj", "v_proj")
RANK, ALPHA = 8, 16.0
PRECISIONS = ("fp32", "int8", "int4")
STAMP = "derived_from.json"  # in a derived bundle: what it was made from
SMOLLM2_RECIPE = "smollm2-135m"
# The quick mode's model: a random Qwen2 (Llama-like, q/v projections) whose tokenizer adds no
# BOS, so that the HF tokenizer on the PyTorch side and tokenizer.json here give the same ids.
TINY_ARCH, TINY_HIDDEN, TINY_LAYERS = "qwen2", 64, 2


# --------------------------------------------------------------------------------------------
# Bundles (built in a process of their own: the exporter imports torch)


def _is_bundle(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def _check_lora(bundle_path: Path) -> None:
    from zoo_ort.bundle import load_bundle

    lora = load_bundle(bundle_path).manifest.lora
    got = (lora.mode, lora.rank, float(lora.alpha), tuple(sorted(lora.target_modules)))
    want = ("fa", RANK, ALPHA, tuple(sorted(TARGETS)))
    if got != want:
        raise ValueError(f"{bundle_path}: LoRA (mode, rank, alpha, targets) is {got}, need {want}")


def _derive(fp32: Path, out: Path, precision: str) -> None:
    """A copy of the fp32 bundle whose base weights are int8 or int4; LoRA inputs stay fp32.

    int8 is what ``export_bundle(quantize="int8")`` does (same function on the same fp32 graph);
    int4 is ONNX Runtime's ``MatMulNBitsQuantizer`` (block 32, symmetric, int8 activations).
    """
    if precision == "int8":
        from zoo_ort.exporters.quantize import quantize_int8

        write_derived(fp32, out, precision, quantize_int8)
    elif precision == "int4":
        write_derived(fp32, out, precision, _quantize_int4)
    else:
        raise ValueError(f"unknown precision {precision!r}")


def _quantize_int4(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quant = MatMulNBitsQuantizer(
        onnx.load(str(src)), bits=4, block_size=32, is_symmetric=True, accuracy_level=4
    )
    quant.process()
    quant.model.save_model_to_file(str(dst), use_external_data_format=True)


def write_derived(
    fp32: Path,
    out: Path,
    precision: str,
    quantize: Callable[[Path, Path], None],
    stamp: dict[str, Any] | None = None,
) -> None:
    """Write ``out``: the fp32 bundle with its graph replaced by ``quantize(src, dst)``'s.

    The bundle is staged next to ``out`` and renamed into place, so a failure leaves no partial
    bundle; ``stamp`` (what the copy was made from) is saved in it as :data:`STAMP`.
    """
    from zoo_ort.bundle import load_bundle, write_manifest
    from zoo_ort.io import atomic_write_json

    fp32 = Path(fp32)
    source = load_bundle(fp32)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        quantize(source.model_path, stage / "model.onnx")
        for name in (source.manifest.tokenizer["file"], source.manifest.adapter_init):
            shutil.copyfile(fp32 / name, stage / name)
        manifest = source.manifest
        data = next((p.name for p in stage.iterdir() if p.name.startswith("model.onnx.")), None)
        manifest.graph.update(base_precision=precision, external_data=data)
        write_manifest(stage, manifest)
        if stamp is not None:
            atomic_write_json(stage / STAMP, stamp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def prepare_bundles(
    model: str = "tiny",
    cache_dir: str = "benchmarks/cache",
    precisions: Sequence[str] = PRECISIONS,
    fp32_bundle: str | None = None,
    rebuild: bool = False,
) -> dict[str, Any]:
    """Build (or reuse from ``cache_dir``) the bundles of ``model`` ("tiny" or "smollm2").

    ``fp32_bundle``: an existing fp32 bundle to use instead of exporting one (it must be LoRA-FA,
    rank 8, alpha 16 on q_proj/v_proj). int8/int4 bundles are derived from the fp32 one. A
    precision that cannot be built is reported in ``errors`` instead of failing the run. For
    "tiny" the Hugging Face folder the bundle was exported from is returned as ``hf_folder``, so
    that the PyTorch side loads the very same weights.
    """
    from zoo_ort.exporters import export_bundle

    cache = Path(cache_dir).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"model": model, "bundles": {}, "errors": {}, "build_s": {}}
    t0 = time.perf_counter()
    if model == "tiny":
        from zoo_ort.exporters.tiny import make_tiny_model

        src = cache / f"tiny-{TINY_ARCH}-src"
        if rebuild or not (src / "config.json").is_file():
            if src.exists():
                shutil.rmtree(src)
            make_tiny_model(TINY_ARCH, src, hidden=TINY_HIDDEN, layers=TINY_LAYERS, seed=0)
        out["hf_folder"] = str(src)
        export_from = str(src)
    elif model == "smollm2":
        export_from = SMOLLM2_RECIPE
    else:
        raise ValueError(f"model must be 'tiny' or 'smollm2', got {model!r}")

    fp32 = Path(fp32_bundle).resolve() if fp32_bundle else cache / f"{model}-fp32"
    if fp32_bundle is None and (rebuild or not _is_bundle(fp32)):
        export_bundle(
            export_from,
            fp32,
            rank=RANK,
            alpha=ALPHA,
            target_modules=list(TARGETS),
            mode="fa",
            overwrite=True,
            seed=0,
        )
    _check_lora(fp32)
    out["bundles"]["fp32"] = str(fp32)
    out["build_s"]["fp32"] = time.perf_counter() - t0
    for precision in precisions:
        if precision == "fp32":
            continue
        path = cache / f"{model}-{precision}"
        t1 = time.perf_counter()
        try:
            if rebuild or not _is_bundle(path):
                _derive(fp32, path, precision)
            out["bundles"][precision] = str(path)
        except Exception as e:  # report, do not fail the run: int4 support varies
            out["errors"][precision] = f"{type(e).__name__}: {e}"
        out["build_s"][precision] = time.perf_counter() - t1
    return out


# --------------------------------------------------------------------------------------------
# A contender's run, through the public path


def run_settings(
    bundle: str,
    *,
    q: int = 1,
    B: int = 16,
    eps: float = 1e-2,
    seed: int = 0,
    threads: int | None = None,
    dev_rows: int = 0,
    task: dict[str, Any] | None = None,
    **values: Any,
) -> Settings:
    """The :class:`~zoo_ort.settings.Settings` of a contender: SST-2 with zoo-ort's ``sst2``
    task and MeZO's candidate loss, P-RGE batched with ``q`` directions over ``B`` examples,
    every core (as the baselines use), no checkpoints between steps, the first ``dev_rows`` dev
    rows scored in passes of 2·q·B rows (a training forward's size, so that memory compares);
    ``task``: another task (``data``, ``task``, optionally ``template``, ``verbalizer``);
    ``values`` are any other settings (steps, lr, estimator, ...).

    Built from the defaults, not the bundle's recipe, so that the settings the report states are
    the ones that ran (e.g. the same ``max_length`` as the PyTorch side's).
    """
    from zoo_ort.settings import settings

    values = {"estimator": "batched", **values}
    return settings(
        bundle=str(bundle),
        **(task or {"data": str(DATA_DIR / "sst2"), "task": "sst2"}),
        loss="candidates",
        queries=q,
        batch_size=B,
        eps=eps,
        seed=seed,
        eval_rows=dev_rows,
        eval_batch_size=2 * q * B,
        save_every=0,
        threads=threads or os.cpu_count() or 1,
        **values,
    )


# The settings that shape a run's training, recorded with its result.
RECORDED_SETTINGS = (
    "task",
    "template",
    "verbalizer",
    "estimator",
    "queries",
    "batch_size",
    "lr",
    "eps",
    "optimizer",
    "momentum",
    "schedule",
    "warmup",
    "steps",
    "seed",
    "sampler",
    "trunk_cache_mb",  # a trunk + head bundle's cache (MB), where it decides what is recomputed
)


def prepare_run(
    bundle: str, train_limit: int | None, split: str = "dev", **settings: Any
) -> tuple[Prepared, float]:
    """``prepare(run_settings(bundle, **settings))`` (first ``train_limit`` training rows, the
    evaluation ``split``) and the seconds it took."""
    from zoo_ort.app.wiring import prepare

    t0 = time.perf_counter()
    p = prepare(run_settings(bundle, **settings), train_limit=train_limit, split=split)
    return p, time.perf_counter() - t0


def _describe(p: Prepared, load_s: float, dev_rows: int) -> dict[str, Any]:
    """Which bundle, engine and data a contender ran on; the token hashes compare the sides."""
    dev, train = p.dev_data, p.train_data
    return {
        "bundle": str(p.bundle.path),
        "precision": p.bundle.manifest.graph.get("base_precision", "fp32"),
        "providers": p.engine.active_providers,
        "threads": p.settings.threads,
        "load_s": load_s,
        "train_rows": len(train),
        "dev_tokens_sha": ids_digest(
            dev.example(i) for i in range(min(dev_rows or len(dev), len(dev)))
        ),
        "train_tokens_sha": ids_digest(train.example(i) for i in range(len(train))),
    }


def _dev_eval(p: Prepared, lora: Mapping[str, np.ndarray]) -> dict[str, float]:
    """``Prepared.evaluate`` (the settings' ``eval_rows`` in ``eval_batch_size`` rows) under the
    baselines' names, with the held-back rows' as ``select_*`` when ``p`` holds some, and the
    time of it all."""
    t0 = time.perf_counter()
    m = p.evaluate(lora)
    out = {"dev_acc": m["accuracy"], "dev_loss": m["candidate_loss"], "dev_rows": m["examples"]}
    if "holdout_accuracy" in m:  # p.holdout_data: the held-back rows
        out |= {"select_acc": m["holdout_accuracy"], "select_loss": m["holdout_candidate_loss"]}
    return out | {"eval_s": time.perf_counter() - t0}


def _median_after_warmup(times: Sequence[float], warmup: int = 1) -> float | None:
    later = list(times[warmup:]) or list(times)
    return statistics.median(later) if later else None


class TimedEngine:
    """An engine (the :class:`~zoo_ort.engine.protocol.Engine` protocol) that passes every
    forward on to ``engine``, adding up its seconds and keeping its arguments: the rows a step
    fed the engine, for timing them again outside the step."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seconds = 0.0
        self.calls: list[tuple[TokenBatch, Mapping[str, np.ndarray]]] = []

    def forward(self, batch: TokenBatch, lora: Mapping[str, np.ndarray]) -> EngineOutput:
        t0 = time.perf_counter()
        try:
            return self.engine.forward(batch, lora)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls.append((batch, lora))

    def take(self) -> tuple[float, list[tuple[TokenBatch, Mapping[str, np.ndarray]]]]:
        """Seconds spent in ``forward`` and its calls since the last ``take``."""
        taken = self.seconds, self.calls
        self.seconds, self.calls = 0.0, []
        return taken


def step_queries(
    engine: Engine, p: Prepared, s: Settings, batch: LabeledBatch, step: int
) -> QueryResult:
    """Step ``step``'s queries on ``batch`` at the initial adapter, scored as ``zo_step``
    scores them under the settings ``s`` (a :class:`~zoo_ort.zo.QueryResult`)."""
    from dataclasses import replace

    from zoo_ort.zo import init_state, query_step

    return query_step(engine, replace(init_state(p.params, p.frozen, s), step=step), batch, s)


def time_step_forward(p: Prepared, s: Settings, repeats: int) -> tuple[list[float], int]:
    """Seconds of ``repeats`` forwards of step 0's rows under ``s`` (its batch tiled 2·q times
    with their perturbed LoRA rows, as the estimator feeds them) after one warm-up (scoring the
    step, which is where the rows are taken from); and the padded sequence length."""
    timed = TimedEngine(p.engine)
    step_queries(timed, p, s, p.batches()(0), 0)
    ((batch, lora),) = timed.calls  # a batched step is one forward
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        p.engine.forward(batch, lora)
        times.append(time.perf_counter() - t0)
    return times, int(batch.input_ids.shape[1])


# --------------------------------------------------------------------------------------------
# Contenders


def prge_modes(
    bundle: str,
    *,
    q_values: Sequence[int] = (1, 4, 8),
    B: int = 16,
    steps: int = 2,
    warmup: int = 1,
    eps: float = 1e-2,
    seed: int = 0,
    threads: int | None = None,
    train_limit: int | None = None,
) -> dict[str, Any]:
    """P-RGE batched vs sequential: the same step (same rows, same directions) both ways.

    For each q, ``warmup`` untimed steps then ``steps`` timed ones; within a step the two modes
    run back to back, in alternating order, so that load changes hit both alike.
    """
    p, load_s = prepare_run(bundle, train_limit, B=B, eps=eps, seed=seed, threads=threads)
    batches = p.batches()
    rows = []
    for q in q_values:
        modes = {m: replace(p.settings, queries=q, estimator=m) for m in ("batched", "sequential")}
        times: dict[str, list[float]] = {"batched": [], "sequential": []}
        g_diff = 0.0
        for step in range(warmup + steps):
            batch = batches(step)
            order = ("batched", "sequential") if step % 2 == 0 else ("sequential", "batched")
            g = {}
            for mode in order:
                t0 = time.perf_counter()
                g[mode] = step_queries(p.engine, p, modes[mode], batch, step).g
                if step >= warmup:
                    times[mode].append(time.perf_counter() - t0)
            g_diff = max(g_diff, float(np.max(np.abs(g["batched"] - g["sequential"]))))
        bat, seq = statistics.median(times["batched"]), statistics.median(times["sequential"])
        rows.append(
            {
                "q": q,
                "B": B,
                "rows_per_step": 2 * q * B,
                "batched_s": bat,
                "sequential_s": seq,
                "batched_rows_per_s": 2 * q * B / bat,
                "sequential_rows_per_s": 2 * q * B / seq,
                "speedup": seq / bat,
                "forwards_batched": 1,
                "forwards_sequential": 2 * q,
                "g_max_abs_diff": g_diff,
                "batched_times_s": times["batched"],
                "sequential_times_s": times["sequential"],
            }
        )
    return {"method": "prge_modes", **_describe(p, load_s, 0), "rows": rows, "steps": steps}


def zoo_train(
    bundle: str,
    *,
    B: int = 16,
    q: int = 1,
    lr: float = 1e-2,
    eps: float = 1e-2,
    steps: int = 100_000,
    time_budget_s: float | None = None,
    eval_every: int = 0,
    eval_every_s: float | None = None,
    dev_rows: int = 300,
    seed: int = 0,
    threads: int | None = None,
    train_limit: int | None = None,
    optimizer: str = "sgd",
    eval_at_s: Sequence[float] = (),
    task: dict[str, Any] | None = None,
    dev_split: str = "dev",
    values: dict[str, Any] | None = None,
    select_split: str | None = None,
) -> dict[str, Any]:
    """Train with :func:`zoo_ort.loop.train.train` until ``steps`` or ``time_budget_s`` of
    training; ``task``, ``dev_split`` and ``values`` (more settings: estimator, schedule, ...)
    as in :func:`run_settings`. ``select_split``: held-back rows of the task, all scored beside
    dev at every evaluation (``select_acc``, ``select_loss``), to pick a checkpoint on.

    The dev set is scored at the start, every ``eval_every`` steps, whenever the training clock
    passes another multiple of ``eval_every_s`` or a point of ``eval_at_s``, and at the end, in
    batches of 2·q·B rows (the training forward's size, so that the phase's peak RSS compares
    with inference on those rows). ``train()`` is asked for an evaluation after every step on
    the time grid; the callback keeps the parameters and ``on_step`` scores them once the step's
    recorded time is on the clock and a grid point is due. Evaluations are off the clock either
    way. The result has the PyTorch trainers' shape (``step_times_s``, ``train_loss``,
    ``projected_grads`` (the g of every step), ``curve`` of ``{step, train_s, wall_s, dev_acc,
    dev_loss, dev_rows, eval_s}``, ``median_step_s`` over the steps after the first,
    ``phase_peak_rss_mb`` of the training phase including evaluations).
    """

    p, load_s = prepare_run(
        bundle,
        train_limit,
        dev_split,
        q=q,
        B=B,
        eps=eps,
        seed=seed,
        threads=threads,
        dev_rows=dev_rows,
        task=task,
        **{"steps": steps, "lr": lr, "optimizer": optimizer, **(values or {})},
        eval_every=1 if eval_every_s or eval_at_s else eval_every,
        eval_at_start=True,
    )
    if select_split:  # scored as zoo-ort's own --holdout rows are, beside dev, in one evaluate
        from zoo_ort.app.wiring import _split_data

        p = replace(p, holdout_data=_split_data(p.settings, p.bundle, select_split))
    clock = {"train_s": 0.0, "next_eval_s": eval_every_s or 0.0}
    grid = sorted(eval_at_s)  # training seconds still to score at
    timed = bool(eval_every_s or eval_at_s)
    last: dict[str, float] = {}
    curve: list[dict[str, Any]] = []
    latest: dict[str, dict[str, np.ndarray]] = {}
    step_times: list[float] = []
    losses: list[float] = []
    projected: list[list[float]] = []

    def score(lora: Mapping[str, np.ndarray], step: int) -> None:
        m = _dev_eval(p, lora)
        wall_s = time.perf_counter() - start
        curve.append({"step": step, "train_s": clock["train_s"], "wall_s": wall_s, **m})
        last.update(accuracy=m["dev_acc"], loss=m["dev_loss"])

    def evaluate(lora: dict[str, np.ndarray]) -> dict[str, float]:
        if not curve:  # the initial evaluation, before any step
            score(lora, 0)
            return dict(last)
        # After a step train() calls this before on_step: the step's time is not on the clock
        # yet, so the parameters are only kept (a reference, no copy) and on_step scores them.
        latest["lora"] = lora
        return dict(last)

    def on_step(record: dict[str, Any]) -> None:
        if record.get("kind") != "step":
            return
        clock["train_s"] += record["step_time"]
        step_times.append(record["step_time"])
        losses.append(record["loss"])
        projected.append(record["g"])
        clock["rows"] = record["rows"]
        if timed:  # on the clock's grid only (train() asks after every step)
            due_every = bool(eval_every_s) and clock["train_s"] >= clock["next_eval_s"]
            due_grid = bool(grid) and clock["train_s"] >= grid[0]
            if not (due_every or due_grid):
                return
            while eval_every_s and clock["next_eval_s"] <= clock["train_s"]:
                clock["next_eval_s"] += eval_every_s
            grid[:] = [t for t in grid if t > clock["train_s"]]
        elif "eval" not in record:
            return
        score(latest.pop("lora"), record["step"])

    def should_stop() -> bool:
        over = time_budget_s is not None and clock["train_s"] >= time_budget_s
        return over and len(step_times) >= MIN_STEPS

    with tempfile.TemporaryDirectory(prefix="zoo-bench-run-") as run_dir, PeakRSS() as rss:
        start = time.perf_counter()
        result = p.train(
            run_dir,
            evaluate=evaluate,
            save_adapter=None,
            on_step=on_step,
            should_stop=should_stop,
        )
        done = len(step_times)
        if not curve or curve[-1]["step"] != done:
            score({**p.frozen, **result.params}, done)
        wall_s = time.perf_counter() - start
    median = _median_after_warmup(step_times)
    rows_per_step = clock.get("rows", 2 * q * B)  # fzoo: (q + 1)·B
    return {
        "method": "zoo_ort",
        **_describe(p, load_s, dev_rows),
        "config": {
            "B": B,
            "q": q,
            "lr": lr,
            "eps": eps,
            "seed": seed,
            "optimizer": optimizer,
            "eval_every": eval_every,
            "eval_every_s": eval_every_s,
            "eval_at_s": list(eval_at_s),
            "dev_split": dev_split,
            "settings": {k: getattr(p.settings, k) for k in RECORDED_SETTINGS},
            "dev_rows": dev_rows,
            "time_budget_s": time_budget_s,
            "rank": RANK,
            "alpha": ALPHA,
            "targets": list(TARGETS),
        },
        "steps_done": done,
        "stopped": "time_budget" if result.stopped else "steps",
        "rows_per_step": rows_per_step,
        "train_s": clock["train_s"],
        "wall_s": wall_s,
        "mean_step_s": statistics.fmean(step_times[1:]) if len(step_times) > 1 else median,
        "median_step_s": median,
        "first_step_s": step_times[0] if step_times else None,
        "rows_per_s": rows_per_step / median if median else None,
        "step_times_s": step_times,
        "train_loss": losses,
        "projected_grads": projected,
        "curve": curve,
        "final": dict(curve[-1]),
        **rss.as_dict(),
    }


def zoo_overhead(
    bundle: str,
    *,
    B: int = 16,
    q: int = 1,
    steps: int = 6,
    lr: float = 1e-2,
    eps: float = 1e-2,
    seed: int = 0,
    threads: int | None = None,
    train_limit: int | None = None,
) -> dict[str, Any]:
    """The trainer's step time against a bare ORT forward of the same 2·q·B rows.

    The step is :func:`zoo_ort.zo.zo_step` (perturbed rows, engine, scalars, direction replay,
    update) on ``batches(step)``, timed as :func:`zoo_ort.loop.train.train` times its steps,
    through a :class:`TimedEngine` that adds up the step's forwards and keeps their rows. After
    each step, outside its clock, those rows are fed to ``InferenceSession.run`` directly and
    timed, so both see the same load: once as the engine splits them (its length groups, the
    overhead reference) and once as a single padded forward (what length grouping saves). The
    first step of each is a warm-up and not counted. ``in_step_ort_times_s`` is the step's time
    inside ``engine.forward``: ORT's runs and the engine's own grouping and feeds.
    """
    from zoo_ort.engine.ort import OUTPUT_NAMES
    from zoo_ort.engine.scratch import Scratch
    from zoo_ort.zo import init_state, zo_step

    p, load_s = prepare_run(
        bundle, train_limit, q=q, B=B, eps=eps, seed=seed, threads=threads, steps=steps, lr=lr
    )
    s, batches, session = p.settings, p.batches(), p.engine.session
    step_s: list[float] = []
    in_step_ort_s: list[float] = []  # the step's own engine forwards
    ort_s: list[float] = []  # the engine's forwards, bare
    single_s: list[float] = []  # one padded forward of all rows, bare
    forwards: list[int] = []
    timed = TimedEngine(p.engine)
    state = init_state(p.params, p.frozen, s)
    scratch = Scratch()  # one per run, as train() keeps it
    for step in range(steps):
        t0 = time.perf_counter()
        state, _ = zo_step(timed, state, batches(step), s, scratch=scratch)
        step_s.append(time.perf_counter() - t0)
        seconds, calls = timed.take()
        in_step_ort_s.append(seconds)
        ((batch, lora),) = calls  # a batched step is one forward; its rows live until the next
        parts = [feeds for _, feeds in p.engine.grouped_feeds(batch, lora)]
        t0 = time.perf_counter()
        for feeds in parts:
            session.run(OUTPUT_NAMES, feeds)
        ort_s.append(time.perf_counter() - t0)
        single = {**batch.arrays(), **lora}  # the tiled batch is padded to its longest row
        t0 = time.perf_counter()
        session.run(OUTPUT_NAMES, single)
        single_s.append(time.perf_counter() - t0)
        forwards.append(len(parts))
    own = [a - b for a, b in zip(step_s, in_step_ort_s, strict=True)]
    pairs = [a / b for a, b in zip(step_s[1:], ort_s[1:], strict=True)]
    step_med, ort_med = _median_after_warmup(step_s), _median_after_warmup(ort_s)
    single_med = _median_after_warmup(single_s)
    return {
        "method": "zoo_overhead",
        **_describe(p, load_s, 0),
        "config": {"B": B, "q": q, "steps": steps, "eps": eps, "seed": seed},
        "rows_per_step": 2 * q * B,
        "step_times_s": step_s,
        "ort_times_s": ort_s,
        "median_step_s": step_med,
        "median_ort_s": ort_med,
        "overhead": (step_med / ort_med - 1.0) if step_med and ort_med else None,
        "median_paired_overhead": statistics.median(pairs) - 1.0 if pairs else None,
        "in_step_ort_times_s": in_step_ort_s,
        "median_own_s": _median_after_warmup(own),
        "own_overhead": (_median_after_warmup(own) / ort_med) if ort_med and own else None,
        "single_forward_times_s": single_s,
        "median_single_forward_s": single_med,
        "forwards_per_step": forwards,
        "grouping_speedup": (single_med / ort_med) if single_med and ort_med else None,
    }


def zoo_forward(
    bundle: str,
    *,
    B: int = 16,
    q: int = 1,
    repeats: int = 3,
    rss_steps: int = 1,
    eps: float = 1e-2,
    seed: int = 0,
    dev_rows: int = 0,
    threads: int | None = None,
    train_limit: int | None = None,
) -> dict[str, Any]:
    """Inference only on the rows a training run sees, through ``engine.forward``.

    Speed: step 0's batch tiled 2·q times with its perturbed LoRA rows; one warm-up, then
    ``repeats`` timed runs. Memory (``phase_peak_rss_mb``): those forwards, then the same for
    the batches of steps 1 … ``rss_steps``-1 and, with ``dev_rows``, scoring the dev rows in
    batches of 2·q·B (the zero-shot accuracy) -- the forwards a training run of ``rss_steps``
    steps with evaluations makes, minus the training. One batch's peak alone
    (``step0_peak_rss_mb``) understates inference: ORT's memory grows with the variety of
    sequence lengths it has run.
    """
    rows = 2 * q * B
    p, load_s = prepare_run(
        bundle, train_limit, q=q, B=B, eps=eps, seed=seed, threads=threads, dev_rows=dev_rows
    )
    s = p.settings
    with PeakRSS() as step0_rss:
        times, seq_len = time_step_forward(p, s, repeats)
    median = statistics.median(times)
    zero_shot = None
    batches = p.batches()
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        for step in range(1, rss_steps):
            step_queries(p.engine, p, s, batches(step), step)
        if dev_rows:
            zero_shot = _dev_eval(p, {**p.frozen, **p.params})
    peaks = [m for m in (step0_rss.peak_mb, rss.peak_mb) if m is not None]
    out = {
        "method": "zoo_forward",
        **_describe(p, load_s, dev_rows),
        "config": {"B": B, "q": q, "repeats": repeats, "rss_steps": rss_steps, "seed": seed},
        "rows": rows,
        "seq_len": seq_len,
        "times_s": times,
        "median_s": median,
        "rows_per_s": rows / median,
        **step0_rss.as_dict(),
        "phase_peak_rss_mb": max(peaks) if peaks else None,
        "step0_peak_rss_mb": step0_rss.peak_mb,
        "rss_phase_s": time.perf_counter() - t0,
    }
    if zero_shot is not None:
        out["zero_shot"] = zero_shot
    return out
