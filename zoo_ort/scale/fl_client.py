"""A federated client without Flower: its shard, its fingerprint and one round's work.

The message contents are plain dicts of str/int/float/list values (what a Flower ConfigRecord
carries); :mod:`zoo_ort.scale.fl_apps` moves them. Replies never carry tensors: only the round's
scalars, an example count and digests.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from zoo_ort.loop.checkpoint import tensors_digest
from zoo_ort.scale.fl_core import (
    Pairs,
    client_seed,
    dirichlet_split,
    federation_fingerprint,
    local_steps,
    replay,
    state_digest,
    subset,
)
from zoo_ort.settings import Settings
from zoo_ort.zo.step import TrainState, init_state

# Test and drill hooks: how a client misbehaves (see FedClient.fault).
FAULTS = ("drop", "nan", "inf", "huge", "settings")


def manifest_sha256(bundle: Any) -> str:
    return hashlib.sha256((bundle.path / "manifest.json").read_bytes()).hexdigest()


def unflatten(flat: list[float], q: int) -> list[list[float]]:
    return [list(flat[i : i + q]) for i in range(0, len(flat), q)] if q else []


def flatten(rows: list[list[float]] | None) -> list[float]:
    return [float(x) for row in rows or [] for x in row]


@dataclass
class FedClient:
    """One client: the bundle's engine and initial adapter, and its shard of the train split.

    ``partition`` of ``num_partitions`` picks the shard of the Dirichlet(``alpha``) split (with
    ``num_partitions`` 1 the whole local train split is the shard: a real device's own data).
    ``fault`` makes the client misbehave for tests and drills: ``"drop"`` fails mid-round,
    ``"nan"``/``"inf"``/``"huge"`` poison its scalars, ``"settings"`` trains with another lr.
    """

    settings: Settings
    partition: int
    num_partitions: int
    alpha: float
    local_steps: int
    engine: Any = None
    fault: str | None = None
    seeds: str = "distinct"  # must match the server's (it is in the fingerprint)

    def __post_init__(self) -> None:
        from zoo_ort.app.wiring import prepare
        from zoo_ort.tasks.sampler import make_batch_fn

        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r} (one of {', '.join(FAULTS)})")
        if self.fault == "settings":
            self.settings = replace(self.settings, lr=self.settings.lr * 2)
        p = prepare(self.settings, engine=self.engine)
        self.engine = p.engine
        train = p.train_data
        if self.num_partitions > 1:
            shards = dirichlet_split(
                train.labels, len(train), self.num_partitions, self.alpha, self.settings.seed
            )
            train = subset(train, shards[self.partition])
        self.shard = train
        self.initial = init_state(p.params, p.frozen, self.settings)
        self.fingerprint = federation_fingerprint(
            self.settings,
            manifest_sha256(p.bundle),
            tensors_digest(p.params, p.frozen),
            self.local_steps,
            self.seeds,
        )
        seed = client_seed(self.settings.seed, self.partition)
        self.batches = make_batch_fn(
            train, self.settings.batch_size, seed, sampler=self.settings.sampler
        )

    def hello(self) -> dict[str, Any]:
        return {
            "partition": self.partition,
            "fingerprint": self.fingerprint,
            "examples": len(self.shard),
        }

    def rebuild(self, cached: TrainState | None, pairs: Pairs) -> TrainState | None:
        """The global state after ``pairs``, from ``cached`` or the initial adapter; ``None``
        when neither is where the pairs start (the server must send more history)."""
        start = cached if cached is not None and cached.step == pairs.first else None
        if start is None and pairs.first == 0:
            start = self.initial
        return None if start is None else replay(start, pairs, self.settings)

    def round(
        self, payload: dict[str, Any], cached: TrainState | None
    ) -> tuple[dict[str, Any], TrainState | None]:
        """One round: ``(reply, the global state to cache)``; see :mod:`zoo_ort.scale.fl_core`."""
        base = {"partition": self.partition, "fingerprint": self.fingerprint}
        if payload.get("fingerprint") != self.fingerprint:
            return base | {"status": "refused"}, cached
        pairs = self._pairs(payload)
        state = self.rebuild(cached, pairs)
        have = -1 if cached is None else cached.step
        if state is None or state.step != int(payload["step"]):
            return base | {"status": "resync", "have": have}, cached
        digest = state_digest(state)
        if digest != payload["digest"]:
            # Our cache is not the server's history (a restart of either side): start over.
            return base | {"status": "resync", "have": -1}, None
        # Local steps from the global state, at this client's block of step indices: its own
        # directions (distinct seeds) or the round's shared ones.
        block = int(payload.get("block", state.step))
        gs, curv, loss, rows = local_steps(
            self.engine,
            replace(state, step=block),
            self.batches,
            self.settings,
            int(payload["local_steps"]),
        )
        gs = self._poison(gs)
        reply = base | {
            "status": "ok",
            "step": state.step,
            "examples": len(self.shard),
            "g": flatten(gs),
            "digest": digest,
            "loss": loss,
            "rows": rows,
        }
        if curv is not None:
            reply["curv"] = flatten(curv)
        return reply, state

    def sync(
        self, payload: dict[str, Any], cached: TrainState | None
    ) -> tuple[dict[str, Any], TrainState | None]:
        """Rebuild the global adapter from the pairs (no training): ``(reply with its digest,
        the state to cache)``. The server's end-of-run check that clients hold its adapter."""
        base = {"partition": self.partition, "fingerprint": self.fingerprint}
        if payload.get("fingerprint") != self.fingerprint:
            return base | {"status": "refused"}, cached
        pairs = self._pairs(payload)
        state = self.rebuild(cached, pairs)
        if state is None or state.step != int(payload["step"]):
            have = -1 if cached is None else cached.step
            return base | {"status": "resync", "have": have}, cached
        return base | {"status": "ok", "step": state.step, "digest": state_digest(state)}, state

    def _pairs(self, payload: dict[str, Any]) -> Pairs:
        q = self.settings.queries
        hizoo = self.settings.estimator == "hizoo"
        return Pairs(
            int(payload["sync_from"]),
            unflatten(list(payload["g"]), q),
            unflatten(list(payload["curv"]), q) if hizoo else None,
        )

    def _poison(self, gs: list[list[float]]) -> list[list[float]]:
        if self.fault == "drop":
            raise RuntimeError(f"client {self.partition} dropped out mid-round (drill)")
        bad = {"nan": float("nan"), "inf": float("inf"), "huge": 1e30}.get(self.fault or "")
        if bad is None:
            return gs
        out = [list(row) for row in gs]
        out[0][0] = bad
        return out


def state_to_arrays(state: TrainState) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """A client's cached global state as arrays + ints (for Flower's ``context.state``)."""
    from zoo_ort.zo.optim import state_to_tensors

    arrays = {f"p/{k}": v for k, v in state.params.items()}
    arrays |= {f"o/{k}": v for k, v in state_to_tensors(state.opt_state).items()}
    arrays |= {f"e/{k}": v for k, v in state.est_state.items()}
    return arrays, {"step": state.step, "non_finite": state.non_finite}


def state_from_arrays(
    fresh: TrainState, arrays: dict[str, np.ndarray], meta: dict[str, int]
) -> TrainState:
    from zoo_ort.zo.optim import state_from_tensors

    def group(prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}

    return replace(
        fresh,
        params=group("p/"),
        opt_state=state_from_tensors(group("o/"), fresh.opt_state),
        est_state=group("e/"),
        step=int(meta["step"]),
        non_finite=int(meta["non_finite"]),
    )
