"""Optimisers as small pure transforms with explicit state, in the style of optax.

A :class:`GradientTransformation` is a pair ``init(params) -> state`` and
``update(grads, state, params) -> (updates, state)``; ``apply_updates`` adds the updates to the
parameters. Nothing is modified in place. Every state is a *flat* ``dict[str, ndarray | int]``
(``chain`` prefixes its members' keys with ``"<index>/"``), so a checkpoint can store it as
safetensors with :func:`state_to_tensors` and read it back exactly with
:func:`state_from_tensors`.

Sign convention as optax: the updates of ``sgd``/``adam``/... already carry ``-lr``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np

from zoo_ort.errors import ZooError
from zoo_ort.settings import OPTIMIZERS, SCHEDULES

Params = dict[str, np.ndarray]
State = dict[str, "np.ndarray | int"]
Schedule = Callable[[int], float]


class GradientTransformation(NamedTuple):
    init: Callable[[Mapping[str, np.ndarray]], State]
    update: Callable[
        [Mapping[str, np.ndarray], State, Mapping[str, np.ndarray] | None], tuple[Params, State]
    ]


# -- schedules ---------------------------------------------------------------------------------


def constant(value: float) -> Schedule:
    return lambda count: float(value)


def linear(init: float, steps: int, end: float = 0.0) -> Schedule:
    """From ``init`` at count 0 to ``end`` at count ``steps`` (held after)."""

    def schedule(count: int) -> float:
        frac = min(max(count, 0), steps) / steps if steps > 0 else 1.0
        return float(init + (end - init) * frac)

    return schedule


def cosine(init: float, steps: int, end: float = 0.0) -> Schedule:
    """Half a cosine from ``init`` at count 0 to ``end`` at count ``steps`` (held after)."""

    def schedule(count: int) -> float:
        frac = min(max(count, 0), steps) / steps if steps > 0 else 1.0
        return float(end + (init - end) * 0.5 * (1.0 + math.cos(math.pi * frac)))

    return schedule


def warmup(peak: float, warmup_steps: int, after: Schedule) -> Schedule:
    """Linear ramp ``peak·(count+1)/(warmup_steps+1)`` for the first ``warmup_steps`` counts,
    then ``after(count − warmup_steps)``.

    The ramp starts above zero so that the first step is not wasted.
    """

    def schedule(count: int) -> float:
        if count < warmup_steps:
            return float(peak * (count + 1) / (warmup_steps + 1))
        return after(count - warmup_steps)

    return schedule


def make_schedule(name: str, lr: float, steps: int, warmup_steps: int = 0) -> Schedule:
    """``constant``/``linear``/``cosine`` decay to 0 over the steps after warm-up."""
    decay_steps = max(steps - warmup_steps, 1)
    if name == "constant":
        base = constant(lr)
    elif name == "linear":
        base = linear(lr, decay_steps)
    elif name == "cosine":
        base = cosine(lr, decay_steps)
    else:
        raise ZooError(f"unknown schedule {name!r}; use one of {', '.join(SCHEDULES)}")
    return warmup(lr, warmup_steps, base) if warmup_steps > 0 else base


# -- transforms --------------------------------------------------------------------------------


def _f32(x: float) -> np.float32:
    return np.float32(x)


def identity() -> GradientTransformation:
    return GradientTransformation(lambda params: {}, lambda g, s, p=None: (dict(g), s))


def scale(factor: float) -> GradientTransformation:
    f = _f32(factor)
    return GradientTransformation(
        lambda params: {}, lambda g, s, p=None: ({k: f * v for k, v in g.items()}, s)
    )


def scale_by_schedule(schedule: Schedule) -> GradientTransformation:
    """Multiply by ``schedule(count)``; ``count`` is the number of updates made so far."""

    def init(params: Mapping[str, np.ndarray]) -> State:
        return {"count": 0}

    def update(g, state, params=None):
        f = _f32(schedule(int(state["count"])))
        return {k: f * v for k, v in g.items()}, {"count": int(state["count"]) + 1}

    return GradientTransformation(init, update)


def scale_by_learning_rate(lr: float | Schedule) -> GradientTransformation:
    """``-lr`` (or ``-schedule(count)``): turns a direction into a descent update."""
    if callable(lr):
        return scale_by_schedule(lambda count: -lr(count))
    return scale(-float(lr))


def trace(decay: float, nesterov: bool = False) -> GradientTransformation:
    """Heavy-ball momentum: ``m ← decay·m + g``; output ``m`` (or ``g + decay·m`` for Nesterov)."""
    d = _f32(decay)

    def init(params):
        return {f"m/{k}": np.zeros_like(v, dtype=np.float32) for k, v in params.items()}

    def update(g, state, params=None):
        new_state = {f"m/{k}": d * state[f"m/{k}"] + v for k, v in g.items()}
        if nesterov:
            return {k: v + d * new_state[f"m/{k}"] for k, v in g.items()}, new_state
        return {k: new_state[f"m/{k}"] for k in g}, new_state

    return GradientTransformation(init, update)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam's direction ``m̂ / (sqrt(v̂) + eps)`` with bias-corrected moments."""
    b1_, b2_, eps_ = _f32(b1), _f32(b2), _f32(eps)

    def init(params):
        state: State = {"count": 0}
        for k, v in params.items():
            state[f"mu/{k}"] = np.zeros_like(v, dtype=np.float32)
            state[f"nu/{k}"] = np.zeros_like(v, dtype=np.float32)
        return state

    def update(g, state, params=None):
        count = int(state["count"]) + 1
        c1 = _f32(1.0 - float(b1) ** count)
        c2 = _f32(1.0 - float(b2) ** count)
        new_state: State = {"count": count}
        out = {}
        for k, v in g.items():
            mu = b1_ * state[f"mu/{k}"] + (_f32(1.0) - b1_) * v
            nu = b2_ * state[f"nu/{k}"] + (_f32(1.0) - b2_) * (v * v)
            new_state[f"mu/{k}"], new_state[f"nu/{k}"] = mu, nu
            out[k] = (mu / c1) / (np.sqrt(nu / c2) + eps_)
        return out, new_state

    return GradientTransformation(init, update)


