"""The training loop: orchestration around :func:`~zoo_ort.zo.step.zo_step`, read top to bottom.

The loop knows nothing of the model: it sees an :class:`~zoo_ort.engine.protocol.Engine`,
parameter dicts, a ``batches(step)`` callable and a few injected callables (evaluate,
save_adapter, on_step, should_stop). All randomness comes from ``settings.seed`` and the step
number (directions in :mod:`zoo_ort.zo.directions`, data by the caller's ``batches``), so the
whole training state is one :class:`~zoo_ort.zo.step.TrainState` and a resumed run is
bit-identical to an uninterrupted one.

Run folder::

    checkpoints/   see :mod:`zoo_ort.loop.checkpoint`
    metrics.jsonl  see :mod:`zoo_ort.loop.metrics`
    final/         save_adapter(params) at the end
    best/          save_adapter(best params) whenever the dev metric improves, and at the end
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from zoo_ort.engine.protocol import Engine, LabeledBatch
from zoo_ort.engine.scratch import Scratch
from zoo_ort.errors import ZooError
from zoo_ort.loop.checkpoint import load_latest
from zoo_ort.loop.metrics import METRICS, MetricsLog, jsonable
from zoo_ort.loop.resume import restore_state, run_identity, save_state
from zoo_ort.settings import Settings
from zoo_ort.zo.step import TrainState, init_state, zo_step

__all__ = ["BEST_DIR", "FINAL_DIR", "TrainResult", "train"]

FINAL_DIR = "final"
BEST_DIR = "best"

Evaluate = Callable[[dict[str, np.ndarray]], Mapping[str, Any]]
SaveAdapter = Callable[[dict[str, np.ndarray], Mapping[str, np.ndarray], Path], None]


@dataclass
class TrainResult:
    params: dict[str, np.ndarray]  # final trainable tensors
    step: int  # steps completed
    stopped: bool  # True when should_stop() ended the run early (checkpoint saved)
    non_finite: int  # steps skipped because of non-finite losses/updates
    best_params: dict[str, np.ndarray] | None = None
    best_metric: float | None = None
    best_step: int | None = None
    final_eval: dict[str, Any] | None = None
    run_dir: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # this call's step records
    resumed_from: int | None = None  # the checkpoint's step when this call resumed a run
    already_finished: bool = False  # resumed a finished run: nothing was run or rewritten
    timed_out: bool = False  # settings.time_limit ended this call (adapters + checkpoint written)


def train(
    engine: Engine,
    params: Mapping[str, np.ndarray],
    frozen: Mapping[str, np.ndarray],
    batches: Callable[[int], LabeledBatch],
    settings: Settings,
    run_dir: str | Path,
    *,
    evaluate: Evaluate | None = None,
    save_adapter: SaveAdapter | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = False,
    should_stop: Callable[[], bool] | None = None,
    fingerprint: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train the ``params`` (per-row LoRA tensors) with ZO steps; ``frozen`` ones are shared.

    ``batches(step)`` must return the same :class:`LabeledBatch` for the same step (derive it
    from the seed and the step) — the data position is then just the step number.
    ``evaluate(lora)`` receives the full LoRA tensors (``{**frozen, **params}``, no row dim) and
    returns metrics such as ``{"accuracy": .., "loss": ..}`` on a dev split, never test:
    ``settings.best`` picks the ``best`` adapter from them. ``save_adapter(params, frozen,
    folder)`` writes an adapter. ``fingerprint`` (JSON-able, e.g. bundle and data) must match
    on resume. With ``resume`` the run continues from ``run_dir``'s latest checkpoint (or
    starts fresh when there is none); without it, a ``run_dir`` holding a checkpoint is refused.
    A run that had already finished is left exactly as it is.
    """
    settings.validate()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = init_state(params, frozen, settings)
    identity = run_identity(settings, state, fingerprint)
    log = MetricsLog(run_dir / METRICS)
    ckpt = load_latest(run_dir)
    if ckpt is not None and not resume:
        raise ZooError(
            f"{run_dir} already holds a run (checkpoint at step {ckpt.step}); resume it or "
            "choose a new run folder"
        )
    if ckpt is not None:
        state = restore_state(run_dir, ckpt, state, identity)
        if state.finished:
            return _result(state, run_dir, [], False, ckpt.step, already_finished=True)
        if on_step is not None:
            on_step({"kind": "resume", "step": state.step, "steps": settings.steps})
    log.truncate_after(state.step if ckpt is not None else -1)

    def checkpoint(s: TrainState) -> None:
        save_state(run_dir, s, identity, settings.keep_checkpoints)

    def run_eval(s: TrainState) -> tuple[TrainState, dict[str, Any]]:
        return _evaluate(s, settings, evaluate, save_adapter, run_dir, log)  # type: ignore[arg-type]

    history: list[dict[str, Any]] = []
    stopped = timed_out = False
    # The budget is training time: the steps' own seconds. Evaluations and checkpoints are not
    # counted, so how often a run scores its dev split does not change how far it trains.
    trained_s, budget = 0.0, settings.time_limit_s
    saved_at = ckpt.step if ckpt is not None else None
    scratch = Scratch()  # the perturbed rows' memory, reused by every step
    if ckpt is None and evaluate is not None and settings.eval_at_start:
        state, metrics = run_eval(state)
        if on_step is not None:
            on_step({"kind": "eval", "step": 0, "eval": metrics})
    while state.step < settings.steps:
        if should_stop is not None and should_stop():
            if saved_at != state.step:
                checkpoint(state)
            stopped = True
            break
        if budget is not None and trained_s >= budget:
            timed_out = True
            break
        t0 = time.perf_counter()
        state, record = zo_step(engine, state, batches(state.step), settings, scratch=scratch)
        dt = time.perf_counter() - t0
        trained_s += dt
        record |= {"rows_per_s": record["rows"] / dt if dt > 0 else None, "step_time": dt}
        log.append(record)
        if state.non_finite > settings.max_non_finite:
            raise ZooError(
                f"{state.non_finite} steps had non-finite losses or updates (limit "
                f"{settings.max_non_finite}); lower lr or eps. The last checkpoint is intact."
            )
        done, last = state.step, state.step == settings.steps
        every = settings.eval_every
        if evaluate is not None and (last or (every and done % every == 0)):
            state, metrics = run_eval(state)
            record = record | {"eval": metrics}
            if last:
                state = replace(state, final_eval=metrics)
        history.append(record)
        if on_step is not None:
            on_step(record | {"steps_per_s": 1.0 / dt if dt > 0 else None})
        if settings.save_every and done % settings.save_every == 0 and not last:
            checkpoint(state)
            saved_at = done
    if not stopped:
        # The end of the run, or of its time budget: a final evaluation, adapters, a checkpoint.
        # Only the real end marks the run finished; a timed-out one continues with --resume.
        scored = history[-1].get("eval") is not None if history else False
        if evaluate is not None and state.final_eval is None and not scored:
            state, metrics = run_eval(state)
            state = replace(state, final_eval=metrics)
        state = replace(state, finished=not timed_out)
        checkpoint(state)
        if save_adapter is not None:
            save_adapter(state.params, state.frozen, run_dir / FINAL_DIR)
            if state.best_params is not None:
                save_adapter(state.best_params, state.frozen, run_dir / BEST_DIR)
    resumed = ckpt.step if ckpt is not None else None
    return _result(state, run_dir, history, stopped, resumed, timed_out=timed_out)


