"""The P-RGE estimator against analytic references (tests/numpy_engine.py)."""

from __future__ import annotations

import numpy as np
import pytest
from numpy_engine import NumpyEngine, lora_tensors, make_batch, split_fa

from zoo_ort.engine.scratch import Scratch
from zoo_ort.errors import ZooError
from zoo_ort.zo import (
    directions,
    evaluate_queries,
    grad_from_scalars,
    pair_losses,
    perturbed_lora,
    projected_grads,
    row_slices,
)


def _setup(b_scale=0.1):
    params, frozen = split_fa(lora_tensors(b_scale=b_scale))
    return params, frozen


def test_directions_follow_documented_seed_layout():
    shapes = {"b": np.zeros((2, 3), np.float32), "a": (4,)}
    z = directions(shapes, run_seed=7, step=11, query=2)
    rng = np.random.default_rng(np.random.SeedSequence([7, 11, 2]))
    want_a = rng.standard_normal((4,), dtype=np.float32)  # sorted order: "a" first
    want_b = rng.standard_normal((2, 3), dtype=np.float32)
    assert list(z) == ["a", "b"]
    np.testing.assert_array_equal(z["a"], want_a)
    np.testing.assert_array_equal(z["b"], want_b)
    assert z["b"].dtype == np.float32
    other = directions(shapes, run_seed=7, step=11, query=3)
    assert not np.array_equal(other["a"], z["a"])
    assert not np.array_equal(directions(shapes, 7, 12, 2)["a"], z["a"])
    assert not np.array_equal(directions(shapes, 8, 11, 2)["a"], z["a"])


def test_row_layout_query_sign_example():
    params, frozen = _setup()
    before = {k: v.copy() for k, v in params.items()}
    q, bsz, eps = 3, 2, 0.05
    rows = perturbed_lora(params, frozen, run_seed=5, step=4, q=q, eps=eps, batch_size=bsz)
    for k, v in params.items():
        np.testing.assert_array_equal(v, before[k])  # not mutated
    for k, v in frozen.items():
        assert rows[k] is v  # shared, no row dim
    for i in range(q):
        z = directions(params, 5, 4, i)
        for s, sign in enumerate((1.0, -1.0)):
            for b in range(bsz):
                n = (i * 2 + s) * bsz + b
                for k in params:
                    assert rows[k].shape == (q * 2 * bsz, *params[k].shape)
                    want = params[k] + np.float32(sign) * np.float32(eps) * z[k]
                    np.testing.assert_array_equal(rows[k][n], want)
                    np.testing.assert_allclose(rows[k][n], params[k] + sign * eps * z[k], atol=1e-7)


def test_row_ranges_are_bit_identical_to_full_layout():
    params, frozen = _setup()
    full = perturbed_lora(params, frozen, 1, 2, q=4, eps=1e-2, batch_size=3)
    for size in (1, 2, 5, 7, 24):
        parts = [
            perturbed_lora(params, frozen, 1, 2, q=4, eps=1e-2, batch_size=3, rows=r)
            for r in row_slices(24, 3, "batched", size)
        ]
        for k in params:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])


def test_scratch_rows_match_fresh_rows_and_reuse_memory():
    params, frozen = _setup()
    scratch = Scratch()
    for step in (2, 3):  # the second step writes into the first one's memory
        fresh = perturbed_lora(params, frozen, 1, step, q=2, eps=1e-2, batch_size=3)
        reused = perturbed_lora(params, frozen, 1, step, 2, 1e-2, 3, scratch=scratch)
        for k in params:
            np.testing.assert_array_equal(reused[k], fresh[k])
        if step == 2:
            first = {k: reused[k].__array_interface__["data"][0] for k in params}
    assert {k: reused[k].__array_interface__["data"][0] for k in params} == first
    # A smaller request views the same buffer; a larger one grows it.
    held = scratch.nbytes
    small = perturbed_lora(params, frozen, 1, 4, 1, 1e-2, 3, rows=slice(0, 2), scratch=scratch)
    assert scratch.nbytes == held and all(small[k].shape[0] == 2 for k in params)
    perturbed_lora(params, frozen, 1, 4, q=5, eps=1e-2, batch_size=3, scratch=scratch)
    assert scratch.nbytes > held


