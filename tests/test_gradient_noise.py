"""benchmarks/gradient_noise.py: the signal and noise of batch gradients against known ones."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.gradient_noise import signal_and_noise  # noqa: E402


@pytest.mark.parametrize("scale", [0.0, 0.3, 1.0])
def test_signal_and_noise_recover_a_known_mean_and_covariance(scale):
    """g_i = mu + noise, noise ~ N(0, diag(s^2)): |mu|^2, tr Cov and their ratio, analytically."""
    rng = np.random.default_rng(0)
    d, n = 50, 4000
    mu = scale * rng.standard_normal(d)
    s = rng.uniform(0.5, 2.0, d)
    g = mu + s * rng.standard_normal((n, d))
    out = signal_and_noise(g)
    true_signal, true_noise = float(mu @ mu), float((s * s).sum())
    # Standard errors with n = 4000: noise ~ tr Cov * sqrt(2/n) / ..., signal ~ sqrt(2 tr(S^2))/n
    # + 2 sqrt(mu' S mu / n); five of them as the tolerance.
    se_signal = np.sqrt(2 * (s**4).sum()) / n + 2 * np.sqrt((mu**2 * s**2).sum() / n)
    assert out["signal"] == pytest.approx(true_signal, abs=5 * se_signal)
    assert out["noise"] == pytest.approx(true_noise, rel=0.05)
    assert out["ratio"] == pytest.approx(true_signal / true_noise, abs=5 * se_signal / true_noise)
    lo, hi = out["ratio_90"]
    assert lo <= out["ratio"] <= hi
    assert out["batches"] == n and out["d"] == d


def test_no_shared_direction_reads_as_zero_not_as_the_noise():
    """Pure noise: the mean gradient's squared norm is about tr Cov / n, but the U-statistic
    removes that bias, so the signal comes out near 0 (either sign)."""
    rng = np.random.default_rng(1)
    g = rng.standard_normal((32, 1000))
    out = signal_and_noise(g)
    naive = float(g.mean(0) @ g.mean(0))  # ~ 1000 / 32
    assert naive > 20
    assert abs(out["signal"]) < 0.2 * naive
    assert out["ratio_90"][0] < 0 < out["ratio_90"][1]


def test_jackknife_error_matches_the_spread_over_repeated_draws():
    """The ratio's standard error from one set of 32 batches is what 300 independent sets of
    32 show (within 30%: a standard error of a standard error, with n = 32)."""
    rng = np.random.default_rng(2)
    d, n = 200, 32
    mu = 0.15 * rng.standard_normal(d)  # ratio |mu|^2 / d ~ 0.02, RTE's order of magnitude
    draws = [signal_and_noise(mu + rng.standard_normal((n, d))) for _ in range(300)]
    spread = float(np.std([o["ratio"] for o in draws]))
    assert np.mean([o["ratio_se"] for o in draws]) == pytest.approx(spread, rel=0.3)
    # Unbiased: the mean over the draws is the true ratio within three standard errors.
    mean = np.mean([o["ratio"] for o in draws])
    assert mean == pytest.approx(float(mu @ mu) / d, abs=3 * spread / np.sqrt(300))