def _evaluate(
    state: TrainState,
    settings: Settings,
    evaluate: Evaluate,
    save_adapter: SaveAdapter | None,
    run_dir: Path,
    log: MetricsLog,
) -> tuple[TrainState, dict[str, Any]]:
    """Score the dev split, log it, and keep (and save) the adapter when it is the best so far."""
    t0 = time.perf_counter()
    raw = dict(evaluate({**state.frozen, **state.params}))
    metrics = jsonable(raw)
    log.append({"step": state.step, "eval": metrics, "eval_s": time.perf_counter() - t0})
    name, mode = settings.best
    value = raw.get(name)
    if not isinstance(value, int | float | np.floating | np.integer):
        raise ZooError(
            f"evaluation returned no numeric {name!r} (got {', '.join(sorted(metrics))}); "
            "set best_metric to one of those"
        )
    value, best = float(value), state.best_metric
    better = best is None or (value > best if mode == "max" else value < best)
    if better and np.isfinite(value):
        copy = {k: np.array(v, copy=True) for k, v in state.params.items()}
        state = replace(state, best_params=copy, best_metric=value, best_step=state.step)
        if save_adapter is not None:
            save_adapter(copy, state.frozen, run_dir / BEST_DIR)
    return state, metrics


def _result(
    state: TrainState,
    run_dir: Path,
    history: list[dict[str, Any]],
    stopped: bool,
    resumed_from: int | None,
    already_finished: bool = False,
    timed_out: bool = False,
) -> TrainResult:
    return TrainResult(
        params=state.params,
        step=state.step,
        stopped=stopped,
        non_finite=state.non_finite,
        best_params=state.best_params,
        best_metric=state.best_metric,
        best_step=state.best_step,
        final_eval=state.final_eval,
        run_dir=run_dir,
        history=history,
        resumed_from=resumed_from,
        already_finished=already_finished,
        timed_out=timed_out,
    )
