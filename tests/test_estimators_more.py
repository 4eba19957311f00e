"""FZOO and HiZOO against analytic references: directions, expectations, training, resume.

Statistical thresholds are derived in each test from the estimator's known variance on a
quadratic (where differences of losses are exact up to float32 rounding).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from numpy_engine import NumpyEngine, batches_fn, make_batch

from zoo_ort.engine.protocol import EngineOutput
from zoo_ort.errors import ZooError
from zoo_ort.loop.checkpoint import load_latest, save_checkpoint
from zoo_ort.loop.train import train
from zoo_ort.settings import ESTIMATORS, settings
from zoo_ort.zo import hizoo
from zoo_ort.zo.directions import direction_rng, directions, grad_from_scalars, rademacher
from zoo_ort.zo.estimators import evaluate_queries, fzoo_scalars
from zoo_ort.zo.rows import perturbed_lora
from zoo_ort.zo.step import init_state, zo_step


def _quadratic(seed: int = 0, shape=(2, 8)):
    """Two per-row tensors away from their targets, served by the numpy quadratic engine."""
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(shape).astype(np.float32) for k in ("l0.B", "l1.B")}
    targets = {k: rng.standard_normal(shape).astype(np.float32) for k in params}
    return params, NumpyEngine("quadratic", targets=targets)


def _flat(tensors) -> np.ndarray:
    return np.concatenate([np.asarray(tensors[k], np.float64).ravel() for k in sorted(tensors)])


class DiagQuadratic:
    """``loss_n = ½ Σ h ⊙ (P_n − P*)²``: a known, non-isotropic diagonal Hessian ``h``."""

    def __init__(self, targets, hess):
        self.targets, self.hess = targets, hess

    def forward(self, batch, lora):
        n = batch.rows
        total = np.zeros(n)
        for k, t in self.targets.items():
            d = lora[k].astype(np.float64) - t[None].astype(np.float64)
            total += 0.5 * (self.hess[k][None] * d * d).reshape(n, -1).sum(1)
        logprobs = np.zeros((n, 1, 2), np.float32)
        return EngineOutput(loss=total.astype(np.float32), candidate_logprobs=logprobs)


HESS = {"a": np.array([[0.5, 1.0, 2.0]]), "b": np.array([[4.0, 0.25, 1.5]])}
N_HESS = 6  # trained parameters of the DiagQuadratic problems


def _diag_problem():
    rng = np.random.default_rng(1)
    targets = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in HESS.items()}
    return targets, DiagQuadratic(targets, HESS)


# -- directions and row layouts ----------------------------------------------------------------


def test_rademacher_follows_documented_seed_layout():
    shapes = {"b": (3, 4), "a": (5,)}
    got = rademacher(shapes, run_seed=7, step=2, query=1)
    rng = direction_rng(7, 2, 1)
    for name in ("a", "b"):  # sorted order, one int8 draw each
        want = 2.0 * rng.integers(0, 2, size=shapes[name], dtype=np.int8) - 1.0
        np.testing.assert_array_equal(got[name], want)
        assert got[name].dtype == np.float32
    assert set(np.unique(_flat(got))) == {-1.0, 1.0}


def test_fzoo_and_hizoo_row_layouts():
    params, _ = _quadratic(shape=(2, 3))
    q, eps, bsz = 3, 1e-2, 2
    rows = perturbed_lora(params, {}, 4, 5, q, eps, bsz, mode="fzoo")
    for k, theta in params.items():
        assert rows[k].shape == ((q + 1) * bsz, 2, 3)
        for i in range(q):
            u = rademacher(params, 4, 5, i)[k]
            want = theta + np.float32(eps) * u
            np.testing.assert_array_equal(rows[k][i * bsz : (i + 1) * bsz], [want] * bsz)
        np.testing.assert_array_equal(rows[k][q * bsz :], [theta] * bsz)
    scale = {k: np.full(v.shape, 0.5, np.float32) for k, v in params.items()}
    rows = perturbed_lora(params, {}, 4, 5, q, eps, bsz, mode="hizoo", scale=scale)
    for k, theta in params.items():
        z = directions(params, 4, 5, 1)[k]
        lo = 2 * 1 * bsz  # query 1, sign −
        minus = theta - np.float32(eps) * (z * np.float32(0.5))
        np.testing.assert_array_equal(rows[k][lo + bsz : lo + 2 * bsz], [minus] * bsz)
        np.testing.assert_array_equal(rows[k][2 * q * bsz :], [theta] * bsz)


@pytest.mark.parametrize("mode", ["fzoo", "hizoo"])
def test_row_budget_changes_nothing(mode):
    params, eng = _quadratic()
    batch = make_batch(0, 0, size=3)
    kw = dict(run_seed=2, step=1, q=4, eps=1e-3, mode=mode)
    whole = evaluate_queries(eng, params, {}, batch, **kw)
    chunked = evaluate_queries(eng, params, {}, batch, row_budget=5, **kw)
    np.testing.assert_array_equal(whole.g, chunked.g)
    assert chunked.forwards > 1 and whole.forwards == 1
    assert whole.rows == (4 + 1 if mode == "fzoo" else 2 * 4 + 1) * 3


# -- FZOO ----------------------------------------------------------------------------------------


def test_fzoo_scalars_formula_and_zero_spread_guard():
    plus, zero = np.array([1.0, 1.5, 0.5, 3.0]), 1.2
    g, std = fzoo_scalars(plus, zero)
    assert std == pytest.approx(np.std(plus, ddof=1))
    np.testing.assert_allclose(g, (plus - zero) / np.std(plus, ddof=1))
    for flat in (np.array([2.0, 2.0, 2.0]), np.array([5.0])):  # no spread: no step
        g, _ = fzoo_scalars(flat, 1.0)
        np.testing.assert_array_equal(g, np.zeros_like(flat))


def test_fzoo_step_is_scale_free():
    """Normalising by σ makes the step independent of the loss scale (and of ε, to first order)."""
    params, eng = _quadratic()
    batch = make_batch(0, 0, size=2)
    small = evaluate_queries(eng, params, {}, batch, run_seed=1, step=0, q=8, eps=1e-3, mode="fzoo")
    eng2 = NumpyEngine("quadratic", targets=eng.targets)
    eng2._quadratic = lambda b, lora: 100.0 * NumpyEngine._quadratic(eng, b, lora)
    big = evaluate_queries(eng2, params, {}, batch, run_seed=1, step=0, q=8, eps=1e-3, mode="fzoo")
    np.testing.assert_allclose(big.g, small.g, rtol=1e-3, atol=1e-3)
    assert big.std == pytest.approx(100.0 * small.std, rel=1e-3)


def test_fzoo_direction_matches_true_gradient():
    """cos(ĝ, ∇L) for ĝ = mean_i s_i u_i, s_i ∝ u_i·∇L (σ only rescales). With Rademacher u,
    ĝ = ∇L + noise, E||noise||² = (n − 1)||∇L||² / N, so cos ≈ 1/sqrt(1 + (n − 1)/N): 0.944 for
    n = 32 parameters and N = 256 queries. Over M seeds the mean cosine has standard error
    ≈ 0.0125/√M; allow 4 of them plus 0.01 for Jensen's bias of the ratio."""
    params, eng = _quadratic()
    batch = make_batch(0, 0, size=2)
    truth = _flat(eng.true_grad(params, {}, batch))
    n, q, seeds = truth.size, 256, 30
    cosines = []
    for seed in range(seeds):
        res = evaluate_queries(
            eng, params, {}, batch, run_seed=seed, step=0, q=q, eps=1e-3, mode="fzoo"
        )
        est = _flat(grad_from_scalars(params, res.g, seed, 0, "rademacher"))
        cosines.append(est @ truth / np.linalg.norm(est) / np.linalg.norm(truth))
    predicted = 1.0 / np.sqrt(1.0 + (n - 1) / q)
    assert np.mean(cosines) > 0.9
    assert abs(np.mean(cosines) - predicted) < 4 * np.std(cosines) / np.sqrt(seeds) + 0.01


