"""Federated zeroth-order training without Flower: the parts that must be exact.

The global adapter is defined by the sequence of aggregated step scalars: global step ``t``
replays ``g_t`` (``q`` float64 values, plus HiZOO's curvatures) along the directions of
``SeedSequence([seed, t, i])`` through :func:`zoo_ort.zo.step.apply_scalars`, so a client that
holds the pairs rebuilds the server's adapter bit for bit. A round:

1. the server names the round's global step ``t`` and gives each of the ``M`` sampled clients a
   block of step indices: with **distinct** seeds (the default, FedKSeed-style) client ``j`` (in
   partition order) gets ``t + j·s .. t + j·s + s - 1``; with **shared** seeds (DeComFL-style)
   every client gets ``t .. t + s - 1``. It sends each the pairs it has not seen yet and the
   digest of the global adapter at ``t``;
2. the client replays them (its cached global state at an earlier step, else the bundle's
   initial adapter), checks the digest, then runs ``s`` ordinary ``zo_step`` s from that state on
   its own shard, at its block's step indices (so along its block's directions), and returns
   only its ``s`` scalar vectors and its example count;
3. the server screens the replies (:func:`screen`). Shared seeds: it averages the scalars
   weighted by examples in client order (:func:`aggregate`) and replays ``s`` steps. Distinct
   seeds: it replays all ``M·s`` steps, client ``j``'s scaled by ``M·n_j/N`` (examples
   ``n_j`` of ``N`` accepted, so an even split scales by 1), and a dropped or rejected client's
   block as zero moves (:func:`aggregate_blocks`). Distinct seeds move the adapter along
   ``M·s`` directions a round instead of ``s``: at equal forward passes, as many directions as
   centralised training.

Everything here is numpy; :mod:`zoo_ort.scale.fl_apps` carries these dicts over Flower.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from zoo_ort.loop.checkpoint import tensors_digest
from zoo_ort.settings import RESUME_SAFE, Settings
from zoo_ort.zo.estimators import QueryResult
from zoo_ort.zo.step import TrainState, apply_scalars, query_step

PROTOCOL = "zoo-ort-fl/2"
SEEDS = ("distinct", "shared")
SPLIT_TAG = 0xF1D5  # keeps the shard split's random stream apart from data order and directions
SAMPLE_TAG = 0xF15A
CLIENT_TAG = 0xF1C1
# Where the data lives is each device's own business; every other setting moves parameters.
_NOT_FINGERPRINTED = RESUME_SAFE | {"data"}


# -- shards ----------------------------------------------------------------------------------


def dirichlet_split(
    labels: np.ndarray | None, n: int, clients: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """``clients`` disjoint, sorted index arrays covering ``range(n)``, non-IID over labels.

    For each label, client shares are drawn from Dirichlet(α·1): small α gives each client a
    few labels, large α approaches an even IID split. Unlabelled (LM) data is one label. Draws
    are repeated (from the same seeded stream) until every client holds an example, so the split
    is a pure function of (labels, clients, α, seed).
    """
    if clients < 1 or n < clients:
        raise ValueError(f"cannot split {n} examples over {clients} clients")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (got {alpha})")
    labels = np.zeros(n, dtype=np.int64) if labels is None else np.asarray(labels)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), SPLIT_TAG]))
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for label in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == label))
            share = rng.dirichlet(np.full(clients, float(alpha)))
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(np.int64)
            for c, piece in enumerate(np.split(idx, cuts)):
                parts[c].append(piece)
        shards = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(s) for s in shards) > 0:
            return shards
    raise ValueError(f"no Dirichlet({alpha}) split gives all {clients} clients an example")


def subset(data: Any, indices: np.ndarray) -> Any:
    """The :class:`~zoo_ort.tasks.dataset.TaskData` of ``indices`` (re-packed, same spec)."""
    idx = np.asarray(indices, dtype=np.int64)
    seqs = [data.example(int(i)) for i in idx]
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in seqs])
    tokens = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
    labels = None if data.labels is None else data.labels[idx]
    return replace(data, tokens=tokens, offsets=offsets, first=data.first[idx], labels=labels)


def client_seed(seed: int, partition: int) -> int:
    """The data-order seed of a client's shard (its batches never follow another's order)."""
    ss = np.random.SeedSequence([int(seed), int(partition), CLIENT_TAG])
    return int(ss.generate_state(1)[0])


def sample_clients(candidates: Sequence[int], per_round: int, seed: int, rnd: int) -> list[int]:
    """``per_round`` of the (sorted) candidate partitions for round ``rnd``, a pure function."""
    pool = sorted(int(c) for c in candidates)
    if per_round >= len(pool):
        return pool
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(rnd), SAMPLE_TAG]))
    return sorted(int(x) for x in rng.choice(pool, size=per_round, replace=False))


# -- identity ---------------------------------------------------------------------------------


def federation_fingerprint(
    settings: Settings,
    manifest_sha256: str,
    init_digest: str,
    local_steps: int,
    seeds: str = "distinct",
) -> str:
    """What server and client must share for the replayed adapters to agree."""
    config = {k: v for k, v in settings.to_dict().items() if k not in _NOT_FINGERPRINTED}
    blob = {
        "protocol": PROTOCOL,
        "manifest_sha256": manifest_sha256,
        "init_digest": init_digest,
        "settings": config,
        "local_steps": int(local_steps),
        "seeds": seeds,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:32]


def state_digest(state: TrainState) -> str:
    """Digest of the global adapter (trained tensors) at ``state.step``."""
    return tensors_digest(state.params)[:32]


# -- replay -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pairs:
    """Aggregated global steps ``first .. first + len(g) - 1``: ``g[j]`` has ``q`` scalars."""

    first: int
    g: list[list[float]]
    curv: list[list[float]] | None = None  # HiZOO only


def replay(state: TrainState, pairs: Pairs, settings: Settings) -> TrainState:
    """``state`` advanced through ``pairs`` (which must start at ``state.step``)."""
    if pairs.first != state.step:
        raise ValueError(f"pairs start at step {pairs.first}, the state is at {state.step}")
    for j, g in enumerate(pairs.g):
        curv = None if pairs.curv is None else np.asarray(pairs.curv[j], dtype=np.float64)
        state, _ = apply_scalars(state, _result(g, curv), settings)
    return state


def _result(g: Sequence[float], curv: np.ndarray | None) -> QueryResult:
    # Only g, curv and finite move parameters; the losses are for logs the replay does not keep.
    arr = np.asarray(g, dtype=np.float64)
    empty = np.zeros(0, dtype=np.float64)
    return QueryResult(
        g=arr,
        loss_plus=np.zeros(1),
        loss_minus=empty,
        finite=True,
        rows=0,
        forwards=0,
        loss_zero=0.0,  # keeps the unused loss estimate off empty arrays
        curv=curv,
    )


# -- the client's round -----------------------------------------------------------------------


@dataclass
class ClientRound:
    """What a client returns: its scalars, how much data stands behind them, what it saw."""

    partition: int
    fingerprint: str
    step: int  # the global step its local steps started from
    examples: int  # training examples in its shard (the aggregation weight)
    g: list[list[float]]  # s vectors of q scalars
    curv: list[list[float]] | None
    digest: str  # digest of the global adapter it rebuilt at ``step``
    loss: float  # mean training loss of its local steps (for the log)
    rows: int  # rows scored (forward work)


def local_steps(
    engine: Any,
    state: TrainState,
    batches: Any,
    settings: Settings,
    steps: int,
) -> tuple[list[list[float]], list[list[float]] | None, float, int]:
    """Run ``steps`` ordinary ZO steps (``query_step`` then ``apply_scalars``, i.e. ``zo_step``)
    from the global ``state`` on the client's ``batches``; return the scalars of each (the
    client's whole upload), HiZOO's curvatures, the mean loss and the rows scored."""
    gs: list[list[float]] = []
    curvs: list[list[float]] = []
    losses, rows = [], 0
    local = state
    for _ in range(steps):
        res = query_step(engine, local, batches(local.step), settings)
        local, record = apply_scalars(local, res, settings)
        gs.append([float(x) for x in res.g])
        if res.curv is not None:
            curvs.append([float(x) for x in res.curv])
        losses.append(float(record["loss"]))
        rows += int(record["rows"])
    mean = float(np.mean(losses)) if losses else float("nan")
    return gs, (curvs if settings.estimator == "hizoo" else None), mean, rows


# -- the server's screening and aggregation ---------------------------------------------------


@dataclass(frozen=True)
class Screening:
    accepted: list[ClientRound]
    rejected: dict[int, str]  # partition -> reason


def default_g_limit(settings: Settings) -> float:
    """The largest believable |g|: a loss change of 100 nats between θ±εz (|g| ≤ 100/2ε·2).

    No real cross-entropy moves that much under a perturbation of size ε, and FZOO's normalised
    scalars are O(√q); anything above is a broken or hostile client.
    """
    return 100.0 / float(settings.eps)


def screen(
    replies: Sequence[ClientRound],
    *,
    fingerprint: str,
    step: int,
    digest: str,
    shape: tuple[int, int],
    g_limit: float,
    eps: float,
    outlier_factor: float = 10.0,
) -> Screening:
    """Keep the replies that may enter the average; name why each other one was rejected.

    Rules, in order: the fingerprint must match (another bundle or settings); the client must
    have started from the round's global state (step and adapter digest); ``g`` must have the
    round's shape; every scalar must be finite and ``|g| <= g_limit`` (the absolute cap); and,
    with three or more survivors, a client's RMS scalar must not exceed ``outlier_factor``
    times the median RMS of the survivors (a norm rule: one client cannot outvote the others
    by scale). Rejection is whole-client: a reply is never clipped and half-used.
    """
    rejected: dict[int, str] = {}
    kept: list[ClientRound] = []
    for r in replies:
        reason = _problem(r, fingerprint, step, digest, shape, g_limit, eps)
        if reason:
            rejected[r.partition] = reason
        else:
            kept.append(r)
    if len(kept) >= 3:
        rms = {r.partition: _rms(r.g) for r in kept}
        median = float(np.median(list(rms.values())))
        bound = outlier_factor * median
        for r in list(kept):
            if median > 0 and rms[r.partition] > bound:
                rejected[r.partition] = (
                    f"scalars' RMS {rms[r.partition]:.3g} exceeds {outlier_factor:g} x the "
                    f"round's median {median:.3g}"
                )
                kept.remove(r)
    return Screening(sorted(kept, key=lambda r: r.partition), rejected)


def _rms(g: list[list[float]]) -> float:
    arr = np.asarray(g, dtype=np.float64)
    return float(np.sqrt(np.mean(arr * arr))) if arr.size else 0.0


def _problem(
    r: ClientRound,
    fingerprint: str,
    step: int,
    digest: str,
    shape: tuple[int, int],
    limit: float,
    eps: float,
) -> str | None:
    if r.fingerprint != fingerprint:
        return "fingerprint mismatch (another bundle, initial adapter or settings)"
    if r.step != step or r.digest != digest:
        return f"out of sync (started from step {r.step}, digest {r.digest[:8]})"
    if not isinstance(r.examples, int) or r.examples < 1:
        return f"bad example count {r.examples!r}"
    groups = [("g", r.g)] + ([("curv", r.curv)] if r.curv is not None else [])
    for name, values in groups:
        try:
            arr = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            return f"malformed {name}"
        if arr.shape != shape:
            return f"{name} of shape {arr.shape}, expected {shape}"
        if not np.isfinite(arr).all():
            return f"non-finite {name}"
        worst = float(np.abs(arr).max()) if arr.size else 0.0
        # Curvatures are g's difference quotient once more: the same cap over ε.
        cap = limit if name == "g" else limit / eps
        if worst > cap:
            return f"|{name}| {worst:.3g} exceeds the limit {cap:.3g}"
    return None


def aggregate(accepted: Sequence[ClientRound], first: int) -> Pairs:
    """The example-weighted mean of the accepted clients' scalars, summed in partition order
    (float64) so that every run of the same round gives the same bits."""
    ordered = sorted(accepted, key=lambda r: r.partition)
    if not ordered:
        return Pairs(first, [])
    total = float(sum(r.examples for r in ordered))

    def mean(get: Any) -> list[list[float]]:
        acc = np.zeros_like(np.asarray(get(ordered[0]), dtype=np.float64))
        for r in ordered:
            acc = acc + (r.examples / total) * np.asarray(get(r), dtype=np.float64)
        return [[float(x) for x in row] for row in acc]

    curv = mean(lambda r: r.curv) if ordered[0].curv is not None else None
    return Pairs(first, mean(lambda r: r.g), curv)


def blocks(partitions: Sequence[int], step: int, local_steps: int, seeds: str) -> dict[int, int]:
    """Each sampled partition's first step index this round (see the module doc)."""
    ordered = sorted(int(p) for p in partitions)
    if seeds == "shared":
        return {p: int(step) for p in ordered}
    return {p: int(step) + j * int(local_steps) for j, p in enumerate(ordered)}