def test_evaluate_queries_same_with_scratch():
    params, frozen = _setup(b_scale=0.3)
    engine = NumpyEngine("softmax")
    batch = make_batch(1, 0, size=3)
    kw = dict(run_seed=3, step=1, q=2, eps=1e-2, loss="lm")
    scratch = Scratch()
    want = evaluate_queries(engine, params, frozen, batch, **kw)
    for _ in range(2):
        got = evaluate_queries(engine, params, frozen, batch, scratch=scratch, **kw)
        np.testing.assert_array_equal(got.g, want.g)


def test_row_slices():
    assert row_slices(12, 3, "batched", None) == [slice(0, 12)]
    assert row_slices(12, 3, "batched", 5) == [slice(0, 5), slice(5, 10), slice(10, 12)]
    assert row_slices(12, 3, "sequential", None) == [slice(i, i + 3) for i in range(0, 12, 3)]
    with pytest.raises(ZooError):
        row_slices(12, 3, "parallel", None)


def test_projected_grads_formula():
    q, bsz, eps = 2, 3, 0.1
    # rows: [q0 +: 1,2,3][q0 -: 0,0,0][q1 +: 5,5,5][q1 -: 6,7,8]
    losses = np.array([1, 2, 3, 0, 0, 0, 5, 5, 5, 6, 7, 8], dtype=np.float32)
    plus, minus = pair_losses(losses, q, bsz)
    np.testing.assert_allclose(plus, [2.0, 5.0])
    np.testing.assert_allclose(minus, [0.0, 7.0])
    np.testing.assert_allclose(projected_grads(losses, q, bsz, eps), [2 / 0.2, -2 / 0.2])


def test_grad_from_scalars_is_mean_of_g_times_z():
    params, _ = _setup()
    g = np.array([0.5, -2.0, 3.0])
    got = grad_from_scalars(params, g, run_seed=3, step=9)
    zs = [directions(params, 3, 9, i) for i in range(3)]
    for k in params:
        want = sum(g[i] * zs[i][k].astype(np.float64) for i in range(3)) / 3
        np.testing.assert_allclose(got[k], want, rtol=1e-6, atol=1e-6)
        assert got[k].dtype == np.float32


def test_engine_sees_tiled_batch():
    params, frozen = _setup()
    batch = make_batch(0, 0, size=3)
    seen = []

    class Recorder(NumpyEngine):
        def forward(self, tokens, lora):
            seen.append((tokens, lora))
            return super().forward(tokens, lora)

    evaluate_queries(Recorder(), params, frozen, batch, run_seed=0, step=0, q=2, eps=1e-2)
    ((tokens, lora),) = seen
    assert tokens.rows == 12
    np.testing.assert_array_equal(tokens.input_ids, np.tile(batch.tokens.input_ids, (4, 1)))
    assert lora["l0.B"].shape == (12, 2, 8) and lora["l0.A"].shape == (6, 2)


@pytest.mark.parametrize("loss", ["lm", "candidates"])
def test_projected_grad_is_directional_derivative(loss):
    """For small eps, g_i = z_i·∇L (central difference), checked against the analytic ∇L."""
    eng = NumpyEngine("softmax")
    params, frozen = _setup(b_scale=0.3)
    batch = make_batch(1, 0, size=5)
    true = eng.true_grad(params, frozen, batch, loss)
    res = evaluate_queries(eng, params, frozen, batch, run_seed=4, step=3, q=6, eps=1e-2, loss=loss)
    want = [
        sum(float((true[k] * z[k]).sum()) for k in params)
        for z in (directions(params, 4, 3, i) for i in range(6))
    ]
    np.testing.assert_allclose(res.g, want, rtol=2e-3, atol=2e-3)
    # a sign error in the layout would flip them
    assert np.all(
        np.sign(res.g[np.abs(want) > 0.05]) == np.sign(np.array(want)[np.abs(want) > 0.05])
    )


