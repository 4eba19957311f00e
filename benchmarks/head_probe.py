"""Where RTE's signal sits in SmolLM2, and what a zeroth-order step needs to reach it.

    python -m benchmarks.head_probe --bundle B [--task rte] [--cache DIR] [--out JSON]
        [--budget-rows N] [--lrs 0.02 0.005]

The 600-s RTE comparison ends at chance for every zeroth-order contender (issue 14). This asks
two questions on the model's own features, with nothing chosen on the dev rows:

1. **Is the signal there, and where?** One forward over train, the held-back rows and dev keeps
   the answer position's hidden state after every layer; an L2 logistic regression per layer
   (its strength chosen on the held-back rows) says how linearly decodable the label is there.
2. **Can a zeroth-order step reach it when the trained part is small?** The last decoder layer
   after its attention is position-wise, and only the answer position's output is scored, so
   LoRA on the last layer's ``o_proj`` acts on two vectors per row: the layer's input ``h_in``
   and ``o_proj``'s input ``o_in`` at the answer position. :class:`Tail` recomputes the rest
   (o_proj + LoRA, the MLP, the final norm, the candidate rows of the LM head) exactly (checked
   against the model's own candidate logits), so a step costs tens of microseconds a row. On it,
   first-order AdamW (the baselines' optimiser) and zoo-ort's FZOO (its own Rademacher draws,
   normalised scalars, replay and cosine schedule, the recipe's q=4 and eps) train full LoRA of
   rank ``--rank``; FZOO with batches of 16 (the recipe's) and larger ones, each given the same
   number of row evaluations (``--budget-rows``), its lr chosen on the held-back rows.

Printed as JSON with :func:`benchmarks.common.machine_info`; ``--out`` writes it atomically. The
captured features are kept in ``{cache}/head-probe/{task}.npz`` (plain arrays, read without
pickle) so that a rerun skips the forward pass.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine_info
from zoo_ort.io import atomic_write_json
from zoo_ort.zo.directions import grad_from_scalars, rademacher
from zoo_ort.zo.estimators import fzoo_scalars
from zoo_ort.zo.optim import apply_updates, make_optimizer

SPLITS = ("train", "select", "dev")  # select: the held-back rows (never trained on)
PROBE_L2 = (1e-1, 1e-2, 1e-3)
FO_LR, FO_EPOCHS = 1e-3, 12  # the baselines' first-order lr; epochs to see where it settles
ZO_Q, ZO_EPS, ZO_WARMUP = 4, 1e-2, 10  # the recipe's FZOO settings
ZO_BATCHES = (16, 256, 0)  # 0: every training row in each step
ZO_GRID = 6  # evaluations per run


# --------------------------------------------------------------------------------------------
# Features


def capture(model: Any, batches: Sequence[Any], candidate_ids: Sequence[int]) -> dict[str, Any]:
    """Per row of ``batches``, at its answer position: the hidden state after every layer
    (``layers`` [N, L+1, H], the embeddings first), the last layer's input ``h_in`` and its
    ``o_proj`` input ``o_in`` ([N, H]), the candidate logits ``logits`` [N, C] and ``labels``."""
    import torch

    last = model.get_decoder().layers[-1]
    head = model.get_output_embeddings().weight
    cand = torch.as_tensor(list(candidate_ids))
    taken: dict[str, Any] = {}

    def keep_input(name: str):
        def hook(_m: Any, args: tuple, kwargs: dict) -> None:
            taken[name] = args[0] if args else kwargs["hidden_states"]

        return hook

    hooks = [
        last.register_forward_pre_hook(keep_input("h_in"), with_kwargs=True),
        last.self_attn.o_proj.register_forward_pre_hook(keep_input("o_in"), with_kwargs=True),
    ]
    out: dict[str, list] = {k: [] for k in ("layers", "h_in", "o_in", "logits", "labels")}
    try:
        with torch.inference_mode():
            for b in batches:
                rows, pos = torch.arange(b.size), b.answer_pos
                decoder = model.get_decoder()(
                    input_ids=b.input_ids,
                    attention_mask=b.attention_mask,
                    output_hidden_states=True,
                    use_cache=False,
                )
                states = torch.stack(decoder.hidden_states, 1)[rows, :, pos]
                out["layers"].append(states.numpy())
                out["h_in"].append(taken["h_in"][rows, pos].numpy())
                out["o_in"].append(taken["o_in"][rows, pos].numpy())
                final = decoder.last_hidden_state[rows, pos]  # after the final norm
                out["logits"].append((final @ head[cand].T).numpy())
                out["labels"].append(b.labels.numpy())
    finally:
        for h in hooks:
            h.remove()
    return {k: np.concatenate(v) for k, v in out.items()}


def task_features(model: Any, bundle: str, task: str, cache: Path) -> dict[str, np.ndarray]:
    """:func:`capture` of ``task``'s train, held-back and dev rows (zoo-ort's tokens), as flat
    arrays ``{split}_{name}``; read from ``{cache}/head-probe/{task}.npz`` when it is there."""
    from benchmarks import torch_baselines as tb
    from benchmarks.time_to_accuracy import MAX_LENGTH, task_folder

    path = cache / "head-probe" / f"{task}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            return dict(f)
    spec = {"data": str(task_folder(task, cache)), "task": task}
    data = tb.load_task_data(bundle, spec, max_len=MAX_LENGTH, select_split="select")
    feats: dict[str, np.ndarray] = {}
    for split in SPLITS:
        ids, labels = getattr(data, f"{split}_ids"), getattr(data, f"{split}_labels")
        # Rows of like length batched together (less padding), put back in file order after.
        order = np.argsort([len(x) for x in ids], kind="stable")
        batches = [
            data.batch([ids[i] for i in order[lo : lo + 16]], labels[order[lo : lo + 16]])
            for lo in range(0, len(ids), 16)
        ]
        back = np.argsort(order)
        for k, v in capture(model, batches, data.candidate_ids).items():
            feats[f"{split}_{k}"] = v[back]
    feats["candidate_ids"] = np.asarray(data.candidate_ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **feats)
    os.replace(tmp, path)
    return feats


# --------------------------------------------------------------------------------------------
# 1. Linear probes


def logistic(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression (mean log loss + ``l2``·|w|²), fit by L-BFGS."""
    import torch

    X, t = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Any:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(X @ w + b, t) + l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), float(b.detach())


