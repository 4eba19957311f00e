"""The training state and the pure step ``state, record = zo_step(engine, state, batch, settings)``.

A step is "evaluate the queries → a few scalars → replay the update from seeds". Nothing here
reads or writes files, keeps time or prints: the loop (:mod:`zoo_ort.loop.train`) orchestrates
evaluation, checkpoints and logs around it, and workers or federated clients can call it as is.
The state is all a run needs to continue: a resumed run restores one :class:`TrainState`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import numpy as np

from zoo_ort.engine.protocol import Engine, LabeledBatch
from zoo_ort.engine.scratch import Scratch
from zoo_ort.settings import Settings
from zoo_ort.zo import hizoo
from zoo_ort.zo.directions import grad_from_scalars
from zoo_ort.zo.estimators import QueryResult, evaluate_queries
from zoo_ort.zo.optim import GradientTransformation, apply_updates, make_optimizer, make_schedule

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class TrainState:
    params: Tensors  # trained tensors (per-row inputs of the graph, without the row dim)
    frozen: Tensors  # shared LoRA tensors: fed to every row, never trained
    opt_state: dict[str, Any]  # the optimiser's state (optax-style)
    step: int = 0  # optimisation steps completed: the next step to run
    non_finite: int = 0  # steps skipped because of non-finite losses or updates
    best_params: Tensors | None = None  # the best adapter on the dev metric so far
    best_metric: float | None = None
    best_step: int | None = None
    finished: bool = False  # the run reached settings.steps (final adapters written)
    final_eval: dict[str, Any] | None = None
    est_state: Tensors = field(default_factory=dict)  # the estimator's own state (HiZOO's Σ)


def _opt_key(s: Settings) -> tuple:
    return (s.optimizer, s.lr, s.schedule, s.warmup, s.steps, s.weight_decay, s.momentum)


@lru_cache(maxsize=8)
def _optimizer(key: tuple, betas: tuple[float, float], adam_eps: float) -> GradientTransformation:
    name, lr, schedule, warmup, steps, weight_decay, momentum = key
    return make_optimizer(
        name, lr, schedule, warmup, steps, weight_decay, momentum, betas, adam_eps
    )


def optimizer(settings: Settings) -> GradientTransformation:
    """The settings' optimiser (a pure transform; built once per distinct settings)."""
    return _optimizer(_opt_key(settings), tuple(settings.betas), settings.adam_eps)


def init_state(
    params: Mapping[str, np.ndarray], frozen: Mapping[str, np.ndarray], settings: Settings
) -> TrainState:
    """A fresh state: float32 copies of ``params`` (the caller's arrays are never touched)."""
    params = {k: np.array(v, dtype=np.float32, copy=True) for k, v in params.items()}
    both = sorted(set(params) & set(frozen))
    if both:
        raise ValueError(f"tensors both trained and frozen: {both[:3]}")
    est = hizoo.init_hessian(params) if settings.estimator == "hizoo" else {}
    return TrainState(params, dict(frozen), optimizer(settings).init(params), est_state=est)


def _all_finite(*groups: Mapping[str, Any]) -> bool:
    for group in groups:
        for v in group.values():
            arr = np.asarray(v)
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                return False
    return True


def zo_step(
    engine: Engine,
    state: TrainState,
    batch: LabeledBatch,
    settings: Settings,
    *,
    scratch: Scratch | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """Run step ``state.step`` on ``batch``; return the next state and the step's record.

    The two halves are separate functions because that is where a step can be spread out:
    :func:`query_step` scores the perturbed rows (the only engine work) and returns scalars;
    :func:`apply_scalars` replays the update from those scalars and the seeds. A step whose
    losses or update are not finite is skipped (parameters and optimiser state unchanged) and
    counted in ``non_finite``. ``scratch`` (one per run) reuses the perturbed rows' memory
    between steps; it changes no result.
    """
    return apply_scalars(
        state, query_step(engine, state, batch, settings, scratch=scratch), settings
    )


def query_step(
    engine: Engine,
    state: TrainState,
    batch: LabeledBatch,
    settings: Settings,
    *,
    scratch: Scratch | None = None,
) -> QueryResult:
    """The scalars of step ``state.step`` on ``batch`` (the estimator alone, no update).

    An engine with a ``score_step(state, batch, settings)`` method (a pool of workers, see
    :mod:`zoo_ort.scale.ray_workers`) scores the whole step itself and returns its result.
    """
    score_step = getattr(engine, "score_step", None)
    if score_step is not None:
        return score_step(state, batch, settings)
    s, step = settings, state.step
    return evaluate_queries(
        engine,
        state.params,
        state.frozen,
        batch,
        run_seed=s.seed,
        step=step,
        q=s.queries,
        eps=s.eps,
        loss=s.loss,
        mode=s.estimator,
        row_budget=s.row_budget or None,
        scratch=scratch,
        scale=hizoo.inv_sqrt(state.est_state) if s.estimator == "hizoo" else None,
    )


def apply_scalars(
    state: TrainState, res: QueryResult, settings: Settings
) -> tuple[TrainState, dict[str, Any]]:
    """The next state and the step's record from the step's scalars (replayed from seeds)."""
    s, step = settings, state.step
    lr = make_schedule(s.schedule, s.lr, s.steps, s.warmup)(step - state.non_finite)
    new = advance(state, res.g, res.finite, s, res.curv)
    applied, non_finite = new.non_finite == state.non_finite, new.non_finite
    record: dict[str, Any] = {
        "kind": "step",
        "step": step + 1,
        "loss": res.loss,
        "loss_plus": float(res.loss_plus.mean()),
        **({"loss_minus": float(res.loss_minus.mean())} if res.loss_minus.size else {}),
        **({"loss_zero": res.loss_zero} if res.loss_zero is not None else {}),
        **({"loss_std": res.std} if res.std is not None else {}),
        "g": [float(x) for x in res.g],
        "lr": lr,
        "skipped": not applied,
        "non_finite": non_finite,
        "rows": res.rows,
        "forwards": res.forwards,
    }
    return new, record


def advance(
    state: TrainState,
    g: np.ndarray,
    finite: bool,
    settings: Settings,
    curv: np.ndarray | None = None,
) -> TrainState:
    """The state after step ``state.step`` from its scalars alone (``g``, HiZOO's ``curv``, and
    whether the losses were finite): what a worker replays to follow the driver's update."""
    params, opt_state, est, applied = state.params, state.opt_state, state.est_state, False
    if finite:
        grads, new_est = _replay(state, g, curv, settings)
        updates, new_opt = optimizer(settings).update(grads, state.opt_state, state.params)
        new_params = apply_updates(state.params, updates)
        if _all_finite(new_params, new_opt, new_est):
            params, opt_state, est, applied = new_params, new_opt, new_est, True
    return replace(
        state,
        params=params,
        opt_state=opt_state,
        est_state=est,
        step=state.step + 1,
        non_finite=state.non_finite + (not applied),
    )


def _replay(
    state: TrainState, g: np.ndarray, curv: np.ndarray | None, s: Settings
) -> tuple[Tensors, Tensors]:
    """``(gradient estimate, next estimator state)`` from the step's scalars and seeds."""
    if s.estimator == "hizoo":
        return hizoo.replay(
            state.params, state.est_state, g, curv, s.seed, state.step, s.hizoo_smooth
        )
    draw = "rademacher" if s.estimator == "fzoo" else "gaussian"
    return grad_from_scalars(state.params, g, s.seed, state.step, draw), state.est_state
