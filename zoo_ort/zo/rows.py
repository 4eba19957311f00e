"""The P-RGE row layout: which LoRA weights each row of a step's batch carries.

Row ``n = (i·2 + s)·B + b`` is query ``i``, sign ``s`` (0: ``+ε``, 1: ``−ε``), example ``b``;
the token batch is ``batch.tile(2·q)``. Per-row (trained) tensors get a leading ``N`` dimension;
shared (frozen) tensors are passed as they are.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from zoo_ort.engine.scratch import Scratch
from zoo_ort.errors import ZooError
from zoo_ort.settings import ESTIMATORS
from zoo_ort.zo.directions import directions


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


def row_slices(n_rows: int, batch_size: int, mode: str, row_budget: int | None) -> list[slice]:
    """How the ``n_rows`` of a step are split into forwards."""
    if mode == "sequential":
        size = batch_size
    elif mode == "batched":
        size = n_rows if not row_budget else max(1, min(int(row_budget), n_rows))
    else:
        raise ZooError(f"unknown estimator mode {mode!r}; use one of {', '.join(ESTIMATORS)}")
    return [slice(a, min(a + size, n_rows)) for a in range(0, n_rows, size)]


def pair_losses(losses: np.ndarray, q: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(L+[q], L−[q])``: each the mean over the ``B`` rows of its (query, sign) group."""
    per = np.asarray(losses, dtype=np.float64).reshape(q, 2, batch_size).mean(axis=2)
    return per[:, 0], per[:, 1]