def aggregate_blocks(
    accepted: Sequence[ClientRound],
    first: int,
    partitions: Sequence[int],
    local_steps: int,
    queries: int,
) -> Pairs:
    """Distinct seeds: every sampled partition's block of ``local_steps`` steps, in partition
    order from ``first``; an accepted client's scalars scaled by ``M·n_j/N`` (float64, so every
    run gives the same bits), a missing one's as zeros (no move along its directions). With no
    accepted client there is nothing to move along: the round adds no steps."""
    if not accepted:
        return Pairs(first, [])
    ordered = sorted(int(p) for p in partitions)
    got = {r.partition: r for r in accepted}
    total = float(sum(r.examples for r in accepted))
    zeros = [[0.0] * int(queries) for _ in range(int(local_steps))]
    g: list[list[float]] = []
    curv: list[list[float]] | None = [] if any(r.curv is not None for r in accepted) else None
    for p in ordered:
        r = got.get(p)
        if r is None:
            g += zeros
            if curv is not None:
                curv += zeros
            continue
        scale = len(accepted) * r.examples / total
        g += [[float(scale * np.float64(x)) for x in row] for row in r.g]
        if curv is not None:
            curv += [[float(x) for x in row] for row in (r.curv or zeros)]
    return Pairs(first, g, curv)


