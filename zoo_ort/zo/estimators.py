"""Zeroth-order estimators, shaped as queries → scalars: score perturbed rows, return ``g``.

:func:`evaluate_queries` scores θ ± ε·z_i for ``q`` directions on one minibatch of ``B``
examples, all ``N = q·2·B`` rows in one forward (``"batched"``, P-RGE) or ``2q`` forwards of
``B`` rows (``"sequential"``, MeZO style); the result is ``q`` projected gradients
``g_i = (L(θ+εz_i) − L(θ−εz_i)) / 2ε``. The scalars are all anyone needs to exchange:
:func:`zoo_ort.zo.directions.grad_from_scalars` replays the directions into ``mean_i g_i z_i``.

Two more estimators keep that shape, each in one forward of ``(groups)·B`` rows:

* ``"fzoo"`` (FZOO, arXiv 2506.09034): Rademacher ``u_i`` and one unperturbed group,
  ``L_i = L(θ+εu_i)``, ``L_0 = L(θ)``; the scalars are ``g_i = (L_i − L_0) / σ`` with ``σ`` the
  standard deviation (ddof 1) of the ``L_i``: the normalised step ``mean_i (L_i−L_0)/(ε) u_i``
  divided by ``std_i (L_i−L_0)/ε``, so ε cancels. ``σ ≈ 0`` (all ``L_i`` equal: no
  information on the direction) gives ``g = 0``.
* ``"hizoo"`` (HiZOO, arXiv 2402.15173): the ``±`` pairs of P-RGE along ``Σ^{-1/2} z_i`` plus
  one unperturbed group; besides ``g_i`` it returns the curvature scalars
  ``c_i = (L+_i + L−_i − 2L_0) / 2ε²`` from which :mod:`zoo_ort.zo.hizoo` updates ``Σ``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from zoo_ort.engine.protocol import Engine, LabeledBatch
from zoo_ort.engine.scratch import Scratch
from zoo_ort.errors import ZooError
from zoo_ort.zo.losses import row_losses
from zoo_ort.zo.rows import group_losses, groups, pair_losses, perturbed_lora, row_slices


def projected_grads(losses: np.ndarray, q: int, batch_size: int, eps: float) -> np.ndarray:
    """``g[q]`` (float64) with ``g_i = (L+_i − L−_i) / 2ε`` from the ``q·2·B`` row losses;
    non-finite losses give non-finite ``g`` (the step is then skipped, never applied)."""
    plus, minus = pair_losses(losses, q, batch_size)
    with np.errstate(invalid="ignore", over="ignore"):
        return (plus - minus) / (2.0 * float(eps))


# Below this (relative to max(1, |L_0|)) FZOO's loss spread is rounding, not signal.
FZOO_MIN_STD = 1e-12


def fzoo_scalars(plus: np.ndarray, zero: float) -> tuple[np.ndarray, float]:
    """``(g[q], σ)``: FZOO's normalised scalars ``(L_i − L_0) / σ``, ``σ = std(L_i, ddof=1)``.

    With one query, or equal perturbed losses, σ carries no scale: ``g = 0`` (no move).
    """
    plus = np.asarray(plus, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        std = float(np.std(plus, ddof=1)) if plus.size > 1 else 0.0
        if not std > FZOO_MIN_STD * max(1.0, abs(zero)):
            return np.zeros_like(plus), std
        return (plus - zero) / std, std


def curvatures(plus: np.ndarray, minus: np.ndarray, zero: float, eps: float) -> np.ndarray:
    """HiZOO's ``c_i = (L+_i + L−_i − 2L_0) / 2ε²`` (float64 ``[q]``)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return (plus + minus - 2.0 * zero) / (2.0 * float(eps) ** 2)


