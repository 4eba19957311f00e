"""The training loop: P-RGE steps, evaluation, checkpoints, resume, metrics.

The loop knows nothing of the model: it sees an :class:`~zoo_ort.batch.Engine`, parameter dicts,
a ``batches(step)`` callable and a few injected callables (evaluate, save_adapter, on_step,
should_stop). All randomness is derived from ``config.seed`` and the step number (directions in
:mod:`zoo_ort.estimator`, data by the caller's ``batches``), so the full training state is
(params, optimiser state, counters) and a resumed run is bit-identical to an uninterrupted one.

Run folder::

    checkpoints/   see :mod:`zoo_ort.checkpoint`
    metrics.jsonl  see :mod:`zoo_ort.metrics`
    final/         save_adapter(params) at the end
    best/          save_adapter(best params) whenever the dev metric improves, and at the end
"""

from __future__ import annotations

import hashlib
import json
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from zoo_ort.batch import Engine
from zoo_ort.checkpoint import Checkpoint, load_latest, save_checkpoint, tensors_digest
from zoo_ort.errors import ZooError
from zoo_ort.estimator import LOSSES, MODES, evaluate_queries, grad_from_scalars
from zoo_ort.labeled import LabeledBatch
from zoo_ort.metrics import METRICS, MetricsLog, jsonable
from zoo_ort.optim import (
    OPTIMIZERS,
    SCHEDULES,
    apply_updates,
    make_optimizer,
    make_schedule,
    state_from_tensors,
    state_to_tensors,
)
from zoo_ort.scratch import Scratch

__all__ = ["LabeledBatch", "TrainConfig", "TrainResult", "train", "FINAL_DIR", "BEST_DIR"]

FINAL_DIR = "final"
BEST_DIR = "best"

