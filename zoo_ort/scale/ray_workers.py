"""Training over ``N`` Ray actors: each scores its share of every step, all replay the update.

Each worker (:class:`StepWorker`, a Ray actor) is built from the settings alone: its own
:class:`~zoo_ort.engine.ort.OrtEngine` (session, threads, provider flags), data, initial adapter
and optimiser state, from the bundle path. Per step the driver sends each worker a header
``(scalars of the previous step, step, digest wanted?)``; the worker replays the previous update
from seeds, scores its rows of this step (:mod:`zoo_ort.scale.shares`) and returns their
losses. The driver combines them into the single process's scalars, and the unchanged loop
(:func:`zoo_ort.loop.train.train`) applies them: :class:`WorkerPool` is the engine it is given,
and :func:`zoo_ort.zo.step.query_step` hands whole steps to its ``score_step``. Evaluation,
checkpoints, adapters and metrics are the driver's, exactly as in a single-process run.

Faults: a worker that dies is replaced by a new actor that replays the scalars of every step
so far (no weights are sent) and scores the step again; a worker's NaN makes the step
non-finite, skipped and counted like any other; workers report a digest of their adapter every
``digest_every`` steps and at the end, and a mismatch stops the run.
"""

from __future__ import annotations

import contextlib
import pickle
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from zoo_ort.errors import ZooError
from zoo_ort.scale.shares import SHARES, combine, share_rows
from zoo_ort.scale.step_worker import Scalars, StepWorker, state_digest
from zoo_ort.settings import Settings
from zoo_ort.zo.estimators import QueryResult
from zoo_ort.zo.step import TrainState

RAY_HINT = "pip install 'zoo-ort[ray]'"


def import_ray() -> Any:
    """Ray, or a one-line ZooError naming the extra."""
    try:
        import ray
    except ImportError:
        raise ZooError(f"--workers needs Ray, an optional extra: {RAY_HINT}") from None
    return ray


