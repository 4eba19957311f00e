"""Deterministic batches: the batch at a step is a pure function of (run seed, step).

The examples form one endless stream, epoch after epoch, each epoch a fresh permutation drawn from
``SeedSequence([seed, epoch, SHUFFLE_TAG])``; step ``s`` takes stream positions
``s*B .. s*B + B - 1``. A resumed run therefore sees exactly the batches it would have seen, and
every example appears once per epoch even when ``B`` does not divide the dataset size.

``balanced`` batches (classification data) split every batch evenly across the labels: each
label has its own stream of epochs, and step ``s`` takes the next ``B // C`` examples of each
(the ``B % C`` spare slots go to the labels in turn). A batch whose labels are skewed moves the
two label words' bias as much as it teaches the task, and a zeroth-order step sees only the batch
mean; balancing removes that swing (and the majority label's pull) without dropping examples.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np

from zoo_ort.engine.protocol import LabeledBatch
from zoo_ort.errors import ZooError
from zoo_ort.settings import SAMPLERS
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


def balanced_order(labels: np.ndarray, batch_size: int, seed: int) -> Callable[[int], np.ndarray]:
    """``order(step)``: the example indices of ``step`` with the labels split evenly (see the
    module docstring). The label groups are found once here, not at every step."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if batch_size <= 0 or seed < 0 or len(classes) == 0:
        raise ValueError("labels and batch_size must be non-empty, seed non-negative")
    members = [np.flatnonzero(labels == c) for c in classes]
    n = len(classes)
    per, spare = divmod(batch_size, n)

    @lru_cache(maxsize=4 * n)  # a batch spans at most a few epochs of each label
    def permutation(k: int, epoch: int) -> np.ndarray:
        return label_permutation(len(members[k]), seed, int(classes[k]), epoch)

    def order(step: int) -> np.ndarray:
        if step < 0:
            raise ValueError("step must be non-negative")
        out = []
        for k, own in enumerate(members):
            # Spare slots are dealt to the labels in turn across steps: slot e goes to label e % C.
            before, through = _dealt(step * spare, k, n), _dealt((step + 1) * spare, k, n)
            start = step * per + before
            stream = np.arange(start, start + per + through - before, dtype=np.int64)
            epochs = stream // len(own)
            for epoch in np.unique(epochs).tolist():
                out.append(own[permutation(k, epoch)[stream[epochs == epoch] % len(own)]])
        return np.concatenate(out)

    return order


def balanced_batch_indices(labels: np.ndarray, batch_size: int, seed: int, step: int) -> np.ndarray:
    """``step``'s example indices with the labels split evenly (one-off; a run keeps a
    :func:`balanced_order`)."""
    return balanced_order(labels, batch_size, seed)(step)


def _dealt(slots: int, k: int, classes: int) -> int:
    """How many of the first ``slots`` spare slots (dealt in turn) label number ``k`` got."""
    return (slots - k + classes - 1) // classes


def label_permutation(size: int, seed: int, label: int, epoch: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, SHUFFLE_TAG, label + 1]))
    return rng.permutation(size)


def make_batch_fn(
    dataset: TaskData,
    batch_size: int,
    seed: int,
    *,
    pad_to: int | None = None,
    sampler: str = "shuffle",
) -> Callable[[int], LabeledBatch]:
    """``fn(step) -> LabeledBatch`` of ``batch_size`` examples (see the module docstring)."""
    size = len(dataset)
    if size <= 0 or batch_size <= 0 or seed < 0:
        raise ValueError("dataset and batch_size must be non-empty, seed non-negative")
    if sampler not in SAMPLERS:
        raise ZooError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    if sampler == "balanced":
        if dataset.labels is None:
            raise ZooError("sampler 'balanced' needs labelled classification data; use 'shuffle'")
        order = balanced_order(dataset.labels, batch_size, seed)

        def balanced(step: int) -> LabeledBatch:
            return dataset.batch(order(step), pad_to)

        return balanced

    @lru_cache(maxsize=4)  # a batch spans at most a few epochs, and steps move forward
    def permutation(epoch: int) -> np.ndarray:
        return epoch_permutation(size, seed, epoch)

    def batch(step: int) -> LabeledBatch:
        return dataset.batch(batch_indices(size, batch_size, seed, step, permutation), pad_to)

    return batch
