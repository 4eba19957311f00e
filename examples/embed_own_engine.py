"""Embed zoo-ort's trainer in an app that brings its own inference engine.

The trainer only needs an object with ``forward(batch, lora) -> EngineOutput``: per-row LoRA
tensors and a token batch in, per-row losses and candidate scores out. Here the "engine" is a
toy bag-of-words classifier in numpy whose LoRA-B decides the label; an app would wrap its
phone's NPU runtime, a C++ engine, or zoo-ort's own ``OrtEngine`` the same way.

Run: python examples/embed_own_engine.py
"""

from __future__ import annotations

import tempfile

import numpy as np

from zoo_ort.engine import EngineOutput, LabeledBatch, TokenBatch
from zoo_ort.loop.train import train
from zoo_ort.settings import settings

VOCAB, RANK, POS, NEG = 50, 4, 48, 49  # token ids 48/49 are the label words


class BagOfWordsEngine:
    """logits(row) = mean_embedding(row) @ (W0 + A @ B_row); scored at the label words."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.emb = rng.standard_normal((VOCAB, 8)).astype(np.float32)
        self.w0 = np.zeros((8, VOCAB), np.float32)

    def forward(self, batch: TokenBatch, lora: dict[str, np.ndarray]) -> EngineOutput:
        mask = batch.attention_mask[..., None].astype(np.float32)
        x = (self.emb[batch.input_ids] * mask).sum(1) / mask.sum(1)  # [N, 8]
        w = self.w0 + np.einsum("dr,nrv->ndv", lora["A"], lora["B"])  # per-row weights
        logits = np.einsum("nd,ndv->nv", x, w)
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        loss = -np.take_along_axis(logp, batch.target_ids, 1)[:, 0]
        cand = np.take_along_axis(logp, batch.candidate_ids, 1)[:, None, :]
        return EngineOutput(loss=loss.astype(np.float32), candidate_logprobs=cand)


def make_batches(seed: int = 0, size: int = 16):
    """Positive rows start with token 1, negative rows with token 2; the rest is filler."""

    def batches(step: int) -> LabeledBatch:
        rng = np.random.default_rng([seed, step])
        labels = rng.integers(0, 2, size)
        ids = rng.integers(3, 40, (size, 6))
        ids[:, :3] = np.where(labels == 1, 1, 2)[:, None]  # the sentiment cue, among filler
        tokens = TokenBatch(
            input_ids=ids,
            attention_mask=np.ones_like(ids),
            target_pos=np.full((size, 1), 5),
            target_ids=np.where(labels == 1, POS, NEG)[:, None],
            target_mask=np.ones((size, 1), np.float32),
            candidate_ids=np.tile([NEG, POS], (size, 1)),
        )
        return LabeledBatch(tokens, labels)

    return batches


def main() -> dict[str, float]:
    engine = BagOfWordsEngine()
    rng = np.random.default_rng(1)
    frozen = {"A": rng.standard_normal((8, RANK)).astype(np.float32)}  # LoRA-FA: A frozen
    params = {"B": np.zeros((RANK, VOCAB), np.float32)}  # B trained, zero at start
    dev = make_batches(seed=123, size=200)(0)

    def accuracy(lora: dict[str, np.ndarray]) -> dict[str, float]:
        b = np.broadcast_to(lora["B"], (dev.size, *lora["B"].shape))
        out = engine.forward(dev.tokens, {"A": lora["A"], "B": b})
        return {"accuracy": float((out.candidate_logprobs[:, 0].argmax(1) == dev.labels).mean())}

    config = settings(steps=200, lr=1.0, eps=1e-2, queries=4, batch_size=16, loss="candidates")
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(engine, params, frozen, make_batches(), config, run_dir, evaluate=accuracy)
    before = accuracy({**frozen, **params})["accuracy"]
    after = accuracy({**frozen, **result.params})["accuracy"]
    return {"before": before, "after": after}


if __name__ == "__main__":
    r = main()
    print(f"dev accuracy {r['before']:.2f} -> {r['after']:.2f}")
