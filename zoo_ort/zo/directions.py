"""Directions from seeds, and the replay that turns scalars back into a gradient estimate.

``z_i`` holds one standard-normal float32 tensor per trainable tensor, drawn from
``np.random.default_rng(np.random.SeedSequence([run_seed, step, i]))`` — one Generator per
(step, query) with entropy exactly ``[run_seed, step, i]`` (three non-negative ints: the run
seed, the 0-based optimisation step, the 0-based query index) — one ``standard_normal(shape,
dtype=float32)`` draw per tensor in ``sorted(name)`` order. FZOO's Rademacher directions come from
the same Generator: one ``integers(0, 2, shape, dtype=int8)`` draw per tensor in sorted order,
mapped to ±1 float32. Directions are never stored: every user regenerates them, which is why
workers and clients only ever exchange scalars.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


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


def rademacher(
    shapes: Mapping[str, np.ndarray | tuple[int, ...]], run_seed: int, step: int, query: int
) -> dict[str, np.ndarray]:
    """FZOO's ``u_query`` at ``step``: one float32 ±1 tensor per name, drawn in sorted order."""
    rng = direction_rng(run_seed, step, query)
    out = {}
    for name in sorted(shapes):
        bits = rng.integers(0, 2, size=_shape(shapes[name]), dtype=np.int8)
        out[name] = (2 * bits - 1).astype(np.float32)
    return out


# The direction distributions by name; an estimator picks one (see ``rows.DRAW``).
DRAWS = {"gaussian": directions, "rademacher": rademacher}


def grad_from_scalars(
    shapes: Mapping[str, np.ndarray | tuple[int, ...]],
    g: np.ndarray,
    run_seed: int,
    step: int,
    draw: str = "gaussian",
) -> dict[str, np.ndarray]:
    """Replay the directions and return ``mean_i g_i z_i`` (float32, one tensor per name).

    ``draw`` names the distribution in :data:`DRAWS`. Only one query's directions are alive at
    a time, so the extra memory is one copy of θ.
    """
    g = np.asarray(g, dtype=np.float64).reshape(-1)
    q = g.shape[0]
    make = DRAWS[draw]
    acc = {name: np.zeros(_shape(shapes[name]), dtype=np.float32) for name in shapes}
    for i in range(q):
        coef = np.float32(g[i] / q)
        for name, z in make(shapes, run_seed, step, i).items():
            acc[name] += coef * z
    return acc
