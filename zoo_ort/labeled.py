"""A token batch together with its classification labels: what ``batches(step)`` hands the trainer.

Kept in its own tiny module so that ``zoo_ort.tasks`` and ``zoo_ort.train`` can both import it
without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zoo_ort.batch import TokenBatch


@dataclass(frozen=True)
class LabeledBatch:
    """``B`` examples: the tokens, and for classification the gold candidate index per example.

    ``labels[b]`` indexes ``tokens.candidate_ids[b]`` (int64 ``[B]``); ``None`` for LM data, where
    only the ``"lm"`` loss (``EngineOutput.loss``) is defined.
    """

    tokens: TokenBatch
    labels: np.ndarray | None = None

    @property
    def size(self) -> int:
        return self.tokens.rows

    def __post_init__(self) -> None:
        if self.labels is not None:
            labels = np.asarray(self.labels)
            if labels.shape != (self.tokens.rows,):
                raise ValueError(f"labels has shape {labels.shape}, expected ({self.tokens.rows},)")