def scale_by_sign() -> GradientTransformation:
    return GradientTransformation(
        lambda params: {},
        lambda g, s, p=None: ({k: np.sign(v).astype(np.float32) for k, v in g.items()}, s),
    )


def add_weight_decay(weight_decay: float) -> GradientTransformation:
    """Add ``weight_decay·θ`` to the incoming updates (before Adam: L2; after: AdamW's decay)."""
    wd = _f32(weight_decay)

    def update(g, state, params=None):
        if params is None:
            raise ValueError("add_weight_decay needs params")
        return {k: v + wd * params[k] for k, v in g.items()}, state

    return GradientTransformation(lambda params: {}, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in order; member ``j``'s state keys are prefixed with ``"j/"``."""

    def init(params):
        state: State = {}
        for j, t in enumerate(transforms):
            state.update({f"{j}/{k}": v for k, v in t.init(params).items()})
        return state

    def update(g, state, params=None):
        new_state: State = {}
        for j, t in enumerate(transforms):
            prefix = f"{j}/"
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            g, sub = t.update(g, sub, params)
            new_state.update({prefix + k: v for k, v in sub.items()})
        return g, new_state

    return GradientTransformation(init, update)


def apply_updates(params: Mapping[str, np.ndarray], updates: Mapping[str, np.ndarray]) -> Params:
    """New parameters ``θ + u`` (float32, keeping each tensor's dtype); inputs untouched."""
    return {k: (v + updates[k]).astype(v.dtype, copy=False) for k, v in params.items()}


# -- ready-made optimisers ----------------------------------------------------------------------


def sgd(lr: float | Schedule, momentum: float = 0.0, nesterov: bool = False):
    parts = [trace(momentum, nesterov)] if momentum else []
    return chain(*parts, scale_by_learning_rate(lr))


def adam(
    lr: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """Adam; with ``weight_decay`` the decoupled AdamW decay ``θ ← θ − lr·wd·θ``."""
    parts = [scale_by_adam(b1, b2, eps)]
    if weight_decay:
        parts.append(add_weight_decay(weight_decay))
    return chain(*parts, scale_by_learning_rate(lr))


def sign_sgd(lr: float | Schedule, momentum: float = 0.0) -> GradientTransformation:
    """signSGD (with momentum: the sign of the momentum, i.e. signum)."""
    parts = [trace(momentum)] if momentum else []
    return chain(*parts, scale_by_sign(), scale_by_learning_rate(lr))


def make_optimizer(
    name: str,
    lr: float,
    schedule: str = "constant",
    warmup: int = 0,
    steps: int = 1,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
) -> GradientTransformation:
    """One of ``sgd`` (optionally with momentum), ``adam`` (AdamW decay) or ``sign``.

    For ``sgd`` and ``sign`` the weight decay is L2 added to the gradient estimate.
    """
    sched = make_schedule(schedule, lr, steps, warmup)
    if name == "adam":
        return adam(sched, betas[0], betas[1], adam_eps, weight_decay)
    if name == "sgd":
        opt = sgd(sched, momentum)
    elif name == "sign":
        opt = sign_sgd(sched, momentum)
    else:
        raise ZooError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")
    return chain(add_weight_decay(weight_decay), opt) if weight_decay else opt


# -- state <-> tensors ---------------------------------------------------------------------------


def state_to_tensors(state: Mapping[str, np.ndarray | int]) -> dict[str, np.ndarray]:
    """The state as numpy arrays only (ints become int64 ``[1]``), e.g. for safetensors."""
    out = {}
    for k, v in state.items():
        if isinstance(v, (int, np.integer)):
            out[k] = np.array([int(v)], dtype=np.int64)
        else:
            out[k] = np.asarray(v)
    return out


def state_from_tensors(
    tensors: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray | int]
) -> State:
    """Inverse of :func:`state_to_tensors`; ``like`` (a fresh ``init``) gives keys and types."""
    if set(tensors) != set(like):
        missing, extra = sorted(set(like) - set(tensors)), sorted(set(tensors) - set(like))
        raise ZooError(
            f"optimizer state does not match the optimizer (missing {missing[:3]}, "
            f"unexpected {extra[:3]}); was the checkpoint made with another optimizer?"
        )
    out: State = {}
    for k, ref in like.items():
        v = tensors[k]
        if isinstance(ref, (int, np.integer)):
            if v.size != 1 or v.dtype.kind not in "iu":
                raise ZooError(f"optimizer state {k}: expected one integer")
            out[k] = int(v.reshape(-1)[0])
        else:
            if v.shape != ref.shape or v.dtype != ref.dtype:
                raise ZooError(
                    f"optimizer state {k}: {v.dtype}{list(v.shape)}, expected "
                    f"{ref.dtype}{list(ref.shape)}"
                )
            out[k] = np.array(v, copy=True)
    return out
