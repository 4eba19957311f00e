"""Length grouping: optimal against brute force, and invisible in the engine's results."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from handbuilt_graph import make_bundle, random_batch, random_lora, reference, weights

from zoo_ort.engine import OrtEngine
from zoo_ort.engine.padding import length_groups, row_widths, take_trimmed
from zoo_ort.engine.protocol import TokenBatch


def _cost(groups, widths, call_cost):
    return sum(len(g) * int(widths[g].max()) + call_cost for g in groups)


def _brute_force(widths, max_groups, call_cost):
    """Cheapest split over every assignment of rows to at most ``max_groups`` labelled groups."""
    n, best = len(widths), None
    for labels in itertools.product(range(max_groups), repeat=n):
        groups = [np.flatnonzero(np.array(labels) == k) for k in range(max_groups)]
        groups = [g for g in groups if len(g)]
        cost = _cost(groups, widths, call_cost)
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_groups,call_cost", [(1, 0), (2, 5), (3, 0), (3, 40)])
def test_groups_are_optimal_and_cover_every_row_once(seed, max_groups, call_cost):
    rng = np.random.default_rng(seed)
    widths = rng.integers(1, 30, 7)
    groups = length_groups(widths, max_groups, call_cost)
    assert 1 <= len(groups) <= max_groups
    assert sorted(np.concatenate(groups).tolist()) == list(range(7))
    assert all(np.all(np.diff(g) > 0) for g in groups)
    assert _cost(groups, widths, call_cost) == _brute_force(widths, max_groups, call_cost)


def test_a_high_call_cost_keeps_one_forward():
    assert len(length_groups(np.array([3, 50, 4, 49]), 4, call_cost=10_000)) == 1
    assert len(length_groups(np.array([3, 50, 4, 49]), 4, call_cost=2)) == 2
    assert length_groups(np.array([], dtype=np.int64), 4) == []


def test_widths_cover_real_tokens_and_target_slots():
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0]])
    pos = np.array([[1], [2], [3]])  # row 2: a target slot past its (empty) tokens
    z = np.zeros((3, 1))
    batch = TokenBatch(mask, mask, pos, pos, z.astype(np.float32), pos)
    np.testing.assert_array_equal(row_widths(batch), [2, 4, 4])
    part = take_trimmed(batch, np.array([0]), row_widths(batch))
    assert part.input_ids.shape == (1, 2) and part.rows == 1


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("padding") / "fa", "fa")


def test_grouped_forward_matches_one_forward_and_the_reference(bundle):
    rng = np.random.default_rng(3)
    batch = random_batch(rng, 12, 9, 3, 4)
    assert len(set(row_widths(batch).tolist())) > 2  # mixed lengths: really grouped
    lora = random_lora(bundle.manifest, 12, rng)
    grouped = OrtEngine(bundle, threads=1, length_groups=4)
    single = OrtEngine(bundle, threads=1, length_groups=1)
    grouped.group_call_cost = 0  # split even these short rows
    assert len(length_groups(row_widths(batch), 4, 0)) > 1
    a, b = grouped.forward(batch, lora), single.forward(batch, lora)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.candidate_logprobs, b.candidate_logprobs, rtol=1e-5, atol=1e-5)
    ref = reference(weights(), batch, lora, bundle.manifest.lora.scale)
    np.testing.assert_allclose(a.loss, ref[0], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(a.candidate_logprobs, ref[1], rtol=2e-5, atol=2e-5)
    # The groups' LoRA rows live in reused memory: another batch in between changes nothing.
    other = random_batch(rng, 12, 9, 3, 4)
    grouped.forward(other, random_lora(bundle.manifest, 12, rng))
    again = grouped.forward(batch, lora)
    np.testing.assert_array_equal(again.loss, a.loss)
    np.testing.assert_array_equal(again.candidate_logprobs, a.candidate_logprobs)
    # Whatever the splits, the engine keeps one batch's worth of LoRA rows, not one per group.
    per_row = sum(v.nbytes for k, v in lora.items() if grouped._lora[k].per_row)
    for seed in range(5):
        r = np.random.default_rng(seed)
        grouped.forward(random_batch(r, 12, 9, 3, 4), random_lora(bundle.manifest, 12, r))
    assert 0 < grouped._scratch.nbytes <= per_row


def test_grouping_on_an_exported_model(tiny_bundle):
    """A real exported Llama: trimming padding changes no row's scores."""
    from zoo_ort.bundle import load_bundle

    b = load_bundle(tiny_bundle)
    rng = np.random.default_rng(0)
    lengths = np.array([3, 17, 4, 16, 9, 30, 2, 11])
    n, t = len(lengths), int(lengths.max()) + 6  # extra padding nobody needs
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(3, 300, (n, t)), 0)
    pos = (lengths - 1)[:, None]
    batch = TokenBatch(
        ids, mask, pos, rng.integers(3, 300, (n, 1)), np.ones((n, 1), np.float32),
        np.tile([5, 7], (n, 1)),
    )  # fmt: skip
    lora = random_lora(b.manifest, n, rng)
    for name in lora:  # a trained-looking adapter, so LoRA rows matter
        lora[name] = lora[name] * 0.2
    a = OrtEngine(b, threads=1, length_groups=4).forward(batch, lora)
    c = OrtEngine(b, threads=1, length_groups=1).forward(batch, lora)
    np.testing.assert_allclose(a.loss, c.loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.candidate_logprobs, c.candidate_logprobs, rtol=1e-5, atol=1e-5)