def probe_layers(f: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per layer: the probe whose L2 strength scores best on the held-back rows, and its
    accuracy on train, the held-back rows and dev (standardised on train's statistics)."""
    out = []
    for layer in range(f["train_layers"].shape[1]):
        x = {s: f[f"{s}_layers"][:, layer].astype(np.float64) for s in SPLITS}
        mu, sd = x["train"].mean(0), x["train"].std(0) + 1e-6
        x = {s: (v - mu) / sd for s, v in x.items()}
        fits = []
        for l2 in PROBE_L2:
            w, b = logistic(x["train"], f["train_labels"], l2)
            acc = {s: float((((x[s] @ w + b) > 0) == f[f"{s}_labels"]).mean()) for s in SPLITS}
            fits.append({"layer": layer, "l2": l2, **{f"{s}_acc": acc[s] for s in SPLITS}})
        out.append(max(fits, key=lambda r: r["select_acc"]))
    return out


# --------------------------------------------------------------------------------------------
# 2. The last layer's tail at the answer position


class Tail:
    """The last decoder layer after its attention, the final norm and the candidate rows of the
    LM head, at the answer position, with LoRA ``B·A`` (scale ``alpha / r``) on ``o_proj``:
    ``h = h_in + (W_o + s·B·A) o_in``, ``h += mlp(norm(h))``, logits ``= E_c · norm_f(h)``.
    Llama-style layers (SmolLM2): ``self_attn.o_proj``, ``post_attention_layernorm``, ``mlp``."""

    def __init__(self, model: Any, candidate_ids: Sequence[int], alpha_over_r: float = 2.0):
        import torch

        self.layer = model.get_decoder().layers[-1]
        self.norm = model.get_decoder().norm
        head = model.get_output_embeddings().weight
        self.cand = head[torch.as_tensor(list(candidate_ids))].detach()
        self.scale = alpha_over_r

    def logits(self, h_in: Any, o_in: Any, lora: dict[str, Any] | None = None) -> Any:
        h = h_in + self.layer.self_attn.o_proj(o_in)
        if lora:
            h = h + self.scale * (o_in @ lora["lora_A"].T) @ lora["lora_B"].T
        h = h + self.layer.mlp(self.layer.post_attention_layernorm(h))
        return self.norm(h) @ self.cand.T


def init_lora(hidden: int, rank: int, seed: int) -> dict[str, np.ndarray]:
    """PEFT's init (as zoo-ort's exporter draws it): A ~ U(±1/sqrt(in)), B = 0."""
    rng = np.random.default_rng(seed)
    bound = 1.0 / math.sqrt(hidden)
    a = rng.uniform(-bound, bound, size=(rank, hidden)).astype(np.float32)
    return {"lora_A": a, "lora_B": np.zeros((hidden, rank), np.float32)}


def _tensors(f: dict[str, np.ndarray]) -> dict[str, tuple[Any, Any, Any]]:
    import torch

    return {
        s: tuple(torch.as_tensor(f[f"{s}_{k}"]) for k in ("h_in", "o_in", "labels")) for s in SPLITS
    }


def score(tail: Tail, data: dict[str, tuple], lora: dict[str, Any]) -> dict[str, float]:
    """Accuracy and mean candidate loss on the held-back rows and on dev."""
    import torch
    import torch.nn.functional as F

    out = {}
    with torch.no_grad():
        t = {k: torch.as_tensor(v) for k, v in lora.items()}
        for s in ("select", "dev"):
            h, o, y = data[s]
            lg = tail.logits(h, o, t)
            out[f"{s}_acc"] = float((lg.argmax(-1) == y).double().mean())
            out[f"{s}_loss"] = float(F.cross_entropy(lg, y))
    return out


def epoch_batches(n: int, batch: int, seed: int) -> Any:
    """Batches of ``batch`` rows (0: all rows), each epoch a fresh permutation from ``seed``."""
    epoch = 0
    while True:
        if batch in (0, n):
            yield np.arange(n)
            continue
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        for lo in range(0, n - batch + 1, batch):
            yield perm[lo : lo + batch]
        epoch += 1


def first_order(
    tail: Tail, data: dict[str, tuple], rank: int, seed: int, epochs: int = FO_EPOCHS
) -> list[dict[str, Any]]:
    """AdamW (lr :data:`FO_LR`) on A and B, batches of 16; scored after every epoch."""
    import torch
    import torch.nn.functional as F

    h, o, y = data["train"]
    lora = {
        k: torch.tensor(v, requires_grad=True) for k, v in init_lora(h.shape[1], rank, seed).items()
    }
    opt = torch.optim.AdamW(list(lora.values()), lr=FO_LR)
    per_epoch = len(y) // 16
    draw = epoch_batches(len(y), 16, seed)
    curve = []
    for epoch in range(1, epochs + 1):
        for _ in range(per_epoch):
            i = next(draw)
            loss = F.cross_entropy(tail.logits(h[i], o[i], lora), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        state = {k: v.detach().numpy() for k, v in lora.items()}
        curve.append({"epoch": epoch, "rows": epoch * per_epoch * 16, **score(tail, data, state)})
    return curve


def zeroth_order(
    tail: Tail,
    data: dict[str, tuple],
    rank: int,
    batch: int,
    steps: int,
    lr: float,
    seed: int,
) -> list[dict[str, Any]]:
    """zoo-ort's FZOO step on the tail: ``q`` Rademacher directions from its own draw
    (``rademacher(shapes, seed, step, i)``) and one unperturbed group on the same batch, the
    scalars ``(L_i − L_0)/σ`` (:func:`fzoo_scalars`), their replay (:func:`grad_from_scalars`)
    and SGD with warm-up + cosine (:func:`make_optimizer`). Scored at :data:`ZO_GRID` points."""
    import torch
    import torch.nn.functional as F

    h, o, y = data["train"]
    params = init_lora(h.shape[1], rank, seed)
    shapes = {k: v.shape for k, v in params.items()}
    opt = make_optimizer("sgd", lr, "cosine", ZO_WARMUP, steps)
    state = opt.init(params)
    draw = epoch_batches(len(y), batch, seed)
    marks = {round(steps * (k + 1) / ZO_GRID) for k in range(ZO_GRID)}
    curve = []

    def loss_at(p: dict[str, np.ndarray], i: np.ndarray) -> float:
        t = {k: torch.from_numpy(v) for k, v in p.items()}
        return float(F.cross_entropy(tail.logits(h[i], o[i], t), y[i]))

    with torch.no_grad():
        for step in range(steps):
            i = next(draw)
            zero = loss_at(params, i)
            plus = [
                loss_at({k: params[k] + ZO_EPS * u[k] for k in params}, i)
                for u in (rademacher(shapes, seed, step, q) for q in range(ZO_Q))
            ]
            g, _ = fzoo_scalars(np.asarray(plus), zero)
            grad = grad_from_scalars(shapes, g, seed, step, draw="rademacher")
            updates, state = opt.update(grad, state, params)
            params = apply_updates(params, updates)
            if step + 1 in marks:
                rows = (step + 1) * len(i)
                curve.append({"step": step + 1, "rows": rows, **score(tail, data, params)})
    return curve


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="the fp32 SmolLM2 bundle (its tokens)")
    p.add_argument("--task", default="rte", choices=["rte", "sst2"])
    p.add_argument("--cache", default="benchmarks/cache", help="task folders and features")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--rank", type=int, default=1, help="LoRA rank on the last o_proj [1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--budget-rows",
        type=int,
        default=3_000_000,
        help="row evaluations each zeroth-order run gets (q+1 groups a step) [3,000,000]",
    )
    p.add_argument("--lrs", type=float, nargs="+", default=[2e-2, 5e-3])
    a = p.parse_args(argv)
    if a.rank < 1 or a.budget_rows < 1 or any(not lr > 0 for lr in a.lrs):
        p.error("--rank, --budget-rows and every --lrs value must be positive")
    from benchmarks import torch_baselines as tb

    tb.set_threads()
    model, _ = tb.load_smollm2()
    for prm in model.parameters():
        prm.requires_grad_(False)
    start = time.perf_counter()
    f = task_features(model, a.bundle, a.task, Path(a.cache))
    res: dict[str, Any] = {"machine": machine_info(), "task": a.task, "rank": a.rank}
    res["rows"] = {s: int(len(f[f"{s}_labels"])) for s in SPLITS}
    res["zero_shot"] = {
        s: float((f[f"{s}_logits"].argmax(1) == f[f"{s}_labels"]).mean()) for s in SPLITS
    }
    res["probes"] = probe_layers(f)
    tail = Tail(model, f["candidate_ids"])
    data = _tensors(f)
    import torch

    with torch.no_grad():
        check = tail.logits(data["dev"][0], data["dev"][1]).numpy()
    res["tail_max_abs_diff"] = float(np.abs(check - f["dev_logits"]).max())
    if res["tail_max_abs_diff"] > 1e-4:
        raise SystemExit(f"the tail does not reproduce the model ({res['tail_max_abs_diff']:.2g})")
    res["first_order"] = first_order(tail, data, a.rank, a.seed)
    n = res["rows"]["train"]
    res["zeroth_order"] = []
    for batch in ZO_BATCHES:
        rows = batch or n
        steps = max(a.budget_rows // ((ZO_Q + 1) * rows), ZO_GRID)
        runs = []
        for lr in a.lrs:
            t0 = time.perf_counter()
            curve = zeroth_order(tail, data, a.rank, batch or n, steps, lr, a.seed)
            runs.append({"lr": lr, "curve": curve, "seconds": time.perf_counter() - t0})
        chosen = max(
            runs, key=lambda r: (r["curve"][-1]["select_acc"], -r["curve"][-1]["select_loss"])
        )
        res["zeroth_order"].append(
            {
                "batch": rows,
                "steps": steps,
                "row_evals": steps * (ZO_Q + 1) * rows,
                "epochs": steps * rows / n,
                "chosen_lr": chosen["lr"],
                "runs": runs,
            }  # fmt: skip
        )
    res["seconds"] = time.perf_counter() - start
    if a.out:
        atomic_write_json(Path(a.out), res)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
