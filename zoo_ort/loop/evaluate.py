"""Evaluation through any :class:`~zoo_ort.engine.protocol.Engine`: accuracy for
classification, loss and perplexity for LM data."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from zoo_ort.engine.protocol import Engine
from zoo_ort.tasks.dataset import TaskData
from zoo_ort.zo.losses import candidate_cross_entropy


def broadcast_lora(
    params: Mapping[str, np.ndarray], frozen: Mapping[str, np.ndarray], rows: int
) -> dict[str, np.ndarray]:
    """The engine's LoRA inputs for ``rows`` rows that all use the same adapter: every trained
    tensor (given without its row dim) repeated along a new leading row dim; frozen ones as is."""
    both = sorted(set(params) & set(frozen))
    if both:
        raise ValueError(f"tensors both trained and frozen: {both[:3]}")
    lora = {
        k: np.ascontiguousarray(np.broadcast_to(v, (rows, *v.shape))) for k, v in params.items()
    }
    lora.update(frozen)
    return lora


def evaluate(
    engine: Engine,
    params: Mapping[str, np.ndarray],
    frozen: Mapping[str, np.ndarray],
    dataset: TaskData,
    *,
    batch_size: int = 32,
    limit: int | None = None,
    pad_to: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Score the first ``limit`` examples (all when None or 0) in order, ``batch_size`` per pass.

    Classification: ``accuracy`` (argmax of the candidate log-probs vs the label),
    ``candidate_loss`` (mean cross-entropy over the candidates only, MeZO's loss) and ``loss``
    (mean NLL of the gold label word over the whole vocabulary). LM data: ``loss`` (mean of the
    per-example NLLs), ``nll`` (token-weighted mean NLL) and ``perplexity`` = exp(nll).
    ``progress(done, total)`` is called after each pass.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    total = len(dataset) if not limit else min(int(limit), len(dataset))
    lora_by_rows: dict[int, dict[str, np.ndarray]] = {}
    correct = 0
    cand_loss = 0.0
    loss_sum = 0.0
    nll_sum = 0.0
    tokens = 0.0
    for start in range(0, total, batch_size):
        batch = dataset.batch(np.arange(start, min(start + batch_size, total)), pad_to=pad_to)
        rows = batch.size
        if rows not in lora_by_rows:
            lora_by_rows[rows] = broadcast_lora(params, frozen, rows)
        out = engine.forward(batch.tokens, lora_by_rows[rows])
        loss = np.asarray(out.loss, dtype=np.float64).reshape(-1)
        if loss.shape != (rows,):
            raise ValueError(f"engine returned loss of shape {loss.shape} for {rows} rows")
        loss_sum += float(loss.sum())
        if batch.labels is None:
            count = batch.tokens.target_mask.astype(np.float64).sum(axis=1)
            nll_sum += float((loss * count).sum())
            tokens += float(count.sum())
        else:
            logp = np.asarray(out.candidate_logprobs, dtype=np.float64)[:, 0, :]
            correct += int((logp.argmax(axis=1) == batch.labels).sum())
            cand_loss += float(candidate_cross_entropy(logp, batch.labels).sum())
        if progress is not None:
            progress(start + rows, total)
    if total == 0:
        return {"examples": 0}
    if dataset.is_lm:
        nll = nll_sum / tokens
        return {
            "loss": loss_sum / total,
            "nll": nll,
            "perplexity": float(np.exp(nll)),
            "tokens": int(tokens),
            "examples": total,
        }
    return {
        "accuracy": correct / total,
        "candidate_loss": cand_loss / total,
        "loss": loss_sum / total,
        "examples": total,
    }
