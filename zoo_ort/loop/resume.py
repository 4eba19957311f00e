"""A :class:`~zoo_ort.zo.step.TrainState` to a checkpoint and back, and the check that a resumed run
is the same run (settings that move parameters, initial adapter, model and data)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from zoo_ort.errors import ZooError
from zoo_ort.loop.checkpoint import Checkpoint, save_checkpoint, tensors_digest
from zoo_ort.settings import Settings, default_of
from zoo_ort.zo.optim import state_from_tensors, state_to_tensors
from zoo_ort.zo.step import TrainState


def run_identity(
    settings: Settings, state: TrainState, fingerprint: Mapping[str, Any] | None
) -> dict[str, Any]:
    """What a checkpoint records so that a resumption can be checked against it."""
    identity = {
        "config": settings.identity(),
        "init_digest": tensors_digest(state.params, state.frozen),
        "fingerprint": json.loads(json.dumps(dict(fingerprint or {}))),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return identity | {"identity_hash": digest}


def save_state(run_dir: Path, state: TrainState, identity: Mapping[str, Any], keep: int) -> None:
    info = dict(identity) | {
        "non_finite": state.non_finite,
        "best_metric": state.best_metric,
        "best_step": state.best_step,
        "finished": state.finished,
        "final_eval": state.final_eval,
        "data_position": state.step,  # batches(step) is the data order: the step is the position
    }
    # The estimator's state rides with the optimiser's under its own prefix (the checkpoint
    # format has no group for it; the prefix keeps the two apart on restore).
    opt = state_to_tensors(state.opt_state) | {EST + k: v for k, v in state.est_state.items()}
    ckpt = Checkpoint(state.step, state.params, opt, state.best_params, info)
    save_checkpoint(run_dir, ckpt, keep=keep)


def restore_state(
    run_dir: Path, ckpt: Checkpoint, fresh: TrainState, identity: Mapping[str, Any]
) -> TrainState:
    """``fresh`` (the run's initial state) advanced to the checkpoint, after checking identity."""
    _check_identity(run_dir, ckpt.info, identity)
    params = fresh.params
    if set(ckpt.params) != set(params) or any(
        ckpt.params[k].shape != params[k].shape for k in params
    ):
        raise ZooError(f"{run_dir}: the checkpoint's tensors do not match the adapter")
    info = ckpt.info
    opt = {k: v for k, v in ckpt.opt_state.items() if not k.startswith(EST)}
    return replace(
        fresh,
        params=ckpt.params,
        opt_state=state_from_tensors(opt, fresh.opt_state),
        est_state=_est_state(run_dir, ckpt.opt_state, fresh.est_state),
        step=ckpt.step,
        non_finite=int(info["non_finite"]),
        best_params=ckpt.best_params,
        best_metric=info.get("best_metric"),
        best_step=info.get("best_step"),
        finished=bool(info.get("finished")),
        final_eval=info.get("final_eval"),
    )


EST = "est/"  # checkpoint key prefix of TrainState.est_state tensors (in the "opt" group)


def _est_state(
    run_dir: Path, tensors: Mapping[str, Any], like: Mapping[str, Any]
) -> dict[str, Any]:
    """The saved estimator state, checked against the fresh one (names, shapes, dtypes)."""
    saved = {k[len(EST) :]: v for k, v in tensors.items() if k.startswith(EST)}
    if set(saved) != set(like) or any(
        saved[k].shape != like[k].shape or saved[k].dtype != like[k].dtype for k in like
    ):
        raise ZooError(f"{run_dir}: the checkpoint's estimator state does not match the estimator")
    return saved


def _differs(key: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    # A setting added after the checkpoint was written changes nothing at its default.
    if key not in old:
        return new[key] != default_of(key)
    return old[key] != new[key]


def _check_identity(run_dir: Path, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    if saved.get("identity_hash") == current["identity_hash"]:
        return
    old, new = saved.get("config", {}), current["config"]
    changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if _differs(k, old, new)]
    if changed:
        raise ZooError(
            f"{run_dir} was trained with other settings ({'; '.join(changed)}); resume with the "
            "original settings or choose a new run folder"
        )
    same_start = saved.get("init_digest") == current["init_digest"]
    if same_start and saved.get("fingerprint") == current["fingerprint"]:
        return  # only settings added since, at their defaults
    if not same_start:
        raise ZooError(
            f"{run_dir} was started from another bundle or initial adapter; resume with the "
            "original bundle or choose a new run folder"
        )
    raise ZooError(
        f"{run_dir} was started for another model/task ({saved.get('fingerprint')} vs "
        f"{current['fingerprint']}); resume with the original ones or choose a new run folder"
    )
