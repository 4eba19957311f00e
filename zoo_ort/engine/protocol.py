"""The engine protocol: a token batch and per-row LoRA tensors in, per-row scores out.

The trainer knows nothing of ONNX: it talks to anything that implements :class:`Engine`.
Row ``n`` of every array belongs together; LoRA tensors marked per-row in the manifest carry a
leading row dimension ``N``, shared ones do not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class TokenBatch:
    """A tokenised batch of ``N`` rows, ``T`` tokens, ``K`` target slots and ``C`` candidates.

    ``target_pos[n, k]`` is a position ``t`` in row ``n`` whose next-token distribution is scored;
    ``target_ids[n, k]`` is the token expected there (the token at ``t + 1`` for LM data, the label
    word for classification) and ``target_mask[n, k]`` is 1.0 for real slots, 0.0 for padding.
    ``candidate_ids[n, c]`` are token ids whose log-probabilities are reported at every target slot
    (classification's label words; a single dummy id for LM data).
    """

    input_ids: np.ndarray  # int64 [N, T]
    attention_mask: np.ndarray  # int64 [N, T], 1 for real tokens
    target_pos: np.ndarray  # int64 [N, K]
    target_ids: np.ndarray  # int64 [N, K]
    target_mask: np.ndarray  # float32 [N, K]
    candidate_ids: np.ndarray  # int64 [N, C]

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """The graph inputs by name (the names are the manifest's)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def tile(self, reps: int) -> TokenBatch:
        """Stack ``reps`` copies of the batch: rows ``[r*N, (r+1)*N)`` are copy ``r``."""
        return replace(self, **{k: np.tile(v, (reps, 1)) for k, v in self.arrays().items()})

    def take(self, rows: slice | np.ndarray) -> TokenBatch:
        return replace(self, **{k: v[rows] for k, v in self.arrays().items()})


@dataclass(frozen=True)
class EngineOutput:
    loss: np.ndarray  # float32 [N]: mean NLL of target_ids over real target slots
    candidate_logprobs: np.ndarray  # float32 [N, K, C]: log p(candidate | prefix) at each slot


@runtime_checkable
class Engine(Protocol):
    """What the trainer needs from an inference engine."""

    def forward(self, batch: TokenBatch, lora: Mapping[str, np.ndarray]) -> EngineOutput:
        """Score ``batch``; ``lora`` maps each LoRA input name to its tensor.

        Per-row tensors have a leading dimension equal to ``batch.rows``.
        """
        ...


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
