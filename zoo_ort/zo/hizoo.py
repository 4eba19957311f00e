"""HiZOO's diagonal Hessian Σ (arXiv 2402.15173): estimator state, preconditioning and update.

Σ holds one float32 tensor per trained tensor (key ``"hizoo/<name>"``), starts at ones and is
kept in :attr:`~zoo_ort.zo.step.TrainState.est_state` (so checkpoints carry it). At step ``t``
the directions are ``v_i = Σ_t^{-1/2} z_i`` (``z_i`` the usual Gaussian draws), and after the
forward, from the scalars ``g_i`` and ``c_i = (L+_i + L−_i − 2L_0) / 2ε²``:

* gradient estimate ``mean_i g_i Σ_t^{-1/2} z_i`` (≈ ``Σ_t^{-1} ∇L``),
* ``Σ_{t+1} = (1 − α) Σ_t + α Σ_t ⊙ mean_i |c_i| z_i²`` (α = ``hizoo_smooth``), the update of
  the paper's reference code. On a convex quadratic with Hessian H its fixed point is
  ``(n + 2)/2 · diag(H)`` (n: trained parameters): the shape of diag(H), times a constant that
  the learning rate absorbs.

Both are replayed from seeds, so the scalars and Σ_t are all anyone needs.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from zoo_ort.zo.directions import directions

PREFIX = "hizoo/"


def init_hessian(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Σ_0 = 1 for every trained tensor (HiZOO starts as MeZO)."""
    return {PREFIX + name: np.ones(np.shape(v), np.float32) for name, v in params.items()}


def inv_sqrt(est_state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``Σ^{-1/2}`` per trained tensor name (float32): the scale of the perturbations."""
    n = len(PREFIX)
    return {k[n:]: (1.0 / np.sqrt(v)).astype(np.float32) for k, v in est_state.items()}


def replay(
    shapes: Mapping[str, np.ndarray],
    est_state: Mapping[str, np.ndarray],
    g: np.ndarray,
    curv: np.ndarray,
    run_seed: int,
    step: int,
    alpha: float,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(gradient estimate, Σ_{t+1})`` from the scalars, regenerating each ``z_i`` once."""
    g = np.asarray(g, dtype=np.float64).reshape(-1)
    q = g.shape[0]
    acc = {name: np.zeros(np.shape(shapes[name]), np.float32) for name in shapes}
    z2 = {name: np.zeros(np.shape(shapes[name]), np.float32) for name in shapes}
    for i in range(q):
        coef, ccoef = np.float32(g[i] / q), np.float32(abs(curv[i]) / q)
        for name, z in directions(shapes, run_seed, step, i).items():
            acc[name] += coef * z
            z2[name] += ccoef * z * z
    scale = inv_sqrt(est_state)
    grads = {name: acc[name] * scale[name] for name in acc}
    a = np.float32(alpha)
    new = {}
    for name in shapes:
        sigma = est_state[PREFIX + name]
        new[PREFIX + name] = (np.float32(1) - a) * sigma + a * sigma * z2[name]
    return grads, new
