"""Per-row losses from an engine's output: the one definition training and evaluation share."""

from __future__ import annotations

import numpy as np

from zoo_ort.engine.protocol import EngineOutput
from zoo_ort.errors import ZooError
from zoo_ort.settings import LOSSES


def candidate_cross_entropy(logprobs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``logsumexp_c lp[n, c] − lp[n, label_n]`` (float64 ``[N]``) for candidate log-probs
    ``lp [N, C]``: the label-word softmax restricted to the candidates (MeZO's loss)."""
    lp = np.asarray(logprobs, dtype=np.float64)
    m = lp.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        lse = (m + np.log(np.exp(lp - m).sum(axis=1, keepdims=True)))[:, 0]
    picked = np.take_along_axis(lp, np.asarray(labels, np.int64)[:, None], axis=1)[:, 0]
    return lse - picked


def row_losses(output: EngineOutput, labels: np.ndarray | None, loss: str) -> np.ndarray:
    """Per-row training loss (float64) from an engine output.

    ``"lm"``: the engine's label-token NLL (P-RGE). ``"candidates"``: cross-entropy over the
    candidates at the first target slot (:func:`candidate_cross_entropy`).
    """
    if loss == "lm":
        return np.asarray(output.loss, dtype=np.float64).reshape(-1)
    if loss == "candidates":
        if labels is None:
            raise ZooError("loss 'candidates' needs labelled classification data; use loss 'lm'")
        return candidate_cross_entropy(np.asarray(output.candidate_logprobs)[:, 0, :], labels)
    raise ZooError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)}")