@dataclass(frozen=True)
class QueryResult:
    """What a step's queries produced: the scalars, plus what the log wants."""

    g: np.ndarray  # float64 [q], projected gradients (fzoo: normalised, see the module doc)
    loss_plus: np.ndarray  # float64 [q]
    loss_minus: np.ndarray  # float64 [q] (fzoo: empty, it has no −ε rows)
    finite: bool  # False when any row loss was NaN/inf: the step must be skipped
    rows: int  # rows scored (groups·B)
    forwards: int  # engine calls made
    loss_zero: float | None = None  # L(θ) on the batch (fzoo, hizoo: the unperturbed group)
    std: float | None = None  # fzoo: σ, the std of the perturbed losses
    curv: np.ndarray | None = None  # hizoo: float64 [q] curvature scalars c_i

    @property
    def loss(self) -> float:
        """Estimate of L(θ): the unperturbed loss if scored, else the mean over all rows."""
        if self.loss_zero is not None:
            return float(self.loss_zero)
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
    scale: Mapping[str, np.ndarray] | None = None,
) -> QueryResult:
    """Score the ``q`` direction pairs of ``step`` on ``batch`` and return their scalars.

    ``"batched"`` sends all ``q·2·B`` rows in one forward (split into forwards of at most
    ``row_budget`` rows if given); ``"sequential"`` makes ``2q`` forwards of ``B`` rows. Both
    feed the engine identical rows, so the losses and the update agree. ``"fzoo"`` and
    ``"hizoo"`` score their layouts (see :mod:`zoo_ort.zo.rows`) like ``"batched"``; ``scale``
    is HiZOO's ``Σ^{-1/2}``. ``scratch`` (one per training run) saves rebuilding the rows'
    memory every step.
    """
    if q < 1 or eps <= 0:
        raise ZooError(f"need queries >= 1 and eps > 0 (got q={q}, eps={eps})")
    if loss == "candidates" and batch.labels is None:
        raise ZooError("loss 'candidates' needs labelled classification data; use loss 'lm'")
    bsz = batch.size
    n_groups = len(groups(mode, q))
    n_rows = n_groups * bsz
    tiled = batch.tokens.tile(n_groups)
    labels = None if batch.labels is None else np.tile(np.asarray(batch.labels), n_groups)
    losses = np.empty(n_rows, dtype=np.float64)
    chunks = row_slices(n_rows, bsz, mode, row_budget)
    for rows in chunks:
        lora = perturbed_lora(
            params, frozen, run_seed, step, q, eps, bsz, rows, scratch, mode=mode, scale=scale
        )
        out = engine.forward(tiled.take(rows), lora)
        part = row_losses(out, None if labels is None else labels[rows], loss)
        if part.shape != (rows.stop - rows.start,):
            raise ZooError(
                f"engine returned {part.shape[0]} losses for {rows.stop - rows.start} rows"
            )
        losses[rows] = part
    res = scalars_from_losses(losses, mode, q, bsz, eps)
    return QueryResult(**res, rows=n_rows, forwards=len(chunks))


def scalars_from_losses(losses: np.ndarray, mode: str, q: int, bsz: int, eps: float) -> dict:
    """The QueryResult fields that come from the row losses, for ``mode``'s layout."""
    finite = bool(np.isfinite(losses).all())
    return scalars_from_means(group_losses(losses, bsz), finite, mode, q, eps)


def scalars_from_means(per: np.ndarray, finite: bool, mode: str, q: int, eps: float) -> dict:
    """The QueryResult fields from the mean loss of each group of the layout (``finite``: all
    row losses were finite). Everything a step's scalars need is in these few numbers, which is
    why a worker scoring whole groups sends only their means."""
    per = np.asarray(per, dtype=np.float64)
    if mode == "fzoo":
        plus, zero = per[:q], float(per[q])
        g, std = fzoo_scalars(plus, zero)
        finite = finite and bool(np.isfinite(g).all())
        return dict(
            g=g, loss_plus=plus, loss_minus=np.empty(0), finite=finite, loss_zero=zero, std=std
        )
    pairs = per[: 2 * q].reshape(q, 2)
    plus, minus = pairs[:, 0].copy(), pairs[:, 1].copy()
    with np.errstate(invalid="ignore", over="ignore"):
        g = (plus - minus) / (2.0 * float(eps))
    finite = finite and bool(np.isfinite(g).all())
    out = dict(g=g, loss_plus=plus, loss_minus=minus, finite=finite)
    if mode == "hizoo":
        zero = float(per[2 * q])
        curv = curvatures(plus, minus, zero, eps)
        finite = finite and bool(np.isfinite(curv).all())
        out |= dict(loss_zero=zero, curv=curv, finite=finite)
    return out