# -- HiZOO ---------------------------------------------------------------------------------------


def _hizoo_settings(**kw):
    base = dict(estimator="hizoo", lr=0.0, queries=4, eps=1e-2, batch_size=1, loss="lm")
    return settings(**(base | kw))


def test_hizoo_with_identity_sigma_is_spsa():
    """Σ = I (a fresh state): HiZOO's rows, scalars and update are P-RGE's, bit for bit."""
    params, eng = _quadratic()
    batch = make_batch(0, 0, size=2)
    for seed in range(3):
        kw = dict(run_seed=seed, step=4, q=3, eps=1e-3)
        spsa = evaluate_queries(eng, params, {}, batch, mode="batched", **kw)
        est = hizoo.init_hessian(params)
        res = evaluate_queries(
            eng, params, {}, batch, mode="hizoo", scale=hizoo.inv_sqrt(est), **kw
        )
        np.testing.assert_array_equal(res.g, spsa.g)
        grads, _ = hizoo.replay(params, est, res.g, res.curv, seed, 4, alpha=1e-8)
        want = grad_from_scalars(params, spsa.g, seed, 4)
        for k in params:
            np.testing.assert_array_equal(grads[k], want[k])


def test_hizoo_estimate_is_preconditioned_gradient():
    """E[g Σ^{-1/2} z] = Σ^{-1}∇L (central differences are exact on a quadratic). Component j
    of one sample is Σ_j^{-1/2} z_j (zᵀa), a = Σ^{-1/2}∇L, with variance (|a|² + a_j²)/Σ_j;
    the mean of M·q samples is within 5 standard deviations of Σ^{-1}∇L."""
    params, eng = _quadratic(shape=(1, 4))
    batch = make_batch(0, 0, size=2)
    rng = np.random.default_rng(3)
    est = {
        hizoo.PREFIX + k: rng.uniform(0.25, 4.0, v.shape).astype(np.float32)
        for k, v in params.items()
    }
    sigma = _flat({k[len(hizoo.PREFIX) :]: v for k, v in est.items()})
    grad = _flat(eng.true_grad(params, {}, batch))
    q, seeds = 16, 300
    total = np.zeros_like(grad)
    for seed in range(seeds):
        res = evaluate_queries(
            eng,
            params,
            {},
            batch,
            run_seed=seed,
            step=0,
            q=q,
            eps=1e-3,
            mode="hizoo",
            scale=hizoo.inv_sqrt(est),
        )
        total += _flat(hizoo.replay(params, est, res.g, res.curv, seed, 0, alpha=0.0)[0])
    a = grad / np.sqrt(sigma)
    std = np.sqrt((a @ a + a * a) / sigma / (q * seeds))
    np.testing.assert_array_less(np.abs(total / seeds - grad / sigma), 5 * std)


