"""Zeroth-order estimators, shaped as queries → scalars: score perturbed rows, return ``g``.

:func:`evaluate_queries` scores θ ± ε·z_i for ``q`` directions on one minibatch of ``B``
examples, all ``N = q·2·B`` rows in one forward (``"batched"``, P-RGE) or ``2q`` forwards of
``B`` rows (``"sequential"``, MeZO style); the result is ``q`` projected gradients
``g_i = (L(θ+εz_i) − L(θ−εz_i)) / 2ε``. The scalars are all anyone needs to exchange:
:func:`zoo_ort.zo.directions.grad_from_scalars` replays the directions into ``mean_i g_i z_i``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from zoo_ort.engine.protocol import Engine, LabeledBatch
from zoo_ort.engine.scratch import Scratch
from zoo_ort.errors import ZooError
from zoo_ort.zo.losses import row_losses
from zoo_ort.zo.rows import pair_losses, perturbed_lora, row_slices


def projected_grads(losses: np.ndarray, q: int, batch_size: int, eps: float) -> np.ndarray:
    """``g[q]`` (float64) with ``g_i = (L+_i − L−_i) / 2ε`` from the ``q·2·B`` row losses;
    non-finite losses give non-finite ``g`` (the step is then skipped, never applied)."""
    plus, minus = pair_losses(losses, q, batch_size)
    with np.errstate(invalid="ignore", over="ignore"):
        return (plus - minus) / (2.0 * float(eps))


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
    loss: str = "lm",
    mode: str = "batched",
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
    g = projected_grads(losses, q, bsz, eps)
    finite = bool(np.isfinite(losses).all() and np.isfinite(g).all())
    return QueryResult(
        g=g, loss_plus=plus, loss_minus=minus, finite=finite, rows=n_rows, forwards=len(chunks)
    )
