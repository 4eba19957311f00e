"""benchmarks/head_probe.py: the last layer's tail against the model itself, and its trainers
on a planted problem."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not an installed package
    sys.path.insert(0, str(REPO_ROOT))

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from benchmarks import head_probe as hp  # noqa: E402
from benchmarks import torch_baselines as tb  # noqa: E402

CAND = (5, 9)


@pytest.fixture(scope="module")
def tiny():
    model, _ = tb.load_tiny("llama", seed=0, hidden=32)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _batches(model, rows: int, seed: int) -> list:
    """Right-padded random prompts of 3-11 tokens, batches of 8, random labels."""
    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    out = []
    for lo in range(0, rows, 8):
        lengths = rng.integers(3, 12, size=min(8, rows - lo))
        ids = torch.zeros((len(lengths), int(lengths.max())), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, n in enumerate(lengths):
            ids[i, :n] = torch.as_tensor(rng.integers(1, vocab, size=n))
            mask[i, :n] = 1
        out.append(
            tb.Batch(
                ids,
                mask,
                torch.as_tensor(lengths - 1),
                torch.as_tensor(rng.integers(0, 2, len(lengths))),
            )
        )
    return out


def test_tail_reproduces_the_model_with_and_without_lora(tiny):
    """The tail at the answer position equals the model's own candidate logits, and with LoRA it
    equals the model whose last o_proj has B·A merged into its weight (an independent path:
    the whole decoder, every position, HF's own attention)."""
    batches = _batches(tiny, 20, seed=1)
    f = hp.capture(tiny, batches, CAND)
    ref = np.concatenate([tb.candidate_logits(tiny, b, CAND).numpy() for b in batches])
    assert f["layers"].shape == (20, tiny.config.num_hidden_layers + 1, 32)
    np.testing.assert_allclose(f["logits"], ref, atol=1e-5)
    tail = hp.Tail(tiny, CAND)
    h, o = torch.as_tensor(f["h_in"]), torch.as_tensor(f["o_in"])
    with torch.no_grad():
        np.testing.assert_allclose(tail.logits(h, o).numpy(), ref, atol=1e-5)
        rng = np.random.default_rng(2)
        lora = {"lora_A": rng.normal(size=(2, 32)), "lora_B": rng.normal(size=(32, 2))}
        lora = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in lora.items()}
        got = tail.logits(h, o, lora).numpy()
        o_proj = tiny.get_decoder().layers[-1].self_attn.o_proj
        before = o_proj.weight.clone()
        o_proj.weight += tail.scale * lora["lora_B"] @ lora["lora_A"]
        try:
            merged = np.concatenate([tb.candidate_logits(tiny, b, CAND).numpy() for b in batches])
        finally:
            o_proj.weight.copy_(before)
    assert np.abs(got - ref).max() > 1e-2  # the LoRA does change the scores
    np.testing.assert_allclose(got, merged, atol=1e-4)


def _planted(tiny, rows: int = 96):
    """Features of random prompts, labelled by a rank-1 LoRA teacher on the tail (a problem the
    tail can solve exactly), split into train / select / dev."""
    f = hp.capture(tiny, _batches(tiny, rows, seed=3), CAND)
    tail = hp.Tail(tiny, CAND)
    h, o = torch.as_tensor(f["h_in"]), torch.as_tensor(f["o_in"])
    rng = np.random.default_rng(4)
    teacher = {"lora_A": rng.normal(size=(1, 32)), "lora_B": rng.normal(size=(32, 1))}
    teacher = {k: 3 * torch.as_tensor(v, dtype=torch.float32) for k, v in teacher.items()}
    with torch.no_grad():
        y = tail.logits(h, o, teacher).argmax(-1)
    cut = {"train": slice(0, 64), "select": slice(64, 80), "dev": slice(80, rows)}
    return tail, {s: (h[c], o[c], y[c]) for s, c in cut.items()}


def test_trainers_learn_a_planted_lora(tiny):
    """First-order AdamW and zoo-ort's FZOO step both bring the held-back loss well below its
    start on a problem with a known solution; FZOO with batches of the whole train set too."""
    tail, data = _planted(tiny)
    start = hp.score(tail, data, hp.init_lora(32, 1, seed=0))
    fo = hp.first_order(tail, data, rank=1, seed=0, epochs=30)
    assert fo[-1]["select_loss"] < 0.8 * start["select_loss"]
    zo = hp.zeroth_order(tail, data, rank=1, batch=0, steps=300, lr=0.05, seed=0)
    assert [r["step"] for r in zo] == [50, 100, 150, 200, 250, 300]
    assert zo[-1]["rows"] == 300 * 64
    assert zo[-1]["select_loss"] < 0.8 * start["select_loss"]


def test_zeroth_order_is_a_pure_function_of_its_seed(tiny):
    tail, data = _planted(tiny)
    a = hp.zeroth_order(tail, data, rank=1, batch=16, steps=12, lr=0.05, seed=7)
    b = hp.zeroth_order(tail, data, rank=1, batch=16, steps=12, lr=0.05, seed=7)
    c = hp.zeroth_order(tail, data, rank=1, batch=16, steps=12, lr=0.05, seed=8)
    assert a == b and a != c


def test_probes_find_a_planted_linear_signal():
    """A label that is the sign of one feature of layer 1 (and noise elsewhere) is decoded there
    and not at layer 0."""
    rng = np.random.default_rng(0)
    f = {}
    for s, n in (("train", 400), ("select", 200), ("dev", 200)):
        x = rng.normal(size=(n, 2, 8))
        f[f"{s}_layers"], f[f"{s}_labels"] = x, (x[:, 1, 3] > 0).astype(np.int64)
    out = hp.probe_layers(f)
    assert out[1]["dev_acc"] > 0.95 and out[0]["dev_acc"] < 0.65


@pytest.mark.parametrize("argv", [["--rank", "0"], ["--budget-rows", "0"], ["--lrs", "-1"]])
def test_bad_flags_exit_2_before_loading_anything(argv, capsys):
    with pytest.raises(SystemExit) as e:
        hp.main(["--bundle", "no-such-bundle", *argv])
    assert e.value.code == 2
    assert "must be positive" in capsys.readouterr().err
