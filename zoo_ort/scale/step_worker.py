"""One Ray worker's side of a step (see :mod:`zoo_ort.scale.ray_workers`): no Ray import here,
the driver wraps :class:`StepWorker` in ``ray.remote``."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from zoo_ort.errors import ZooError
from zoo_ort.scale.shares import hizoo_scale, reply, score_rows, share_rows
from zoo_ort.settings import Settings
from zoo_ort.zo.step import TrainState, advance, init_state

Scalars = tuple[np.ndarray, bool, np.ndarray | None]  # (g, finite, curv): what a step applies


def state_digest(params: Mapping[str, np.ndarray], step: int, non_finite: int) -> str:
    """SHA-256 of the adapter's trained tensors and the step counters."""
    from zoo_ort.loop.checkpoint import tensors_digest

    return tensors_digest(params, {"counters": np.array([step, non_finite], np.int64)})


class StepWorker:
    """One worker: engine, data and a full training state of its own (run as a Ray actor).

    ``faults`` (tests only) maps a step to ``"die"`` (exit mid-step), ``"nan"`` (return NaN
    losses) or ``"drift"`` (move the adapter off the driver's).
    """

    def __init__(
        self,
        settings: Settings,
        worker: int,
        workers: int,
        share: str,
        faults: Mapping[int, str] | None = None,
    ) -> None:
        from zoo_ort.app.wiring import prepare

        p = prepare(settings)
        self.settings, self.engine, self.batches = settings, p.engine, p.batches()
        self.state = init_state(p.params, p.frozen, settings)
        self.share = (worker, workers, share)
        self.faults = dict(faults or {})

    def ready(self) -> int:
        return os.getpid()

    def load(self, state: TrainState) -> None:
        """Continue from ``state`` (a resumed run's; sent once, never per step)."""
        self.state = state

    def replay(self, history: list[Scalars]) -> None:
        for scalars in history:
            self.state = advance(self.state, scalars[0], scalars[1], self.settings, scalars[2])

    def step(
        self, pending: Scalars | None, step: int | None, digest: bool
    ) -> tuple[np.ndarray | None, str | None, float]:
        """Apply the previous step's scalars, then score this step's share (``step`` None:
        apply only). Returns ``(losses of the share, digest or None, seconds spent)``."""
        t0 = time.perf_counter()
        if pending is not None:
            self.replay([pending])
        fault = self.faults.pop(self.state.step, None) if step is not None else None
        if fault == "die":
            os._exit(1)  # a crash mid-step: no reply, the actor is gone
        if fault == "drift":
            params = {k: v + np.float32(1e-3) for k, v in self.state.params.items()}
            self.state = replace(self.state, params=params)
        s, state = self.settings, self.state
        tag = state_digest(state.params, state.step, state.non_finite) if digest else None
        if step is None:
            return None, tag, time.perf_counter() - t0
        if state.step != step:
            raise ZooError(f"worker at step {state.step} was asked for step {step}")
        batch = self.batches(step)
        rows = share_rows(s.estimator, s.queries, batch.size, self.share[2], *self.share[:2])
        losses = None
        if rows.size:
            scale = hizoo_scale(s, state.est_state)
            losses = score_rows(
                self.engine, state.params, state.frozen, batch, s, step, rows, scale
            )
            if fault == "nan":
                losses[0] = np.nan
            losses = reply(losses, self.share[2], batch.size)
        return losses, tag, time.perf_counter() - t0