# -- the server's history ---------------------------------------------------------------------


@dataclass
class History:
    """All aggregated steps so far: ``g[t]`` is global step ``t``'s scalars."""

    g: list[list[float]] = field(default_factory=list)
    curv: list[list[float]] | None = None  # HiZOO only

    def __len__(self) -> int:
        return len(self.g)

    def since(self, step: int) -> Pairs:
        return Pairs(step, self.g[step:], None if self.curv is None else self.curv[step:])

    def extend(self, pairs: Pairs) -> None:
        if pairs.first != len(self.g):
            raise ValueError(f"pairs start at {pairs.first}, history ends at {len(self.g)}")
        self.g.extend(pairs.g)
        if pairs.curv is not None:
            self.curv = (self.curv or []) + list(pairs.curv)

    def to_json(self) -> dict[str, Any]:
        # Python's float repr round-trips exactly, so JSON keeps the scalars' bits.
        return {"g": self.g, "curv": self.curv}

    @classmethod
    def from_json(cls, blob: Any) -> History:
        blob = blob or {}
        rows = lambda xs: [[float(x) for x in row] for row in xs]  # noqa: E731
        curv = blob.get("curv")
        return cls(rows(blob.get("g") or []), None if curv is None else rows(curv))


def finite_mean(values: Sequence[float], weights: Sequence[float]) -> float | None:
    pairs = [(v, w) for v, w in zip(values, weights, strict=True) if math.isfinite(v)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None