@pytest.mark.parametrize("at_fixed_point", [False, True])
def test_hizoo_hessian_sample_expectation(at_fixed_point):
    """At θ = θ* (so c_i = ½ z_iᵀ Ĥ z_i ≥ 0, Ĥ = Σ^{-1/2} H Σ^{-1/2}), the Σ sample
    Σ ⊙ mean_i |c_i| z_i² has expectation Σ ⊙ (½ tr Ĥ + diag Ĥ): H + ½ tr H at Σ = I, and Σ
    itself at Σ = (n + 2)/2 · H (the fixed point). α = 1 makes one step's Σ that sample; the
    mean over M steps must lie within 5 standard errors of it."""
    targets, eng = _diag_problem()
    s = _hizoo_settings(hizoo_smooth=1.0, queries=32)
    state = init_state(targets, {}, s)
    if at_fixed_point:
        fixed = {
            hizoo.PREFIX + k: ((N_HESS + 2) / 2 * h).astype(np.float32) for k, h in HESS.items()
        }
        state = replace(state, est_state=fixed)
    sigma = _flat({k[len(hizoo.PREFIX) :]: v for k, v in state.est_state.items()})
    h_hat = _flat(HESS) / sigma
    want = sigma * (0.5 * h_hat.sum() + h_hat)
    samples = []
    for t in range(150):
        new, _ = zo_step(eng, replace(state, step=t), make_batch(0, t, 1), s)
        samples.append(_flat({k[len(hizoo.PREFIX) :]: v for k, v in new.est_state.items()}))
    samples = np.array(samples)
    stderr = samples.std(axis=0) / np.sqrt(len(samples))
    np.testing.assert_array_less(np.abs(samples.mean(axis=0) - want), 5 * stderr)


def test_hizoo_sigma_tracks_the_diagonal_hessian():
    """Run the EMA from Σ = I: it settles at (n + 2)/2 · diag(H) (see zoo_ort.zo.hizoo). With
    α = 0.05 the slowest mode relaxes in ~1/(α·2/(n+2)) = 80 steps; after 400 the average of
    800 more is within a factor 1.5 (log error < 0.4; observed ≤ 0.25) of it, while staying at
    Σ = I would be off by up to a factor 16."""
    targets, eng = _diag_problem()
    s = _hizoo_settings(hizoo_smooth=0.05, queries=8, seed=0)
    state = init_state(targets, {}, s)
    total = {k: np.zeros_like(v) for k, v in state.est_state.items()}
    for t in range(1200):
        state, _ = zo_step(eng, state, make_batch(0, t, 1), s)
        if t >= 400:
            total = {k: total[k] + v for k, v in state.est_state.items()}
    kappa = (N_HESS + 2) / 2
    got = _flat({k[len(hizoo.PREFIX) :]: v / 800 / kappa for k, v in total.items()})
    assert np.abs(np.log(got / _flat(HESS))).max() < 0.4


def test_hizoo_non_finite_step_keeps_sigma():
    params, eng = _quadratic()
    s = _hizoo_settings(hizoo_smooth=0.5, batch_size=2, lr=0.1)
    state = init_state(params, {}, s)
    new, rec = zo_step(eng, state, make_batch(0, 0, size=2, poison=True), s)
    assert rec["skipped"] and new.non_finite == 1
    for k, v in state.est_state.items():
        np.testing.assert_array_equal(new.est_state[k], v)


