"""Deterministic batches: the batch at a step is a pure function of (run seed, step).

The examples form one endless stream, epoch after epoch, each epoch a fresh permutation drawn from
``SeedSequence([seed, epoch, SHUFFLE_TAG])``; step ``s`` takes stream positions
``s*B .. s*B + B - 1``. A resumed run therefore sees exactly the batches it would have seen, and
every example appears once per epoch even when ``B`` does not divide the dataset size.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np

from zoo_ort.engine.protocol import LabeledBatch
from zoo_ort.tasks.dataset import TaskData

SHUFFLE_TAG = 0x5D47A  # keeps the data order's random stream apart from the directions'


def epoch_permutation(size: int, seed: int, epoch: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, SHUFFLE_TAG]))
    return rng.permutation(size)


def batch_indices(
    size: int,
    batch_size: int,
    seed: int,
    step: int,
    permutation: Callable[[int], np.ndarray] | None = None,
) -> np.ndarray:
    """The example indices of ``step``'s batch; ``permutation(epoch)`` may be a cached
    :func:`epoch_permutation`."""
    if size <= 0 or batch_size <= 0 or step < 0 or seed < 0:
        raise ValueError("size and batch_size must be positive, step and seed non-negative")
    if permutation is None:
        permutation = lambda epoch: epoch_permutation(size, seed, epoch)  # noqa: E731
    stream = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    epochs = stream // size
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs).tolist():
        sel = epochs == epoch
        out[sel] = permutation(epoch)[stream[sel] % size]
    return out


def make_batch_fn(
    dataset: TaskData, batch_size: int, seed: int, *, pad_to: int | None = None
) -> Callable[[int], LabeledBatch]:
    """``fn(step) -> LabeledBatch`` of ``batch_size`` examples (see the module docstring)."""
    size = len(dataset)
    if size <= 0 or batch_size <= 0 or seed < 0:
        raise ValueError("dataset and batch_size must be non-empty, seed non-negative")

    @lru_cache(maxsize=4)  # a batch spans at most a few epochs, and steps move forward
    def permutation(epoch: int) -> np.ndarray:
        return epoch_permutation(size, seed, epoch)

    def batch(step: int) -> LabeledBatch:
        return dataset.batch(batch_indices(size, batch_size, seed, step, permutation), pad_to)

    return batch
