"""The PyTorch reference trainers of the benchmark suite, on a tiny random model (seconds)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not an installed package
    sys.path.insert(0, str(REPO_ROOT))

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from benchmarks import common  # noqa: E402
from benchmarks import torch_baselines as tb  # noqa: E402

DATA = REPO_ROOT.parent / "shared" / "data" / "sst2"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data/sst2")


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = tb.load_tiny("llama", seed=0, hidden=32)
    data = tb.load_prompt_data(tokenizer, train_limit=64, dev_limit=16)
    return model, tokenizer, data


def fresh_lora(tiny, seed: int = 0):
    """A LoRA-FA model over a private copy of the tiny base (trainers mutate their model)."""
    import copy

    model, _, _ = tiny
    return tb.add_lora_fa(copy.deepcopy(model), rank=4, alpha=8, seed=seed)


def reference_loss(model, data, idx) -> float:
    """Candidate loss row by row, unpadded, through the full HF forward (logits of every token)."""
    losses = []
    with torch.no_grad():
        for i in idx:
            ids = torch.tensor([data.train_ids[i].tolist()])
            logits = model(input_ids=ids).logits[0, -1, list(data.candidate_ids)]
            target = torch.tensor(int(data.train_labels[i]))
            losses.append(float(torch.nn.functional.cross_entropy(logits, target)))
    return float(np.mean(losses))


def lora_b(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_B." in n}


def test_tiny_tokenizer_and_prompt_data(tiny):
    _, tokenizer, data = tiny
    neg, pos = data.candidate_ids
    assert neg != pos
    assert tokenizer.convert_ids_to_tokens([neg, pos]) == ["negative", "positive"]
    assert len(data.train_ids) == 64 and len(data.dev_ids) == 16
    assert set(data.train_labels.tolist()) <= {0, 1}
    batch = data.train_batch(seed=3, step=5, size=4)
    idx = data.train_indices(3, 5, 4)
    assert len(set(idx.tolist())) == 4
    for row, i in enumerate(idx):
        n = len(data.train_ids[i])
        assert batch.input_ids[row, :n].tolist() == data.train_ids[i].tolist()
        assert batch.attention_mask[row].sum() == n
        assert batch.answer_pos[row] == n - 1
        assert int(batch.labels[row]) == data.train_labels[i]
    # Batches are a pure function of (seed, step) and differ between steps.
    assert np.array_equal(idx, data.train_indices(3, 5, 4))
    assert not np.array_equal(idx, data.train_indices(3, 6, 4))


def test_candidate_logits_match_full_forward_per_row(tiny):
    model = fresh_lora(tiny)
    with torch.no_grad():  # a nonzero adapter so that LoRA is part of what is checked
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.5)
    data = tiny[2]
    batch = data.train_batch(0, 0, 6)
    idx = data.train_indices(0, 0, 6)
    with torch.no_grad():
        got = tb.candidate_logits(model, batch, data.candidate_ids)
        for row, i in enumerate(idx):
            ids = torch.tensor([data.train_ids[i].tolist()])
            want = model(input_ids=ids).logits[0, -1, list(data.candidate_ids)]
            torch.testing.assert_close(got[row], want, rtol=1e-4, atol=1e-5)


def test_lora_fa_freezes_everything_but_b(tiny):
    model = fresh_lora(tiny)
    names = [n for n, _ in tb.trainable_params(model)]
    assert names and all(".lora_B." in n for n in names)
    assert all(("q_proj" in n) or ("v_proj" in n) for n in names)
    assert len(names) == 2 * 2  # 2 layers x (q_proj, v_proj)
    assert all(float(p.detach().abs().max()) == 0.0 for _, p in tb.trainable_params(model))


def test_set_lora_weights_uses_zoo_ort_convention(tiny):
    model = fresh_lora(tiny)
    path = "model.layers.0.self_attn.q_proj"
    module = model.get_base_model().get_submodule(path)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((module.in_features, 4)).astype(np.float32)
    b = rng.standard_normal((4, module.out_features)).astype(np.float32)
    tb.set_lora_weights(model, {path: (a, b)})
    x = rng.standard_normal((3, module.in_features)).astype(np.float32)
    w = module.base_layer.weight.detach().numpy()
    want = x @ w.T + (8 / 4) * (x @ a) @ b  # y = x W^T + (alpha/r) x A B
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_mezo_step_matches_independent_spsa(tiny):
    _, _, data = tiny
    seed, B, q, lr, eps = 7, 4, 2, 0.5, 0.05
    model = fresh_lora(tiny)
    reference = fresh_lora(tiny)
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}

    result = tb.mezo_torch(model, data, steps=1, lr=lr, eps=eps, q=q, B=B, seed=seed, dev_rows=4)
    got = lora_b(model)

    # Independent SPSA: z from each query's seed in parameter order, θ ± εz set explicitly (no
    # in-place replay), losses from the full forward row by row, θ1 = θ0 - lr · mean_i g_i z_i.
    names = list(lora_b(reference))
    params = dict(reference.named_parameters())
    idx = data.train_indices(seed, 0, B)
    expected = {n: torch.zeros_like(params[n]) for n in names}
    gs = []
    for i in range(q):
        gen = torch.Generator().manual_seed(tb.query_seed(seed, 0, i))
        z = {n: torch.randn(params[n].shape, generator=gen) for n in names}
        losses = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for n in names:
                    params[n].copy_(sign * eps * z[n])
            losses.append(reference_loss(reference, data, idx))
        g = (losses[0] - losses[1]) / (2 * eps)
        gs.append(g)
        for n in names:
            expected[n] -= lr * g * z[n] / q

    assert min(abs(g) for g in gs) > 1e-3  # the check below is not vacuous
    scale = max(float(t.abs().max()) for t in expected.values())
    for n in names:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-3, atol=1e-3 * scale)
    for n, p in model.named_parameters():
        if ".lora_A." in n:
            assert torch.equal(p, a_before[n])
        elif "lora_" not in n:
            assert torch.equal(p, base_before[n])
    assert result["steps_done"] == 1 and result["rows_per_step"] == 2 * q * B


def test_first_order_decreases_loss_on_repeated_batch(tiny):
    _, tokenizer, _ = tiny
    data = tb.load_prompt_data(tokenizer, train_limit=4, dev_limit=4)  # every batch = same 4 rows
    model = fresh_lora(tiny)
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}
    result = tb.first_order_torch(model, data, steps=10, lr=2e-2, B=4, dev_rows=4)
    losses = result["train_loss"]
    assert losses[-1] < losses[0] - 0.05, losses
    for n, p in model.named_parameters():
        if ".lora_A." in n:
            assert torch.equal(p, a_before[n])
    assert any(float(p.detach().abs().max()) > 0 for _, p in tb.trainable_params(model))


@pytest.mark.parametrize("which", ["mezo", "first_order"])
def test_result_fields(tiny, which):
    _, _, data = tiny
    model = fresh_lora(tiny)
    trainer = tb.mezo_torch if which == "mezo" else tb.first_order_torch
    r = trainer(model, data, steps=3, B=2, eval_every=2, dev_rows=8)
    assert r["steps_done"] == 3 and r["stopped"] == "steps"
    assert len(r["step_times_s"]) == len(r["train_loss"]) == 3
    assert [c["step"] for c in r["curve"]] == [0, 2, 3]
    for c in r["curve"]:
        assert 0.0 <= c["dev_acc"] <= 1.0 and c["dev_rows"] == 8
        assert c["train_s"] <= c["wall_s"]
    assert r["final"] == r["curve"][-1]
    assert r["trainable_params"] == sum(p.numel() for _, p in tb.trainable_params(model))
    assert r["threads"] >= 1 and r["median_step_s"] > 0
    json.dumps(r)  # results travel as JSON


def test_time_budget_stops_after_the_minimum_steps(tiny):
    """A spent budget stops a contender, but never before MIN_STEPS steps (a loaded machine must
    not leave a curve of one point)."""
    _, _, data = tiny
    r = tb.mezo_torch(fresh_lora(tiny), data, steps=50, B=2, dev_rows=4, time_budget_s=0.0)
    assert r["steps_done"] == common.MIN_STEPS and r["stopped"] == "time_budget"


def test_forward_only(tiny):
    _, _, data = tiny
    r = tb.forward_only_torch(fresh_lora(tiny), data, rows=3, repeats=2)
    assert r["rows"] == 3 and len(r["times_s"]) == 2 and r["rows_per_s"] > 0


# ---------------------------------------------------------------------------------------------
# benchmarks.common


def test_markdown_table_and_write_results(tmp_path):
    rows = [
        {"name": "a", "x": 1.23456, "curve": [1, 2]},
        {"name": "b|c", "x": None, "y": 12345.6},
    ]
    table = common.markdown_table(rows, ["name", ("x", "X value"), "y"])
    lines = table.strip().splitlines()
    assert lines[0] == "| name | X value | y |"
    assert lines[2] == "| a | 1.235 |  |"
    assert lines[3] == "| b\\|c |  | 12,346 |"
    out = common.write_results(tmp_path / "res", "demo", rows, {"k": 1})
    data = json.loads((tmp_path / "res" / "demo.json").read_text())
    assert data["rows"] == rows and data["meta"] == {"k": 1}
    assert data["machine"]["cpu_count"] >= 1
    assert "curve" not in out.splitlines()[0]  # list columns stay in the JSON only
    assert (tmp_path / "res" / "demo.md").read_text().endswith(out)


def test_machine_info_fields():
    info = common.machine_info()
    for key in ("cpu_model", "cpu_count", "cpu_affinity", "ram_total_mb", "os", "python"):
        assert key in info
    assert info["versions"]["numpy"] == np.__version__


def test_peak_rss_sees_a_transient_allocation():
    with common.PeakRSS() as rss:
        block = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
        del block
    assert rss.peak_mb is not None and rss.rss_before_mb is not None
    assert rss.peak_mb >= rss.rss_before_mb + 150, rss.as_dict()


def test_run_in_subprocess_returns_child_result_and_rss():
    r = common.run_in_subprocess("benchmarks.common:machine_info", {})
    assert r["cpu_count"] >= 1 and r["peak_rss_mb"] > 0 and r["child_wall_s"] > 0
    with pytest.raises(RuntimeError, match="no_such_function"):
        common.run_in_subprocess("benchmarks.common:no_such_function", {})


# ---------------------------------------------------------------------------------------------
# The real model (run with -m slow)


@pytest.mark.slow
def test_smollm2_smoke():
    pytest.importorskip("gguf")
    try:
        tb.smollm2_location()
    except RuntimeError as e:
        pytest.skip(str(e))
    model, tokenizer = tb.load_smollm2()
    data = tb.load_prompt_data(tokenizer, train_limit=64, dev_limit=8)
    assert tokenizer.convert_ids_to_tokens(list(data.candidate_ids)) == ["Ġnegative", "Ġpositive"]
    net = tb.add_lora_fa(model)
    r = tb.mezo_torch(net, data, steps=2, B=2, dev_rows=8)
    assert r["steps_done"] == 2 and np.isfinite(r["train_loss"]).all()


def test_zoo_directions_are_zoo_orts_z_on_peft_weights(tiny_model_dir, tiny_bundle):
    from zoo_ort.bundle import load_bundle
    from zoo_ort.zo import directions

    base, _ = tb.load_hf_folder(str(tiny_model_dir("llama")))
    net = tb.add_lora_fa(base, rank=4, alpha=8)
    tb.load_lora_init(net, tiny_bundle)
    bundle = load_bundle(tiny_bundle)
    init = bundle.initial_lora()
    trained = {t.input: init[t.input] for t in bundle.manifest.trainable()}
    sites = {s.B.input: s.module for s in bundle.manifest.lora.sites}
    inner = net.get_base_model()

    def b_of(name):
        return inner.get_submodule(sites[name]).lora_B["default"].weight.detach().numpy().T.copy()

    perturb = tb.zoo_directions(net, tiny_bundle, seed=3)
    perturb(5, 1, 0.5)
    z = directions(trained, 3, 5, 1)
    other = directions(trained, 3, 5, 0)
    for name, theta in trained.items():
        np.testing.assert_allclose(b_of(name), theta + 0.5 * z[name], rtol=1e-6, atol=1e-6)
        assert not np.allclose(z[name], other[name])  # each query has its own z
    perturb(5, 1, -0.5)
    for name, theta in trained.items():
        np.testing.assert_allclose(b_of(name), theta, atol=1e-6)