def test_estimate_is_unbiased_on_quadratic():
    """E[mean_i g_i z_i] = ∇L. On a quadratic the central difference is exact, so each sample
    is (z·a) z with per-coordinate variance ||a||² + a_j²; the mean of M samples must lie within
    5 standard errors."""
    rng = np.random.default_rng(0)
    params = {"l0.B": rng.standard_normal((2, 3)).astype(np.float32)}
    targets = {"l0.B": rng.standard_normal((2, 3)).astype(np.float32)}
    frozen = {"l0.A": np.zeros((6, 2), np.float32)}
    eng = NumpyEngine("quadratic", targets=targets)
    batch = make_batch(0, 0, size=4)
    true = eng.true_grad(params, frozen, batch)["l0.B"]
    q, steps = 8, 400
    acc = np.zeros_like(true)
    for step in range(steps):
        res = evaluate_queries(eng, params, frozen, batch, run_seed=1, step=step, q=q, eps=1e-3)
        acc += grad_from_scalars(params, res.g, 1, step)["l0.B"]
    mean = acc / steps
    se = np.sqrt(((true**2).sum() + true**2) / (q * steps))
    assert np.all(np.abs(mean - true) < 5 * se), (mean, true, se)
    # and the test can fail: a wrong sign or scale is far outside
    assert np.all(np.abs(-mean - true)[np.abs(true) > 6 * se] > 5 * se[np.abs(true) > 6 * se])


@pytest.mark.parametrize("loss", ["lm", "candidates"])
def test_batched_sequential_and_chunked_agree(loss):
    params, frozen = _setup(b_scale=0.2)
    batch = make_batch(2, 5, size=3)
    outs = {}
    for mode, budget in (("batched", None), ("sequential", None), ("batched", 5), ("batched", 7)):
        eng = NumpyEngine("softmax")
        res = evaluate_queries(
            eng,
            params,
            frozen,
            batch,
            run_seed=9,
            step=5,
            q=4,
            eps=1e-2,
            loss=loss,
            mode=mode,
            row_budget=budget,
        )
        outs[(mode, budget)] = (res, grad_from_scalars(params, res.g, 9, 5), eng.calls)
    ref, ref_grad, calls = outs[("batched", None)]
    assert calls == [24]
    assert outs[("sequential", None)][2] == [3] * 8
    assert outs[("batched", 5)][2] == [5, 5, 5, 5, 4]
    for res, grad, _ in outs.values():
        np.testing.assert_array_equal(res.g, ref.g)
        for k in params:
            np.testing.assert_array_equal(grad[k], ref_grad[k])


def test_non_finite_losses_are_flagged():
    params, frozen = _setup()
    good = evaluate_queries(
        NumpyEngine(), params, frozen, make_batch(0, 0), run_seed=0, step=0, q=2, eps=1e-2
    )
    bad = evaluate_queries(
        NumpyEngine(),
        params,
        frozen,
        make_batch(0, 0, poison=True),
        run_seed=0,
        step=0,
        q=2,
        eps=1e-2,
    )
    assert good.finite and not bad.finite


def test_candidates_loss_needs_labels():
    params, frozen = _setup()
    batch = make_batch(0, 0)
    from zoo_ort.engine.protocol import LabeledBatch

    with pytest.raises(ZooError, match="candidates"):
        evaluate_queries(
            NumpyEngine(),
            params,
            frozen,
            LabeledBatch(batch.tokens, None),
            run_seed=0,
            step=0,
            q=1,
            eps=1e-2,
            loss="candidates",
        )