class WorkerPool:
    """The engine the loop is given: steps go to the workers, ``forward`` (evaluation) to the
    driver's own engine ``local``."""

    def __init__(
        self,
        settings: Settings,
        local: Any,
        workers: int,
        share: str = "query",
        *,
        digest_every: int = 10,
        worker_threads: int | None = None,
        worker_cpus: float = 1,
        max_replacements: int = 3,
        faults: Mapping[int, Mapping[int, str]] | None = None,
    ) -> None:
        if workers < 1:
            raise ZooError(f"--workers must be >= 1 (got {workers})")
        if share not in SHARES:
            raise ZooError(f"unknown share {share!r}; use one of {', '.join(SHARES)}")
        ray = import_ray()
        self._ray, self._local, self.settings = ray, local, settings
        self.share, self.digest_every = share, max(0, int(digest_every))
        # Threads are per worker: without a setting, one ORT thread per CPU the actor reserves
        # rather than every core of the node for each of them.
        threads = worker_threads or settings.threads or max(1, int(worker_cpus))
        self._worker_settings = replace(settings, threads=threads)
        self._cls = ray.remote(num_cpus=worker_cpus, max_restarts=0)(StepWorker)
        self._faults = {int(w): dict(f) for w, f in (faults or {}).items()}
        self.actors = [self._spawn(w, workers) for w in range(workers)]
        self.pids = ray.get([a.ready.remote() for a in self.actors])
        self._base: TrainState | None = None  # a resumed state the workers were loaded with
        self._history: list[Scalars] = []  # scalars applied since the base (replacements)
        self._pending: Scalars | None = None  # the last step's scalars, sent with the next
        self._next = 0  # the step the workers are at once they apply the pending scalars
        self.replacements, self.max_replacements = 0, max_replacements
        self.stats: list[dict[str, float]] = []

    def _spawn(self, w: int, n: int, faults: Mapping[int, str] | None = None) -> Any:
        faults = self._faults.pop(w, None) if faults is None else faults
        return self._cls.remote(self._worker_settings, w, n, self.share, faults)

    # -- the Engine protocol (evaluation) and what describe() asks of an engine ---------------
    def forward(self, batch: Any, lora: Mapping[str, np.ndarray]) -> Any:
        return self._local.forward(batch, lora)

    @property
    def active_providers(self) -> list[str]:
        return list(getattr(self._local, "active_providers", ["custom engine"]))

    # -- a step ----------------------------------------------------------------------------------
    def score_step(self, state: TrainState, batch: Any, settings: Settings) -> QueryResult:
        """Step ``state.step``'s scalars, scored by the workers (see the module doc)."""
        ray, step, t0 = self._ray, state.step, time.perf_counter()
        if step != self._next:  # a resumed run: the workers continue from the driver's state
            self._base, self._history, self._pending = state, [], None
            ray.get([a.load.remote(state) for a in self.actors])
            self._next = step
        want = bool(self.digest_every) and step % self.digest_every == 0
        header = (self._pending, step, want)
        replies = self._gather(header)
        if want:
            self._check_digests(replies, state.params, step, state.non_finite)
        n = len(self.actors)
        parts = [
            (share_rows(settings.estimator, settings.queries, batch.size, self.share, w, n), r[0])
            for w, r in enumerate(replies)
            if r[0] is not None
        ]
        res = combine(parts, settings, batch.size, self.share)
        if self._pending is not None:
            self._history.append(self._pending)
        self._pending, self._next = (res.g, res.finite, res.curv), step + 1
        header_bytes = len(pickle.dumps(header))
        self.stats.append(
            {
                "step": step + 1,
                "sent_bytes": header_bytes,  # per worker: every worker gets the same header
                "received_bytes": max(len(pickle.dumps(r)) for r in replies),
                "worker_s": max(r[2] for r in replies),
                "wall_s": time.perf_counter() - t0,
            }
        )
        return res

    def _gather(self, header: tuple) -> list[tuple]:
        """Every worker's reply to ``header``; a worker that died is replaced and asked again."""
        ray = self._ray
        refs = [a.step.remote(*header) for a in self.actors]
        replies = []
        for w, ref in enumerate(refs):
            while True:
                try:
                    replies.append(ray.get(ref))
                    break
                except ray.exceptions.RayActorError as e:
                    self._replace(w, e)
                    ref = self.actors[w].step.remote(*header)
        return replies

    def _replace(self, w: int, error: Exception) -> None:
        if self.replacements >= self.max_replacements:
            raise ZooError(
                f"worker {w} died and {self.replacements} workers were replaced already: {error}"
            )
        self.replacements += 1
        ray, old = self._ray, self.actors[w]
        ray.kill(old, no_restart=True)
        new = self._spawn(w, len(self.actors), faults={})
        ray.get(new.ready.remote())
        # Catch up from seeds: the resumed base (if any), then every step's scalars since.
        if self._base is not None:
            ray.get(new.load.remote(self._base))
        if self._history:
            ray.get(new.replay.remote(self._history))
        self.actors[w] = new

    def _check_digests(self, replies: list[tuple], params: Any, step: int, nf: int) -> None:
        mine = state_digest(params, step, nf)
        bad = [w for w, r in enumerate(replies) if r[1] != mine]
        if bad:
            raise ZooError(
                f"worker(s) {', '.join(map(str, bad))} hold a different adapter than the driver "
                f"at step {step} (digest {str(replies[bad[0]][1])[:12]} != {mine[:12]}); "
                "stopping the run (the last checkpoint is intact)"
            )

    def finish(self, result: Any) -> dict[str, Any]:
        """Apply the last scalars on the workers, check that they hold the final adapter, and
        report what the run sent (merged into the run's summary)."""
        if self._pending is not None:
            replies = self._gather((self._pending, None, True))
            self._history.append(self._pending)
            self._pending = None
            self._check_digests(replies, result.params, result.step, result.non_finite)
        return {"workers": self.report()}

    def close(self) -> None:
        for a in self.actors:
            self._ray.kill(a, no_restart=True)
        self.actors = []

    def report(self) -> dict[str, Any]:
        """Per-step means of what zoo-ort sent and received per worker, and the time split."""
        if not self.stats:
            return {"workers": len(self.actors), "steps": 0, "replacements": self.replacements}
        mean = {k: float(np.mean([s[k] for s in self.stats])) for k in self.stats[0]}
        mean.pop("step")
        return {
            "steps": len(self.stats),
            "replacements": self.replacements,
            **mean,
            "per_step": list(self.stats),
        }


def connect(ray_address: str | None, num_cpus: int | None = None) -> bool:
    """Join the cluster at ``ray_address``, or start a local one; False if Ray was already up."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    if ray_address:
        ray.init(address=ray_address, include_dashboard=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    return True


def train_with_workers(
    settings: Settings,
    *,
    workers: int,
    share: str = "query",
    ray_address: str | None = None,
    resume: bool = False,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    **pool_options: Any,
) -> dict[str, Any]:
    """:func:`zoo_ort.app.wiring.train_run` with the steps spread over ``workers`` Ray actors
    (``share`` ``"query"`` or ``"example"``); same run folder, same summary, plus ``"workers"``
    (:meth:`WorkerPool.report`). ``pool_options`` go to :class:`WorkerPool`."""
    from zoo_ort.app.wiring import train_run

    if share not in SHARES:
        raise ZooError(f"unknown --share {share!r}; use one of {', '.join(SHARES)}")
    import_ray()  # before any work: without the extra this is the whole error

    @contextlib.contextmanager
    def pool_scope(p: Any) -> Iterator[WorkerPool]:
        cpus = pool_options.get("worker_cpus", 1)
        started_ray = connect(ray_address, None if ray_address else max(1, int(workers * cpus)))
        pool = None
        try:
            pool = WorkerPool(settings, p.engine, workers, share, **pool_options)
            pool.note = f"; {workers} Ray workers sharing by {share}"
            yield pool
        finally:
            if pool is not None:
                pool.close()
            if started_ray:
                import_ray().shutdown()

    return train_run(
        settings, resume=resume, on_event=on_event, should_stop=should_stop, engine_scope=pool_scope
    )
