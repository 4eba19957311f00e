"""Optimisers and schedules against hand-computed updates and torch.optim."""

from __future__ import annotations

import math

import numpy as np
import pytest

from zoo_ort.errors import ZooError
from zoo_ort.io import load_tensors, save_tensors
from zoo_ort.zo import optim


def _params():
    return {"w": np.array([1.0, -2.0, 0.5], np.float32), "b": np.array([[0.25]], np.float32)}


def _grads(t):
    return {
        "w": np.array([0.1 * (t + 1), -0.3, 2.0 / (t + 1)], np.float32),
        "b": np.array([[-0.5 + 0.2 * t]], np.float32),
    }


def _run(opt, steps=4):
    params = _params()
    state = opt.init(params)
    for t in range(steps):
        updates, state = opt.update(_grads(t), state, params)
        params = optim.apply_updates(params, updates)
    return params, state


def test_sgd_is_minus_lr_g():
    params = _params()
    opt = optim.sgd(0.1)
    updates, _ = opt.update(_grads(0), opt.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * _grads(0)["w"], rtol=1e-7)
    new = optim.apply_updates(params, updates)
    np.testing.assert_array_equal(params["w"], _params()["w"])  # not mutated
    np.testing.assert_allclose(new["w"], params["w"] - 0.1 * _grads(0)["w"], rtol=1e-6)


def test_momentum_by_hand():
    got, state = _run(optim.sgd(0.1, momentum=0.9), steps=2)
    g0, g1 = _grads(0)["w"].astype(np.float64), _grads(1)["w"].astype(np.float64)
    m1 = g0
    m2 = 0.9 * m1 + g1
    want = _params()["w"] - 0.1 * m1 - 0.1 * m2
    np.testing.assert_allclose(got["w"], want, rtol=1e-6)
    assert set(state) == {"0/m/w", "0/m/b"}


def test_adam_by_formula():
    lr, b1, b2, eps = 0.01, 0.9, 0.99, 1e-8
    got, state = _run(optim.adam(lr, b1, b2, eps), steps=3)
    theta = _params()["w"].astype(np.float64)
    m = v = np.zeros(3)
    for t in range(1, 4):
        g = _grads(t - 1)["w"].astype(np.float64)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        theta = theta - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    np.testing.assert_allclose(got["w"], theta, rtol=1e-6)
    assert state["0/count"] == 3


@pytest.mark.parametrize("kind", ["sgd", "momentum", "nesterov", "adam", "adamw"])
def test_against_torch(kind):
    torch = pytest.importorskip("torch")
    wd = 0.1
    if kind == "sgd":
        ours = optim.make_optimizer("sgd", 0.05, weight_decay=wd)
        make = lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=wd)  # noqa: E731
    elif kind == "momentum":
        ours = optim.make_optimizer("sgd", 0.05, momentum=0.9, weight_decay=wd)
        make = lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=wd)  # noqa: E731
    elif kind == "nesterov":
        ours = optim.sgd(0.05, momentum=0.9, nesterov=True)
        make = lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)  # noqa: E731
    elif kind == "adam":
        ours = optim.make_optimizer("adam", 0.01, betas=(0.8, 0.95), adam_eps=1e-6)
        make = lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.95), eps=1e-6)  # noqa: E731
    else:
        ours = optim.make_optimizer("adam", 0.01, weight_decay=wd)
        make = lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=wd)  # noqa: E731
    got, _ = _run(ours, steps=5)
    tp = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in _params().items()}
    topt = make(list(tp.values()))
    for t in range(5):
        for k, v in _grads(t).items():
            tp[k].grad = torch.tensor(v, dtype=torch.float64)
        topt.step()
    for k in got:
        np.testing.assert_allclose(got[k], tp[k].detach().numpy(), rtol=2e-6, atol=1e-7)


def test_sign_sgd():
    params = _params()
    opt = optim.make_optimizer("sign", 0.5)
    updates, _ = opt.update(_grads(0), opt.init(params), params)
    np.testing.assert_array_equal(updates["w"], np.float32(-0.5) * np.sign(_grads(0)["w"]))


def test_schedules():
    c = optim.constant(0.3)
    assert c(0) == c(1000) == 0.3
    lin = optim.linear(1.0, 10)
    assert [lin(t) for t in (0, 5, 10, 20)] == [1.0, 0.5, 0.0, 0.0]
    cos = optim.cosine(2.0, 10)
    assert cos(0) == pytest.approx(2.0)
    assert cos(5) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(0.0)
    assert cos(3) == pytest.approx(1.0 + math.cos(math.pi * 0.3))
    w = optim.make_schedule("linear", 1.0, steps=14, warmup_steps=4)
    assert [w(t) for t in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert w(4) == 1.0 and w(9) == pytest.approx(0.5) and w(14) == 0.0
    with pytest.raises(ZooError):
        optim.make_schedule("exp", 1.0, 10)


def test_schedule_drives_lr_by_update_count():
    opt = optim.make_optimizer("sgd", 1.0, schedule="linear", steps=4)
    params = _params()
    state = opt.init(params)
    lrs = []
    for t in range(4):
        updates, state = opt.update(_grads(t), state, params)
        lrs.append(float(-updates["b"][0, 0] / _grads(t)["b"][0, 0]))
    assert lrs == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_state_roundtrip_through_safetensors(tmp_path):
    opt = optim.make_optimizer("adam", 0.01, weight_decay=0.1, schedule="cosine", steps=9)
    _, state = _run(opt, steps=3)
    assert all(isinstance(v, (np.ndarray, int)) for v in state.values())
    save_tensors(tmp_path / "s.safetensors", optim.state_to_tensors(state))
    back = optim.state_from_tensors(load_tensors(tmp_path / "s.safetensors"), opt.init(_params()))
    assert set(back) == set(state)
    for k, v in state.items():
        if isinstance(v, int):
            assert back[k] == v and isinstance(back[k], int)
        else:
            np.testing.assert_array_equal(back[k], v)
    other = optim.make_optimizer("sgd", 0.01, momentum=0.9)
    with pytest.raises(ZooError, match="optimizer"):
        optim.state_from_tensors(optim.state_to_tensors(state), other.init(_params()))


def test_unknown_optimizer():
    with pytest.raises(ZooError):
        optim.make_optimizer("lion", 0.1)
