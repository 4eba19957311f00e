"""A step's rows shared among workers, scored per share, and put back together.

Both ways of sharing come from the row layout (:mod:`zoo_ort.zo.rows`): ``"query"`` gives
worker ``w`` every group of the queries ``i ≡ w (mod N)`` on the whole minibatch (the
unperturbed group of FZOO and HiZOO counts as query ``q``); ``"example"`` gives every worker all
groups on its contiguous slice of the minibatch's examples. A worker returns the float64 losses
of its rows (by query: the means of its whole groups, ``q``-sized); the driver writes them into
the one array the single process would have built and computes the scalars once, so they are
the single process's bit for bit provided each row's loss does not depend on which other rows
share its forward. That holds for :class:`~zoo_ort.engine.ort.OrtEngine` on the CPU EP (tested
on the tiny bundle in ``tests/test_ray_workers.py``), and is the assumption this module rests on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from zoo_ort.engine.protocol import Engine, LabeledBatch
from zoo_ort.errors import ZooError
from zoo_ort.settings import Settings
from zoo_ort.zo import hizoo
from zoo_ort.zo.estimators import QueryResult, scalars_from_losses, scalars_from_means
from zoo_ort.zo.losses import row_losses
from zoo_ort.zo.rows import group_losses, groups, perturbed_lora_at, row_slices

SHARES = ("query", "example")


def share_rows(mode: str, q: int, bsz: int, share: str, worker: int, workers: int) -> np.ndarray:
    """The ascending row indices worker ``worker`` of ``workers`` scores (may be empty)."""
    if share not in SHARES:
        raise ZooError(f"unknown share {share!r}; use one of {', '.join(SHARES)}")
    if not 0 <= worker < workers:
        raise ValueError(f"worker {worker} out of range for {workers} workers")
    layout = groups(mode, q)
    if share == "query":
        owner = [(q if i is None else i) % workers for i, _ in layout]
        picked = [k for k, w in enumerate(owner) if w == worker]
        spans = [(k * bsz, (k + 1) * bsz) for k in picked]
    else:
        mine = np.array_split(np.arange(bsz), workers)[worker]
        if not mine.size:
            return np.empty(0, np.int64)
        spans = [(k * bsz + mine[0], k * bsz + mine[-1] + 1) for k in range(len(layout))]
    if not spans:
        return np.empty(0, np.int64)
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in spans])


def score_rows(
    engine: Engine,
    params: Mapping[str, np.ndarray],
    frozen: Mapping[str, np.ndarray],
    batch: LabeledBatch,
    settings: Settings,
    step: int,
    rows: np.ndarray,
    scale: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """float64 losses of ``rows`` of step ``step``'s layout, as the single process scores them.

    Forwards hold at most ``row_budget`` rows (``"sequential"``: one group each), like the
    single process's, so a worker never needs more memory than it would.
    """
    s = settings
    mode, q, bsz = s.estimator, s.queries, batch.size
    n_groups = len(groups(mode, q))
    tiled = batch.tokens.tile(n_groups)
    labels = None if batch.labels is None else np.tile(np.asarray(batch.labels), n_groups)
    rows = np.asarray(rows, dtype=np.int64)
    if mode == "sequential":
        chunks = [rows[rows // bsz == k] for k in np.unique(rows // bsz)]
    else:
        size = int(s.row_budget) if s.row_budget else max(1, rows.size)
        chunks = [rows[a : a + size] for a in range(0, rows.size, size)]
    out = np.empty(rows.size, dtype=np.float64)
    at = 0
    for chunk in chunks:
        lora = perturbed_lora_at(
            params, frozen, s.seed, step, q, s.eps, bsz, chunk, mode=mode, scale=scale
        )
        part = row_losses(
            engine.forward(tiled.take(chunk), lora),
            None if labels is None else labels[chunk],
            s.loss,
        )
        if part.shape != chunk.shape:
            raise ZooError(f"engine returned {part.shape[0]} losses for {chunk.size} rows")
        out[at : at + chunk.size] = part
        at += chunk.size
    return out


def hizoo_scale(settings: Settings, est_state: Mapping[str, np.ndarray]) -> dict | None:
    """HiZOO's ``Σ^{-1/2}`` for the directions (None for the other estimators)."""
    return hizoo.inv_sqrt(est_state) if settings.estimator == "hizoo" else None


def reply(losses: np.ndarray, share: str, bsz: int) -> np.ndarray:
    """What a worker sends for its rows' losses. Sharing by query, a worker owns whole groups,
    and a group's mean is all the scalars need: ``q``-sized replies (float64 means, computed
    exactly as the single process computes them). Sharing by example, a group is split across
    workers and its mean must be summed in the single process's order: the row losses go."""
    return group_losses(losses, bsz) if share == "query" else losses


def combine(
    parts: Sequence[tuple[np.ndarray, np.ndarray]], settings: Settings, bsz: int, share: str
) -> QueryResult:
    """The step's :class:`QueryResult` from ``(rows, reply)`` of every share: the single
    process's group means (by query) or row losses (by example), then its scalars, rows and
    forward count."""
    s = settings
    n_groups = len(groups(s.estimator, s.queries))
    n_rows = n_groups * bsz
    size = n_groups if share == "query" else n_rows
    values = np.empty(size, dtype=np.float64)
    seen = np.zeros(size, dtype=np.int64)
    for rows, part in parts:
        at = rows[::bsz] // bsz if share == "query" else rows
        values[at] = part
        seen[at] += 1
    if not (seen == 1).all():
        raise ZooError("the workers' shares do not cover the step's rows exactly once")
    if share == "query":
        finite = bool(np.isfinite(values).all())
        fields = scalars_from_means(values, finite, s.estimator, s.queries, s.eps)
    else:
        fields = scalars_from_losses(values, s.estimator, s.queries, bsz, s.eps)
    forwards = len(row_slices(n_rows, bsz, s.estimator, s.row_budget or None))
    return QueryResult(**fields, rows=n_rows, forwards=forwards)