# -- training and resume -------------------------------------------------------------------------

TRAIN = {
    "fzoo": dict(estimator="fzoo", lr=0.05, schedule="cosine", queries=8),
    "hizoo": dict(estimator="hizoo", lr=0.02, queries=4, hizoo_smooth=1e-3),
}


def _train(run_dir, estimator, **kw):
    params = {"l0.B": np.zeros((2, 8), np.float32), "l1.B": np.zeros((2, 8), np.float32)}
    rng = np.random.default_rng(0)
    targets = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    engine = NumpyEngine("quadratic", targets=targets)
    base = dict(steps=150, eps=1e-3, batch_size=2, optimizer="sgd", loss="lm", save_every=0)
    cfg = settings(**(base | TRAIN.get(estimator, {}) | kw.pop("config", {})))
    res = train(engine, params, {}, batches_fn(size=2), cfg, run_dir, **kw)
    return res, targets


@pytest.mark.parametrize("estimator", sorted(TRAIN))
def test_training_drives_the_loss_down(tmp_path, estimator):
    res, targets = _train(tmp_path, estimator)
    losses = [r["loss"] for r in res.history]
    assert np.mean(losses[-10:]) < 0.1 * np.mean(losses[:5])
    dist0 = sum(float((t**2).sum()) for t in targets.values())
    dist = sum(float(((res.params[k] - t) ** 2).sum()) for k, t in targets.items())
    assert dist < 0.1 * dist0


def _stop_after(n):
    calls = iter(range(10**9))
    return lambda: next(calls) >= n


@pytest.mark.parametrize("estimator", sorted(TRAIN))
def test_resume_is_bit_identical(tmp_path, estimator):
    config = dict(steps=20, save_every=4, hizoo_smooth=0.05)  # Σ moves visibly
    ref, _ = _train(tmp_path / "ref", estimator, config=config)
    run = tmp_path / "run"
    for j, n in enumerate((7, 6)):
        res, _ = _train(run, estimator, config=config, resume=j > 0, should_stop=_stop_after(n))
        assert res.stopped
    res, _ = _train(run, estimator, config=config, resume=True)
    assert res.step == ref.step == 20 and res.resumed_from == 13
    for k in ref.params:
        np.testing.assert_array_equal(res.params[k], ref.params[k])
    a, b = load_latest(tmp_path / "ref"), load_latest(run)
    assert set(a.opt_state) == set(b.opt_state)
    for k in a.opt_state:
        np.testing.assert_array_equal(a.opt_state[k], b.opt_state[k])
    est = [k for k in a.opt_state if k.startswith("est/")]
    assert bool(est) == (estimator == "hizoo")
    assert all(not np.all(a.opt_state[k] == 1.0) for k in est)  # Σ was trained and restored


def test_resume_accepts_checkpoint_from_before_a_new_setting(tmp_path):
    """A checkpoint written before ``hizoo_smooth`` existed resumes when it is at its default."""
    config = dict(steps=8, save_every=4, lr=0.02)
    ref, _ = _train(tmp_path / "ref", "batched", config=config)
    run = tmp_path / "run"
    _train(run, "batched", config=config, should_stop=_stop_after(4))
    ckpt = load_latest(run)
    del ckpt.info["config"]["hizoo_smooth"]
    ckpt.info["identity_hash"] = "older"
    save_checkpoint(run, ckpt)
    with pytest.raises(ZooError, match="hizoo_smooth: None -> 0.1"):  # a real change
        _train(run, "batched", config=config | {"hizoo_smooth": 0.1}, resume=True)
    res, _ = _train(run, "batched", config=config, resume=True)
    for k in ref.params:
        np.testing.assert_array_equal(res.params[k], ref.params[k])


# -- settings ------------------------------------------------------------------------------------


def test_unknown_estimator_names_the_choices():
    with pytest.raises(ZooError, match="estimator must be one of batched, sequential, fzoo, hizoo"):
        settings(estimator="adamzo")
    params, eng = _quadratic()
    with pytest.raises(ZooError, match="use one of " + ", ".join(ESTIMATORS)):
        evaluate_queries(
            eng, params, {}, make_batch(0, 0), run_seed=0, step=0, q=1, eps=1e-3, mode="adamzo"
        )


def test_new_settings_are_validated():
    for q in (1, 2):  # two losses' spread is near zero whenever they score alike
        with pytest.raises(ZooError, match=rf"fzoo needs queries >= 3 \(got {q}\)"):
            settings(estimator="fzoo", queries=q)
    assert settings(estimator="fzoo", queries=3).queries == 3
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ZooError, match="hizoo_smooth must be in"):
            settings(hizoo_smooth=bad)
    assert settings(estimator="hizoo").hizoo_smooth == 1e-8  # the paper's smoothing
