"""A pure-numpy Engine with known gradients, for testing the trainer without ONNX.

Two "models" over the same LoRA tensors ``l{j}.A`` ([D, r]) and ``l{j}.B`` ([r, V]); either may
carry a leading row dimension (per-row) or not (shared):

* ``quadratic``: ``loss_n = 0.5·w_n·Σ_t ||P_n[t] − P*[t]||²`` with
  ``w_n = 1 + input_ids[n, 0] % 3``, so ``∇_P mean_n loss_n = mean_n(w_n)·(P − P*)``
  for a per-row tensor ``P``.
* ``softmax``: a LoRA'd linear language model: ``x_n`` = mean embedding of the row's real tokens,
  ``h_n = x_n W0 + s·Σ_j (x_n A_j) B_j`` are next-token logits at every target slot; ``loss`` is
  the mean NLL of ``target_ids`` and ``candidate_logprobs`` the log-softmax at the candidates.

Rows are computed independently with batched matmuls, so a row's outputs do not depend on how
many other rows share its forward (which the batched == sequential test relies on). A row whose
first token is :data:`POISON` yields NaN, to test non-finite handling.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np

from zoo_ort.engine.protocol import EngineOutput, LabeledBatch, TokenBatch

POISON = 99  # a first token id that makes the row's loss NaN
VOCAB, DIM, RANK, SEQ = 8, 6, 2, 5
CANDIDATES = (1, 2)


def lora_tensors(layers: int = 2, seed: int = 0, b_scale: float = 0.0) -> dict[str, np.ndarray]:
    """Initial LoRA tensors: A random, B = b_scale·N(0, 1) (zero by default, as LoRA)."""
    rng = np.random.default_rng(seed)
    out = {}
    for j in range(layers):
        out[f"l{j}.A"] = (rng.standard_normal((DIM, RANK)) / np.sqrt(DIM)).astype(np.float32)
        out[f"l{j}.B"] = (b_scale * rng.standard_normal((RANK, VOCAB))).astype(np.float32)
    return out


def split_fa(lora: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """LoRA-FA split: B trained (params), A frozen."""
    params = {k: v for k, v in lora.items() if k.endswith(".B")}
    frozen = {k: v for k, v in lora.items() if k.endswith(".A")}
    return params, frozen


class NumpyEngine:
    def __init__(
        self,
        kind: str = "softmax",
        *,
        targets: Mapping[str, np.ndarray] | None = None,
        seed: int = 1,
        scale: float = 2.0,
        delay: float = 0.0,
    ):
        if kind not in ("quadratic", "softmax"):
            raise ValueError(kind)
        self.kind = kind
        self.targets = dict(targets or {})
        rng = np.random.default_rng(seed)
        self.embed = rng.standard_normal((VOCAB + 100, DIM)).astype(np.float32)
        self.w0 = (0.3 * rng.standard_normal((DIM, VOCAB))).astype(np.float32)
        self.scale = np.float32(scale)
        self.delay = delay
        self.calls: list[int] = []  # rows per forward, for tests

    # -- the Engine protocol ---------------------------------------------------------------
    def forward(self, batch: TokenBatch, lora: Mapping[str, np.ndarray]) -> EngineOutput:
        if self.delay:
            time.sleep(self.delay)
        n = batch.rows
        self.calls.append(n)
        for name, v in lora.items():
            if v.ndim == 3 and v.shape[0] != n:
                raise ValueError(f"{name}: {v.shape[0]} rows for a batch of {n}")
        if self.kind == "quadratic":
            loss = self._quadratic(batch, lora)
            cand = np.full(
                (n, batch.target_ids.shape[1], batch.candidate_ids.shape[1]),
                -np.log(batch.candidate_ids.shape[1]),
                dtype=np.float32,
            )
        else:
            loss, cand = self._softmax(batch, lora)
        poison = batch.input_ids[:, 0] == POISON
        loss = np.where(poison, np.float32(np.nan), loss).astype(np.float32)
        cand = np.where(poison[:, None, None], np.float32(np.nan), cand)
        return EngineOutput(loss=loss, candidate_logprobs=cand.astype(np.float32))

    def _quadratic(self, batch: TokenBatch, lora: Mapping[str, np.ndarray]) -> np.ndarray:
        n = batch.rows
        w = 1.0 + (batch.input_ids[:, 0] % 3).astype(np.float64)
        total = np.zeros(n)
        for name, target in self.targets.items():
            v = lora[name].astype(np.float64)
            d = (v if v.ndim == 3 else v[None]) - target.astype(np.float64)[None]
            total += 0.5 * (d * d).reshape(d.shape[0], -1).sum(axis=1)
        return (w * total).astype(np.float32)

    def logits(self, batch: TokenBatch, lora: Mapping[str, np.ndarray]) -> np.ndarray:
        """``h[N, V]`` (float32), each row computed on its own."""
        mask = batch.attention_mask.astype(np.float32)
        emb = self.embed[batch.input_ids % len(self.embed)]  # [N, T, D]
        x = (emb * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1.0)
        x = x[:, None, :]  # [N, 1, D]: batched matmuls keep rows independent
        h = x @ self.w0
        layers = sorted({k.split(".")[0] for k in lora})
        for j in layers:
            a, b = lora[f"{j}.A"], lora[f"{j}.B"]
            h = h + self.scale * ((x @ a) @ b)
        return h[:, 0, :]

    def _softmax(self, batch: TokenBatch, lora: Mapping[str, np.ndarray]):
        h = self.logits(batch, lora).astype(np.float64)
        lp = h - h.max(1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(1, keepdims=True))  # [N, V]
        tgt = np.take_along_axis(lp, batch.target_ids, axis=1)  # [N, K]
        mask = batch.target_mask.astype(np.float64)
        loss = -(tgt * mask).sum(1) / np.maximum(mask.sum(1), 1.0)
        cand = np.take_along_axis(lp, batch.candidate_ids, axis=1)  # [N, C]
        k = batch.target_ids.shape[1]
        return loss, np.repeat(cand[:, None, :], k, axis=1)

    # -- analytic references ----------------------------------------------------------------
    def true_grad(
        self,
        params: Mapping[str, np.ndarray],
        frozen: Mapping[str, np.ndarray],
        batch: LabeledBatch,
        loss: str = "lm",
    ) -> dict[str, np.ndarray]:
        """∇ of the mean training loss over the batch w.r.t. the (shared) ``params`` (float64)."""
        tok = batch.tokens
        if self.kind == "quadratic":
            w = (1.0 + (tok.input_ids[:, 0] % 3)).mean()
            return {
                k: w * (params[k].astype(np.float64) - self.targets[k].astype(np.float64))
                for k in params
            }
        lora = {**frozen, **params}
        h = self.logits(tok, lora).astype(np.float64)
        n = tok.rows
        if loss == "lm":
            p = np.exp(h - h.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            dh = p.copy()
            dh[np.arange(n), tok.target_ids[:, 0]] -= 1.0  # K == 1 in these tests
        else:
            cands = tok.candidate_ids
            hc = np.take_along_axis(h, cands, axis=1)
            pc = np.exp(hc - hc.max(1, keepdims=True))
            pc /= pc.sum(1, keepdims=True)
            pc[np.arange(n), batch.labels] -= 1.0
            dh = np.zeros_like(h)
            np.put_along_axis(dh, cands, pc, axis=1)
        dh /= n
        mask = tok.attention_mask.astype(np.float64)
        emb = self.embed[tok.input_ids % len(self.embed)].astype(np.float64)
        x = (emb * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1.0)
        out = {}
        for k in params:
            j = k.split(".")[0]
            if k.endswith(".B"):
                xa = x @ lora[f"{j}.A"].astype(np.float64)  # [N, r]
                out[k] = float(self.scale) * xa.T @ dh
            else:
                out[k] = float(self.scale) * x.T @ (dh @ lora[f"{j}.B"].astype(np.float64).T)
        return out


def make_batch(seed: int, step: int, size: int = 4, poison: bool = False) -> LabeledBatch:
    """A deterministic labelled batch: label 1 iff most of the row's tokens are >= VOCAB/2."""
    rng = np.random.default_rng([seed, 7, step])
    ids = rng.integers(0, VOCAB, size=(size, SEQ)).astype(np.int64)
    lengths = rng.integers(2, SEQ + 1, size=size)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    ids = ids * mask
    high = ((ids >= VOCAB // 2) * mask).sum(1)
    labels = (2 * high > lengths).astype(np.int64)
    if poison:
        ids[0, 0] = POISON
    cand = np.tile(np.array(CANDIDATES, dtype=np.int64), (size, 1))
    tokens = TokenBatch(
        input_ids=ids,
        attention_mask=mask,
        target_pos=(lengths - 1)[:, None].astype(np.int64),
        target_ids=cand[np.arange(size), labels][:, None],
        target_mask=np.ones((size, 1), dtype=np.float32),
        candidate_ids=cand,
    )
    return LabeledBatch(tokens=tokens, labels=labels)


def batches_fn(
    seed: int = 0, size: int = 4, poison_steps: frozenset[int] = frozenset()
) -> Callable[[int], LabeledBatch]:
    return lambda step: make_batch(seed, step, size, poison=step in poison_steps)


def accuracy(engine: NumpyEngine, lora: Mapping[str, np.ndarray], seed: int = 12345) -> dict:
    """Dev metrics of the softmax model on a fixed held-out batch."""
    batch = make_batch(seed, 0, size=64)
    out = engine.forward(batch.tokens, lora)
    pred = out.candidate_logprobs[:, 0, :].argmax(1)
    return {
        "accuracy": float((pred == batch.labels).mean()),
        "loss": float(out.loss.mean()),
    }
