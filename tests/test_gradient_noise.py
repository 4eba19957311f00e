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


def test_zo_merit_is_the_best_expected_decrease_of_a_gaussian_step():
    """Monte Carlo on L(x) = mu.x + h/2 |x|^2 with batch gradients mu + eps: the step
    x = -eta (z.g) z at the analytic best eta lowers E L by zo_merit / (2 h), and half or twice
    that eta lowers it less."""
    rng = np.random.default_rng(3)
    d, n, h = 20, 400_000, 2.0
    mu = 0.5 * rng.standard_normal(d)
    s = rng.uniform(0.3, 1.5, d)
    signal, noise = float(mu @ mu), float((s * s).sum())
    merit = signal * signal / ((d + 2) * (signal + noise))  # the formula, independently
    from benchmarks.gradient_noise import zo_merit

    assert zo_merit(signal, noise, d) == pytest.approx(merit)
    assert zo_merit(-1.0, noise, d) == 0.0  # no shared direction: nothing to gain
    z = rng.standard_normal((n, d))
    g = mu + s * rng.standard_normal((n, d))
    step = (z * g).sum(1, keepdims=True) * z

    def expected_loss(eta: float) -> float:
        x = -eta * step
        return float((x @ mu + h / 2 * (x * x).sum(1)).mean())

    best = signal / (h * (d + 2) * (signal + noise))
    assert -expected_loss(best) == pytest.approx(merit / (2 * h), rel=0.05)
    assert expected_loss(best) < expected_loss(best / 2)
    assert expected_loss(best) < expected_loss(best * 2)


def test_groups_partition_the_columns_and_find_where_the_signal_gathers():
    """Layers and projections each partition the trained tensors, so the per-group signals and
    noises add up to the whole's exactly; a mean gradient living in one layer gives that layer
    the highest merit and a higher one than the whole."""
    from benchmarks.gradient_noise import grouped, signal_and_noise, tensor_groups, zo_merit

    segments = [
        (f"base_model.model.model.layers.{k}.self_attn.{p}.lora_B.default.weight", size)
        for k in range(12)
        for p, size in (("q_proj", 24), ("v_proj", 8))
    ]
    groups = tensor_groups(segments)
    d = sum(size for _, size in segments)
    layers = [k for k in groups if k.startswith("layer ")]
    bands = [k for k in groups if k.startswith("layers ")]
    assert len(layers) == 12 and sorted(bands) == ["layers 0-9", "layers 10-19"]
    for part in (layers, bands, ["q_proj", "v_proj"]):
        cols = np.sort(np.concatenate([groups[k] for k in part]))
        assert np.array_equal(cols, np.arange(d))
    rng = np.random.default_rng(4)
    mu = np.zeros(d)
    mu[groups["layer 5"]] = 0.4
    g = mu + rng.standard_normal((64, d))
    whole, parts = signal_and_noise(g), grouped(g, segments)
    assert sum(parts[k]["signal"] for k in layers) == pytest.approx(whole["signal"])
    assert sum(parts[k]["noise"] for k in ["q_proj", "v_proj"]) == pytest.approx(whole["noise"])
    best = max(layers, key=lambda k: parts[k]["zo_merit"])
    assert best == "layer 5"
    assert parts[best]["zo_merit"] > 3 * zo_merit(whole["signal"], whole["noise"], d)


@pytest.mark.parametrize("argv", [["--targets", "foo"], ["--batches", "2"]])
def test_bad_flags_exit_2_before_loading_anything(argv, capsys):
    from benchmarks.gradient_noise import main

    with pytest.raises(SystemExit) as e:
        main(["--bundle", "no-such-bundle", *argv])
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()[-1]) > 0