# Fields that may change between a run and its resumption: they do not affect the parameters.
RESUME_SAFE = frozenset({"save_every", "keep_checkpoints", "max_non_finite"})


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimisation steps
    lr: float = 1e-4  # peak learning rate
    eps: float = 1e-3  # perturbation scale ε
    queries: int = 4  # q directions per step
    batch_size: int = 16  # B examples per step (the caller's batches() makes them; recorded)
    optimizer: str = "sgd"  # sgd | adam | sign
    momentum: float = 0.0  # sgd / sign momentum
    betas: tuple[float, float] = (0.9, 0.999)  # adam
    adam_eps: float = 1e-8
    schedule: str = "constant"  # constant | linear | cosine (decay to 0 after warm-up)
    warmup: int = 0  # linear warm-up steps
    weight_decay: float = 0.0  # adam: decoupled (AdamW); sgd/sign: L2 on the estimate
    seed: int = 0  # run seed: directions are SeedSequence([seed, step, query])
    mode: str = "batched"  # batched (P-RGE: 2qB rows per forward) | sequential (MeZO: 2q x B)
    row_budget: int | None = None  # batched: most rows per forward (None: all 2qB)
    loss: str = "lm"  # lm (EngineOutput.loss) | candidates (CE over candidates, needs labels)
    save_every: int = 100  # checkpoint every k steps (0: only at the end / on stop)
    keep_checkpoints: int = 2
    eval_every: int = 0  # evaluate every k steps (0: only at the end); needs evaluate=
    eval_at_start: bool = False  # also evaluate the initial parameters (step 0)
    best_metric: str = "accuracy"  # key of evaluate()'s dict that picks the `best` adapter
    best_mode: str = "max"  # max | min
    max_non_finite: int = 10  # abort after more skipped (non-finite) steps than this

    def validate(self) -> TrainConfig:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ZooError(f"bad training setting: {msg}")

        need(self.steps >= 1, f"steps must be >= 1 (got {self.steps})")
        need(self.lr >= 0, f"lr must be >= 0 (got {self.lr})")
        need(self.eps > 0, f"eps must be > 0 (got {self.eps})")
        need(self.queries >= 1, f"queries must be >= 1 (got {self.queries})")
        need(self.batch_size >= 1, f"batch_size must be >= 1 (got {self.batch_size})")
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}")
        need(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}")
        need(self.mode in MODES, f"mode must be one of {', '.join(MODES)}")
        need(self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}")
        need(self.best_mode in ("max", "min"), "best_mode must be max or min")
        need(self.warmup >= 0, "warmup must be >= 0")
        need(0.0 <= self.momentum < 1.0, "momentum must be in [0, 1)")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas in [0, 1)")
        need(self.row_budget is None or self.row_budget >= 1, "row_budget must be >= 1")
        need(self.save_every >= 0 and self.eval_every >= 0, "save/eval_every must be >= 0")
        need(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
        need(self.seed >= 0, "seed must be >= 0")
        need(self.max_non_finite >= 0, "max_non_finite must be >= 0")
        return self

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build from e.g. a TOML table; unknown keys and wrong types are a ZooError."""
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ZooError(
                f"unknown training setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            kwargs[key] = _coerce(key, value, hints[key])
        return cls(**kwargs).validate()

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the original."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUME_SAFE}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    bad = ZooError(f"training setting {key}: {value!r} is not a valid {hint}")
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    if hint == (int | None):
        if value is None:
            return None
        return _coerce(key, value, int)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise bad
        return tuple(_coerce(key, v, float) for v in value)
    raise bad


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


def _all_finite(*groups: Mapping[str, Any]) -> bool:
    for group in groups:
        for v in group.values():
            arr = np.asarray(v)
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                return False
    return True


def _copy(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.array(v, copy=True) for k, v in params.items()}


def train(
    engine: Engine,
    params: Mapping[str, np.ndarray],
    frozen: Mapping[str, np.ndarray],
    batches: Callable[[int], LabeledBatch],
    config: TrainConfig,
    run_dir: str | Path,
    *,
    evaluate: Callable[[dict[str, np.ndarray]], Mapping[str, Any]] | None = None,
    save_adapter: Callable[[dict[str, np.ndarray], Mapping[str, np.ndarray], Path], None]
    | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = False,
    should_stop: Callable[[], bool] | None = None,
    fingerprint: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train the ``params`` (per-row LoRA tensors) with P-RGE; ``frozen`` ones are shared.

    ``batches(step)`` must return the same :class:`LabeledBatch` for the same step (derive it
    from the seed and the step) — the data position is then just the step number.
    ``evaluate(lora)`` receives the full LoRA tensors (``{**frozen, **params}``, no row dim) and
    returns metrics such as ``{"accuracy": .., "loss": ..}``; it decides the split and must use
    a dev split, never test: ``config.best_metric`` of its result picks the ``best`` adapter.
    ``save_adapter(params, frozen, folder)`` writes an adapter (``run_dir/final``,
    ``run_dir/best``). ``fingerprint`` (JSON-able, e.g. bundle and task names) must match on
    resume. With ``resume`` the run continues from ``run_dir``'s latest checkpoint (or starts
    fresh when there is none); without it, a ``run_dir`` that holds a checkpoint is refused.
    """
    config.validate()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    params = {k: np.array(v, dtype=np.float32, copy=True) for k, v in params.items()}
    frozen = dict(frozen)
    opt = make_optimizer(
        config.optimizer,
        config.lr,
        config.schedule,
        config.warmup,
        config.steps,
        config.weight_decay,
        config.momentum,
        config.betas,
        config.adam_eps,
    )
    schedule = make_schedule(config.schedule, config.lr, config.steps, config.warmup)
    identity = {
        "config": config.identity(),
        "init_digest": tensors_digest(params, frozen),
        "fingerprint": json.loads(json.dumps(dict(fingerprint or {}))),
    }
    identity["identity_hash"] = hashlib.sha256(
        json.dumps(identity, sort_keys=True).encode()
    ).hexdigest()
    log = MetricsLog(run_dir / METRICS)

    opt_state = opt.init(params)
    start, non_finite, finished = 0, 0, False
    best_params: dict[str, np.ndarray] | None = None
    best_metric: float | None = None
    best_step: int | None = None
    final_eval: dict[str, Any] | None = None
    ckpt = load_latest(run_dir)
    if ckpt is not None and not resume:
        raise ZooError(
            f"{run_dir} already holds a run (checkpoint at step {ckpt.step}); resume it or "
            "choose a new run folder"
        )
    if ckpt is not None:
        _check_identity(run_dir, ckpt.info, identity)
        if set(ckpt.params) != set(params) or any(
            ckpt.params[k].shape != params[k].shape for k in params
        ):
            raise ZooError(f"{run_dir}: the checkpoint's tensors do not match the adapter")
        params = ckpt.params
        opt_state = state_from_tensors(ckpt.opt_state, opt_state)
        start = ckpt.step
        non_finite = int(ckpt.info["non_finite"])
        best_params = ckpt.best_params
        best_metric = ckpt.info.get("best_metric")
        best_step = ckpt.info.get("best_step")
        finished = bool(ckpt.info.get("finished"))
        final_eval = ckpt.info.get("final_eval")
    log.truncate_after(start if ckpt is not None else -1)

    def checkpoint(step: int, done: bool = False) -> None:
        info = identity | {
            "non_finite": non_finite,
            "best_metric": best_metric,
            "best_step": best_step,
            "finished": done,
            "final_eval": final_eval,
            "data_position": step,  # batches(step) is the data order: the step is the position
        }
        save_checkpoint(
            run_dir,
            Checkpoint(step, params, state_to_tensors(opt_state), best_params, info),
            keep=config.keep_checkpoints,
        )

    def run_eval(step: int) -> dict[str, Any]:
        nonlocal best_params, best_metric, best_step
        t0 = time.perf_counter()
        raw = dict(evaluate({**frozen, **params}))
        metrics = jsonable(raw)
        log.append({"step": step, "eval": metrics, "eval_s": time.perf_counter() - t0})
        value = raw.get(config.best_metric)
        if not isinstance(value, (int, float, np.floating, np.integer)):
            raise ZooError(
                f"evaluation returned no numeric {config.best_metric!r} (got "
                f"{', '.join(sorted(metrics))}); set best_metric to one of those"
            )
        value = float(value)
        better = best_metric is None or (
            value > best_metric if config.best_mode == "max" else value < best_metric
        )
        if better and np.isfinite(value):
            best_params, best_metric, best_step = _copy(params), value, step
            if save_adapter is not None:
                save_adapter(best_params, frozen, run_dir / BEST_DIR)
        return metrics

    history: list[dict[str, Any]] = []
    stopped = False
    scratch = Scratch()  # the perturbed rows' memory, reused by every step
    if not finished:
        if ckpt is None and evaluate is not None and config.eval_at_start:
            metrics = run_eval(0)
            if on_step is not None:
                on_step({"kind": "eval", "step": 0, "eval": metrics})
        for step in range(start, config.steps):
            if should_stop is not None and should_stop():
                if ckpt is None or ckpt.step != step:
                    checkpoint(step)
                stopped = True
                break
            t0 = time.perf_counter()
            batch = batches(step)
            lr = schedule(step - non_finite)
            res = evaluate_queries(
                engine,
                params,
                frozen,
                batch,
                run_seed=config.seed,
                step=step,
                q=config.queries,
                eps=config.eps,
                loss=config.loss,  # type: ignore[arg-type]
                mode=config.mode,  # type: ignore[arg-type]
                row_budget=config.row_budget,
                scratch=scratch,
            )
            applied = False
            if res.finite:
                grads = grad_from_scalars(params, res.g, config.seed, step)
                updates, new_state = opt.update(grads, opt_state, params)
                new_params = apply_updates(params, updates)
                if _all_finite(new_params, new_state):
                    params, opt_state, applied = new_params, new_state, True
            if not applied:
                non_finite += 1
            dt = time.perf_counter() - t0
            done = step + 1
            record: dict[str, Any] = {
                "kind": "step",
                "step": done,
                "loss": res.loss,
                "loss_plus": float(res.loss_plus.mean()),
                "loss_minus": float(res.loss_minus.mean()),
                "g": [float(x) for x in res.g],
                "lr": lr,
                "skipped": not applied,
                "non_finite": non_finite,
                "rows": res.rows,
                "forwards": res.forwards,
                "rows_per_s": res.rows / dt if dt > 0 else None,
                "step_time": dt,
            }
            log.append(record)
            if non_finite > config.max_non_finite:
                raise ZooError(
                    f"{non_finite} steps had non-finite losses or updates (limit "
                    f"{config.max_non_finite}); lower lr or eps. The last checkpoint is intact."
                )
            last = done == config.steps
            if evaluate is not None and (
                last or (config.eval_every and done % config.eval_every == 0)
            ):
                record = record | {"eval": run_eval(done)}
                if last:
                    final_eval = record["eval"]
            history.append(record)
            if on_step is not None:
                on_step(record | {"steps_per_s": 1.0 / dt if dt > 0 else None})
            if config.save_every and done % config.save_every == 0 and done != config.steps:
                checkpoint(done)
        else:
            if evaluate is not None and final_eval is None:  # only if the loop had no steps
                final_eval = run_eval(config.steps)
            checkpoint(config.steps, done=True)
            finished = True
    if finished and save_adapter is not None:
        save_adapter(params, frozen, run_dir / FINAL_DIR)
        if best_params is not None:
            save_adapter(best_params, frozen, run_dir / BEST_DIR)
    end = config.steps if finished else (history[-1]["step"] if history else start)
    return TrainResult(
        params=params,
        step=end,
        stopped=stopped,
        non_finite=non_finite,
        best_params=best_params,
        best_metric=best_metric,
        best_step=best_step,
        final_eval=final_eval,
        run_dir=run_dir,
        history=history,
    )


def _check_identity(run_dir: Path, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    if saved.get("identity_hash") == current["identity_hash"]:
        return
    old, new = saved.get("config", {}), current["config"]
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in new if old.get(k) != new.get(k)]
    if changed:
        raise ZooError(
            f"{run_dir} was trained with other settings ({'; '.join(changed)}); resume with the "
            "original settings or choose a new run folder"
        )
    if saved.get("init_digest") != current["init_digest"]:
        raise ZooError(
            f"{run_dir} was started from another bundle or initial adapter; resume with the "
            "original bundle or choose a new run folder"
        )
    raise ZooError(
        f"{run_dir} was started for another model/task ({saved.get('fingerprint')} vs "
        f"{current['fingerprint']}); resume with the original ones or choose a new run folder"
    )
