"""P-RGE: the zeroth-order gradient estimate, shaped as queries → scalars → replay.

One step is three pure pieces, so that it can later be spread over workers that exchange only
``q`` scalars:

1. :func:`evaluate_queries` scores θ ± ε·z_i for ``q`` directions on one minibatch of ``B``
   examples, all ``N = q·2·B`` rows in one forward (``mode="batched"``, P-RGE) or ``2q``
   forwards of ``B`` rows (``mode="sequential"``, MeZO style); the result is ``q`` projected
   gradients ``g_i = (L(θ+εz_i) − L(θ−εz_i)) / 2ε``.
2. The scalars ``g`` are all anyone needs to exchange.
3. :func:`grad_from_scalars` replays the directions from their seeds and returns
   ``mean_i g_i z_i``, the estimate of ∇L handed to the optimiser.

Directions. ``z_i`` holds one standard-normal float32 tensor per trainable tensor, drawn from
``np.random.default_rng(np.random.SeedSequence([run_seed, step, i]))`` — one Generator per
(step, query) with entropy exactly ``[run_seed, step, i]`` (three non-negative ints: the run
seed, the 0-based optimisation step, the 0-based query index) — one ``standard_normal(shape,
dtype=float32)`` draw per tensor in ``sorted(name)`` order. Directions are never stored: every
user regenerates them.

Row layout. Row ``n = (i·2 + s)·B + b`` is query ``i``, sign ``s`` (0: ``+ε``, 1: ``−ε``),
example ``b``; the token batch is ``batch.tile(2·q)``. Per-row (trained) tensors get a leading
``N`` dimension; shared (frozen) tensors are passed as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from zoo_ort.batch import Engine, EngineOutput
from zoo_ort.errors import ZooError
from zoo_ort.labeled import LabeledBatch
from zoo_ort.scratch import Scratch

Mode = Literal["batched", "sequential"]
LossKind = Literal["lm", "candidates"]
MODES = ("batched", "sequential")
LOSSES = ("lm", "candidates")


def direction_rng(run_seed: int, step: int, query: int) -> np.random.Generator:
    """The Generator of query ``query`` at step ``step`` (see the module doc for the layout)."""
    return np.random.default_rng(np.random.SeedSequence([int(run_seed), int(step), int(query)]))


def _shape(v: np.ndarray | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def directions(
    shapes: Mapping[str, np.ndarray | tuple[int, ...]], run_seed: int, step: int, query: int
) -> dict[str, np.ndarray]:
    """``z_query`` at ``step``: one float32 N(0, I) tensor per name, drawn in sorted name order."""
    rng = direction_rng(run_seed, step, query)
    return {
        name: rng.standard_normal(_shape(shapes[name]), dtype=np.float32) for name in sorted(shapes)
    }


def perturbed_lora(
    params: Mapping[str, np.ndarray],
    frozen: Mapping[str, np.ndarray],
    run_seed: int,
    step: int,
    q: int,
    eps: float,
    batch_size: int,
    rows: slice | None = None,
    scratch: Scratch | None = None,
) -> dict[str, np.ndarray]:
    """The LoRA inputs for rows ``rows`` (default all ``q·2·B``) of the step's row layout.

    Each trainable tensor becomes ``[n_rows, *shape]`` with row ``n`` holding
    ``θ + s·ε·z_i`` (``i, s`` from the row layout); frozen tensors are passed unchanged and
    shared by all rows. ``params`` is never modified. Any row range gives bit-identical rows to
    the same rows of the full layout, which is what makes chunked and sequential modes agree.
    With ``scratch`` the rows are written into its reused memory (valid until the next call
    with the same scratch) instead of new arrays.
    """
    n_total = q * 2 * batch_size
    start, stop, stride = (rows or slice(None)).indices(n_total)
    if stride != 1 or stop <= start:
        raise ValueError(f"rows must be a non-empty contiguous range, got {rows}")
    group = batch_size  # rows per (query, sign)
    eps32 = np.float32(eps)
    out = {}
    for name, v in params.items():
        shape = (stop - start, *np.shape(v))
        out[name] = np.empty(shape, np.float32) if scratch is None else scratch.get(name, shape)
    for i in range(start // (2 * group), (stop - 1) // (2 * group) + 1):
        z = directions(params, run_seed, step, i)
        for s, sign in enumerate((1.0, -1.0)):
            g0 = (2 * i + s) * group
            lo, hi = max(g0, start), min(g0 + group, stop)
            if lo >= hi:
                continue
            for name, theta in params.items():
                out[name][lo - start : hi - start] = theta + np.float32(sign) * eps32 * z[name]
    for name, v in frozen.items():
        if name in out:
            raise ValueError(f"{name} is both trainable and frozen")
        out[name] = v
    return out


def row_slices(n_rows: int, batch_size: int, mode: Mode, row_budget: int | None) -> list[slice]:
    """How the ``n_rows`` of a step are split into forwards."""
    if mode == "sequential":
        size = batch_size
    elif mode == "batched":
        size = n_rows if not row_budget else max(1, min(int(row_budget), n_rows))
    else:
        raise ZooError(f"unknown estimator mode {mode!r}; use one of {', '.join(MODES)}")
    return [slice(a, min(a + size, n_rows)) for a in range(0, n_rows, size)]


def row_losses(output: EngineOutput, labels: np.ndarray | None, loss: LossKind) -> np.ndarray:
    """Per-row training loss (float64) from an engine output.

    ``"lm"``: the engine's label-token NLL (P-RGE). ``"candidates"``: cross-entropy over the
    candidates at the first target slot, i.e. ``logsumexp_c lp[n, 0, c] − lp[n, 0, label_n]``
    (the label-word softmax restricted to the candidates, as MeZO's classification loss).
    """
    if loss == "lm":
        return np.asarray(output.loss, dtype=np.float64).reshape(-1)
    if loss == "candidates":
        if labels is None:
            raise ZooError("loss 'candidates' needs labelled classification data; use loss 'lm'")
        lp = np.asarray(output.candidate_logprobs, dtype=np.float64)[:, 0, :]
        m = lp.max(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", over="ignore"):
            lse = (m + np.log(np.exp(lp - m).sum(axis=1, keepdims=True)))[:, 0]
        picked = np.take_along_axis(lp, np.asarray(labels, np.int64)[:, None], axis=1)[:, 0]
        return lse - picked
    raise ZooError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)}")


def pair_losses(losses: np.ndarray, q: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(L+[q], L−[q])``: each the mean over the ``B`` rows of its (query, sign) group."""
    per = np.asarray(losses, dtype=np.float64).reshape(q, 2, batch_size).mean(axis=2)
    return per[:, 0], per[:, 1]


def projected_grads(losses: np.ndarray, q: int, batch_size: int, eps: float) -> np.ndarray:
    """``g[q]`` (float64) with ``g_i = (L+_i − L−_i) / 2ε`` from the ``q·2·B`` row losses."""
    plus, minus = pair_losses(losses, q, batch_size)
    return (plus - minus) / (2.0 * float(eps))


def grad_from_scalars(
    shapes: Mapping[str, np.ndarray | tuple[int, ...]],
    g: np.ndarray,
    run_seed: int,
    step: int,
) -> dict[str, np.ndarray]:
    """Replay the directions and return ``mean_i g_i z_i`` (float32, one tensor per name).

    Only one query's directions are alive at a time, so the extra memory is one copy of θ.
    """
    g = np.asarray(g, dtype=np.float64).reshape(-1)
    q = g.shape[0]
    acc = {name: np.zeros(_shape(shapes[name]), dtype=np.float32) for name in shapes}
    for i in range(q):
        coef = np.float32(g[i] / q)
        for name, z in directions(shapes, run_seed, step, i).items():
            acc[name] += coef * z
    return acc


@dataclass(frozen=True)
class QueryResult:
    """What a step's queries produced: the scalars, plus what the log wants."""

    g: np.ndarray  # float64 [q], projected gradients
    loss_plus: np.ndarray  # float64 [q]
    loss_minus: np.ndarray  # float64 [q]
    finite: bool  # False when any row loss was NaN/inf: the step must be skipped
    rows: int  # rows scored (q·2·B)
    forwards: int  # engine calls made

    @property
    def loss(self) -> float:
        """Estimate of L(θ): the mean over all perturbed rows."""
        return float((self.loss_plus.mean() + self.loss_minus.mean()) / 2.0)


def evaluate_queries(
    engine: Engine,
    params: Mapping[str, np.ndarray],
    frozen: Mapping[str, np.ndarray],
    batch: LabeledBatch,
    *,
    run_seed: int,
    step: int,
    q: int,
    eps: float,
    loss: LossKind = "lm",
    mode: Mode = "batched",
    row_budget: int | None = None,
    scratch: Scratch | None = None,
) -> QueryResult:
    """Score the ``q`` direction pairs of ``step`` on ``batch`` and return their scalars.

    ``"batched"`` sends all ``q·2·B`` rows in one forward (split into forwards of at most
    ``row_budget`` rows if given); ``"sequential"`` makes ``2q`` forwards of ``B`` rows. Both
    feed the engine identical rows, so the losses and the update agree. ``scratch`` (one per
    training run) saves rebuilding the rows' memory every step.
    """
    if q < 1 or eps <= 0:
        raise ZooError(f"need queries >= 1 and eps > 0 (got q={q}, eps={eps})")
    if loss == "candidates" and batch.labels is None:
        raise ZooError("loss 'candidates' needs labelled classification data; use loss 'lm'")
    bsz = batch.size
    n_rows = q * 2 * bsz
    tiled = batch.tokens.tile(2 * q)
    labels = None if batch.labels is None else np.tile(np.asarray(batch.labels), 2 * q)
    losses = np.empty(n_rows, dtype=np.float64)
    chunks = row_slices(n_rows, bsz, mode, row_budget)
    for rows in chunks:
        lora = perturbed_lora(params, frozen, run_seed, step, q, eps, bsz, rows, scratch)
        out = engine.forward(tiled.take(rows), lora)
        part = row_losses(out, None if labels is None else labels[rows], loss)
        if part.shape != (rows.stop - rows.start,):
            raise ZooError(
                f"engine returned {part.shape[0]} losses for {rows.stop - rows.start} rows"
            )
        losses[rows] = part
    plus, minus = pair_losses(losses, q, bsz)
    with np.errstate(invalid="ignore", over="ignore"):
        g = (plus - minus) / (2.0 * float(eps))
    finite = bool(np.isfinite(losses).all() and np.isfinite(g).all())
    return QueryResult(
        g=g, loss_plus=plus, loss_minus=minus, finite=finite, rows=n_rows, forwards=len(chunks)
    )
