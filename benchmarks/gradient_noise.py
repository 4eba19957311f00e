"""What limits RTE in 600 s: how much of a training batch's gradient is signal, SST-2 against RTE.

    python -m benchmarks.gradient_noise --bundle B [--batches 32] [--tasks sst2 rte]
        [--groups] [--targets q_proj k_proj v_proj ...]

Both zeroth-order contenders estimate the same thing, the gradient of a batch of 16 examples
projected on random directions; neither can follow a direction the batch gradients do not share.
So the measure is first-order and exact (PyTorch autograd, LoRA-FA as the baselines train it, at
the bundle's initial adapter, zoo-ort's tokens): N independent training batches of 16 give
gradients g_i of the candidate loss over the trained tensors (lora_B), and

- signal ``|E g|^2``: the unbiased U-statistic ``sum_{i != j} g_i . g_j / (N (N - 1))`` (it can
  come out negative when there is no common direction);
- noise ``tr Cov(g)``: ``sum |g_i - mean g|^2 / (N - 1)``, what one batch adds around it;
- their ratio (with a jackknife 90% interval): how much of a batch's squared gradient is
  shared. About its inverse is the number of batches before their mean gradient is as much
  signal as noise; a zeroth-order step sees the same ratio in its projected scalar (plus the
  direction's own noise, alike for both contenders).

``--groups`` repeats the measure per layer, band of ten layers and projection (where in the model
a shared direction gathers, if anywhere), with :func:`zo_merit`; ``--targets`` puts LoRA on other
projections than the baselines' q/v.

Printed as JSON with :func:`benchmarks.common.machine_info`; ``--out`` writes it (atomically).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine_info
from zoo_ort.io import atomic_write_json

BATCH = 16
# SmolLM2's (Llama's) linear layers, what --targets may name.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def batch_gradients(
    model: Any, data: Any, batches: int, seed: int
) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """``[batches, d]``: the candidate loss's gradient over the trained tensors, one row per
    training batch of :data:`BATCH` (the trainers' own batch draw, steps 0..batches-1), and the
    tensors' ``(name, size)`` in column order."""
    import torch

    from benchmarks.torch_baselines import candidate_loss, trainable_params

    named = trainable_params(model)
    params = [p for _, p in named]
    rows = []
    for step in range(batches):
        batch = data.train_batch(seed, step, BATCH)
        grads = torch.autograd.grad(candidate_loss(model, batch, data.candidate_ids), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double().numpy())
    return np.stack(rows), [(n, p.numel()) for n, p in named]


def zo_merit(signal: float, noise: float, d: int) -> float:
    """Expected loss decrease of one Gaussian zeroth-order step at its best learning rate, up
    to the curvature: ``|mu|^4 / ((d + 2) (|mu|^2 + tr Cov))``. The step ``(z.g) z`` has mean
    ``mu`` and second moment ``(d + 2) E|g|^2``, so on a loss of curvature ``h`` the best step
    gains this over ``2 h``. A subset of the tensors with the same share of signal as of
    dimensions scores as the whole; one where the signal gathers scores higher."""
    s = max(signal, 0.0)
    return s * s / ((d + 2) * (s + noise))


def tensor_groups(segments: list[tuple[str, int]]) -> dict[str, np.ndarray]:
    """Column indices of each layer (``layer 7``), each band of ten layers (``layers 0-9``) and
    each projection (``q_proj``) among the trained tensors named in ``segments``."""
    groups: dict[str, list[np.ndarray]] = {}
    start = 0
    for name, size in segments:
        cols = np.arange(start, start + size)
        start += size
        layer = re.search(r"layers\.(\d+)\.", name)
        proj = re.search(r"\.(\w+_proj)\.", name)
        keys = []
        if layer:
            k = int(layer.group(1))
            keys += [f"layer {k}", f"layers {k // 10 * 10}-{k // 10 * 10 + 9}"]
        if proj:
            keys.append(proj.group(1))
        for key in keys:
            groups.setdefault(key, []).append(cols)
    return {k: np.concatenate(v) for k, v in groups.items()}


def grouped(g: np.ndarray, segments: list[tuple[str, int]]) -> dict[str, dict[str, float]]:
    """:func:`signal_and_noise` and :func:`zo_merit` of each of :func:`tensor_groups`."""
    out = {}
    for key, cols in tensor_groups(segments).items():
        r = signal_and_noise(g[:, cols])
        out[key] = {k: r[k] for k in ("d", "signal", "noise", "ratio", "ratio_90")}
        out[key]["zo_merit"] = zo_merit(r["signal"], r["noise"], r["d"])
    return out


def signal_and_noise(g: np.ndarray) -> dict[str, float]:
    """The U-statistic of ``|E g|^2``, ``tr Cov(g)`` and their ratio, with a 90% interval of
    the ratio from its jackknife standard error (leave one batch out, in closed form; a
    bootstrap would repeat batches, and a repeated batch's ``g_i . g_i`` biases the U-statistic
    up)."""
    n = len(g)
    total, sq = g.sum(0), (g * g).sum(1)
    t2, own = float(total @ total), float(sq.sum())
    signal = (t2 - own) / (n * (n - 1))
    noise = (own - t2 / n) / (n - 1)
    # Without batch i: its sum and squares leave the totals.
    t2_i = t2 - 2 * (g @ total) + sq
    own_i = own - sq
    ratio_i = ((t2_i - own_i) / ((n - 1) * (n - 2))) / ((own_i - t2_i / (n - 1)) / (n - 2))
    se = float(np.sqrt((n - 1) / n * ((ratio_i - ratio_i.mean()) ** 2).sum()))
    ratio = signal / noise
    return {
        "batches": n,
        "d": int(g.shape[1]),
        "signal": signal,
        "noise": noise,
        "ratio": ratio,
        "ratio_se": se,
        "ratio_90": [ratio - 1.645 * se, ratio + 1.645 * se],
        "mean_batch_grad_sq": float(sq.mean()),
    }


def load_model(bundle: str, targets: tuple[str, ...] | None = None) -> Any:
    """SmolLM2 with LoRA-FA at ``bundle``'s initial adapter (on ``targets``, default the
    baselines'; a target the bundle lacks keeps peft's A, drawn as zoo-ort's exporter draws it).
    Loaded once for every task: taking gradients (``torch.autograd.grad``) leaves its weights as
    they are."""
    from benchmarks import torch_baselines as tb

    tb.set_threads()
    model, _ = tb.load_smollm2()
    model = tb.add_lora_fa(model, targets=targets or tb.DEFAULT_TARGETS)
    tb.load_lora_init(model, bundle)
    return model


def measure(
    model: Any,
    bundle: str,
    task: str,
    batches: int,
    seed: int,
    data_dir: Path,
    groups: bool = False,
) -> dict[str, Any]:
    """:func:`signal_and_noise` of ``batches`` training batches of ``task`` (``model`` from
    :func:`load_model`, the bundle's tokens); with ``groups``, also per layer, band and
    projection (:func:`grouped`)."""
    from benchmarks import torch_baselines as tb
    from benchmarks.time_to_accuracy import MAX_LENGTH, task_folder

    folder = task_folder(task, data_dir)
    data = tb.load_task_data(bundle, {"data": str(folder), "task": task}, max_len=MAX_LENGTH)
    start = time.perf_counter()
    g, segments = batch_gradients(model, data, batches, seed)
    out = {"task": task, "train_rows": len(data.train_ids), **signal_and_noise(g)}
    out["zo_merit"] = zo_merit(out["signal"], out["noise"], out["d"])
    out["seconds"] = time.perf_counter() - start
    if groups:
        out["groups"] = grouped(g, segments)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="the fp32 SmolLM2 bundle (its tokens, its A)")
    p.add_argument("--tasks", nargs="+", default=["sst2", "rte"], choices=["sst2", "rte"])
    p.add_argument("--batches", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--groups", action="store_true", help="also per layer, band of ten layers, projection"
    )
    p.add_argument("--cache", default="benchmarks/cache", help="where the task folders are derived")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument(
        "--targets",
        nargs="+",
        default=None,
        choices=PROJECTIONS,
        help="LoRA targets [the baselines': q_proj v_proj]",
    )
    a = p.parse_args(argv)
    if a.batches < 3:
        p.error("--batches must be >= 3")
    from benchmarks.torch_baselines import DEFAULT_TARGETS

    targets = tuple(a.targets or DEFAULT_TARGETS)
    res = {
        "machine": machine_info(),
        "batch_size": BATCH,
        "seed": a.seed,
        "targets": list(targets),
        "tasks": {},
    }
    model = load_model(a.bundle, targets)
    for task in a.tasks:
        res["tasks"][task] = measure(
            model, a.bundle, task, a.batches, a.seed, Path(a.cache), a.groups
        )
    text = json.dumps(res, indent=1)
    if a.out:
        atomic_write_json(Path(a.out), res)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
