"""The P-RGE row layout: which LoRA weights each row of a step's batch carries.

Row ``n = (i·2 + s)·B + b`` is query ``i``, sign ``s`` (0: ``+ε``, 1: ``−ε``), example ``b``;
the token batch is ``batch.tile(2·q)``. HiZOO appends one unperturbed group (θ) of ``B`` rows
(``2q + 1`` groups); FZOO has only ``+ε`` groups, ``n = i·B + b``, then the θ group (``q + 1``
groups). The groups of a query are adjacent, and the θ group is always last. Per-row (trained)
tensors get a leading ``N`` dimension; shared (frozen) tensors are passed as they are.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from zoo_ort.engine.scratch import Scratch
from zoo_ort.errors import ZooError
from zoo_ort.settings import ESTIMATORS
from zoo_ort.zo.directions import DRAWS

# Which directions each estimator draws, and whether it adds an unperturbed (θ) group.
DRAW = {"batched": "gaussian", "sequential": "gaussian", "fzoo": "rademacher", "hizoo": "gaussian"}
_ZERO_GROUP = frozenset({"fzoo", "hizoo"})

Group = tuple[int | None, float]  # (query, sign); query None: the unperturbed group


def groups(mode: str, q: int) -> list[Group]:
    """The step's row groups in order, ``B`` rows each (see the module doc)."""
    if mode not in DRAW:
        raise ZooError(f"unknown estimator mode {mode!r}; use one of {', '.join(ESTIMATORS)}")
    signs = (1.0,) if mode == "fzoo" else (1.0, -1.0)
    out: list[Group] = [(i, sign) for i in range(q) for sign in signs]
    return out + [(None, 0.0)] if mode in _ZERO_GROUP else out


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
    *,
    mode: str = "batched",
    scale: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The LoRA inputs for rows ``rows`` (default all) of the step's row layout for ``mode``.

    Each trainable tensor becomes ``[n_rows, *shape]`` with row ``n`` holding
    ``θ + s·ε·z_i`` (``i, s`` from the row layout; ``θ`` in an unperturbed group); with
    ``scale`` (HiZOO's ``Σ^{-1/2}``, one tensor per name) the direction is ``scale·z_i``.
    Frozen tensors are passed unchanged and shared by all rows. ``params`` is never modified.
    Any row range gives bit-identical rows to the same rows of the full layout, which is what
    makes chunked and sequential modes agree. With ``scratch`` the rows are written into its
    reused memory (valid until the next call with the same scratch) instead of new arrays.
    """
    layout = groups(mode, q)
    group = batch_size
    start, stop, stride = (rows or slice(None)).indices(len(layout) * group)
    if stride != 1 or stop <= start:
        raise ValueError(f"rows must be a non-empty contiguous range, got {rows}")
    eps32 = np.float32(eps)
    out = {}
    for name, v in params.items():
        shape = (stop - start, *np.shape(v))
        out[name] = np.empty(shape, np.float32) if scratch is None else scratch.get(name, shape)
    spans = [
        (k, max(k * group, start) - start, min((k + 1) * group, stop) - start)
        for k in range(start // group, (stop - 1) // group + 1)
    ]
    _fill_groups(out, params, layout, spans, (run_seed, step, mode, scale), eps32)
    return _with_frozen(out, frozen)


def perturbed_lora_at(
    params: Mapping[str, np.ndarray],
    frozen: Mapping[str, np.ndarray],
    run_seed: int,
    step: int,
    q: int,
    eps: float,
    batch_size: int,
    rows: np.ndarray,
    *,
    mode: str = "batched",
    scale: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """As :func:`perturbed_lora` for the rows ``rows`` (ascending indices into the step's row
    layout, any subset): each row is bit-identical to the same row of the full layout. A worker
    scoring a share of a step (some queries, or some examples of every query) builds its rows
    with this; each query's direction is drawn once."""
    layout = groups(mode, q)
    rows = np.asarray(rows, dtype=np.int64)
    n_rows = len(layout) * batch_size
    if rows.ndim != 1 or not rows.size or rows[0] < 0 or rows[-1] >= n_rows:
        raise ValueError(f"rows must be indices in [0, {n_rows}), got {rows!r}")
    if (np.diff(rows) <= 0).any():
        raise ValueError("rows must be strictly ascending")
    eps32 = np.float32(eps)
    out = {name: np.empty((rows.size, *np.shape(v)), np.float32) for name, v in params.items()}
    cuts = np.searchsorted(rows, np.arange(len(layout) + 1) * batch_size)
    spans = [
        (k, int(cuts[k]), int(cuts[k + 1])) for k in range(len(layout)) if cuts[k] < cuts[k + 1]
    ]
    _fill_groups(out, params, layout, spans, (run_seed, step, mode, scale), eps32)
    return _with_frozen(out, frozen)


def _fill_groups(
    out: dict[str, np.ndarray],
    params: Mapping[str, np.ndarray],
    layout: list,
    spans: list[tuple[int, int, int]],
    draw: tuple,
    eps32: np.float32,
) -> None:
    """For each ``(group k, lo, hi)``, rows ``lo:hi`` of ``out`` get group ``k``'s weights.
    One query's directions are alive at a time (a query's groups are adjacent in the layout)."""
    run_seed, step, mode, scale = draw
    z, z_query = None, None
    for k, lo, hi in spans:
        i, sign = layout[k]
        if i is not None and i != z_query:
            z, z_query = _direction(params, run_seed, step, i, DRAW[mode], scale), i
        _fill(out, params, None if i is None else z, sign, eps32, lo, hi)


def _fill(
    out: dict[str, np.ndarray],
    params: Mapping[str, np.ndarray],
    z: Mapping[str, np.ndarray] | None,
    sign: float,
    eps32: np.float32,
    lo: int,
    hi: int,
) -> None:
    """Rows ``lo:hi`` of ``out`` get ``θ + sign·ε·z`` (``θ`` itself when ``z`` is None)."""
    for name, theta in params.items():
        out[name][lo:hi] = theta if z is None else theta + np.float32(sign) * eps32 * z[name]


def _with_frozen(
    out: dict[str, np.ndarray], frozen: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    for name, v in frozen.items():
        if name in out:
            raise ValueError(f"{name} is both trainable and frozen")
        out[name] = v
    return out


def _direction(
    params: Mapping[str, np.ndarray],
    run_seed: int,
    step: int,
    query: int,
    draw: str,
    scale: Mapping[str, np.ndarray] | None,
) -> dict[str, np.ndarray]:
    z = DRAWS[draw](params, run_seed, step, query)
    if scale is None:
        return z
    return {name: z[name] * scale[name] for name in z}


def row_slices(n_rows: int, batch_size: int, mode: str, row_budget: int | None) -> list[slice]:
    """How the ``n_rows`` of a step are split into forwards."""
    if mode not in DRAW:
        raise ZooError(f"unknown estimator mode {mode!r}; use one of {', '.join(ESTIMATORS)}")
    if mode == "sequential":
        size = batch_size
    else:  # one forward of all rows (split only by the row budget)
        size = n_rows if not row_budget else max(1, min(int(row_budget), n_rows))
    return [slice(a, min(a + size, n_rows)) for a in range(0, n_rows, size)]


def pair_losses(losses: np.ndarray, q: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(L+[q], L−[q])``: each the mean over the ``B`` rows of its (query, sign) group."""
    per = np.asarray(losses, dtype=np.float64).reshape(q, 2, batch_size).mean(axis=2)
    return per[:, 0], per[:, 1]


def group_losses(losses: np.ndarray, batch_size: int) -> np.ndarray:
    """float64 ``[n_groups]``: the mean loss of each group of ``B`` rows, in layout order."""
    return np.asarray(losses, dtype=np.float64).reshape(-1, batch_size).mean(axis=1)
