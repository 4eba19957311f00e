"""Length grouping: a forward over rows of mixed lengths pays for its longest row on every row.

A dynamic-shape graph costs about ``rows × width`` token positions, where ``width`` is the
longest row; on SST-2 batches of 16 about half of that is padding. Splitting a batch into a few
groups of similar length, each trimmed to its own longest row, removes most of it while keeping
each forward large enough to run efficiently. Row order and results are unchanged: only padding
(masked out, positions from the mask) is dropped.
"""

from __future__ import annotations

import numpy as np

from zoo_ort.engine.protocol import TokenBatch


def row_widths(batch: TokenBatch) -> np.ndarray:
    """Per row, the columns a forward needs: through the last real token and every target slot."""
    mask = np.asarray(batch.attention_mask) != 0
    cols = mask.shape[1]
    last = np.where(mask.any(axis=1), cols - np.argmax(mask[:, ::-1], axis=1), 0)
    targets = np.asarray(batch.target_pos).max(axis=1, initial=0) + 1
    return np.maximum(last, targets).astype(np.int64)


def length_groups(widths: np.ndarray, max_groups: int, call_cost: int = 64) -> list[np.ndarray]:
    """Row indices split into at most ``max_groups`` groups minimising padded work.

    The cost of a group is ``rows × its widest row`` plus ``call_cost`` (a forward's fixed cost,
    in row·token units). Rows are sorted by width and cut into contiguous runs by dynamic
    programming, so the result is optimal for that cost. Indices within a group are ascending.
    """
    widths = np.asarray(widths, dtype=np.int64)
    n = len(widths)
    if n == 0:
        return []
    order = np.argsort(widths, kind="stable")
    w = widths[order]
    k_max = max(1, min(int(max_groups), n))
    inf = np.iinfo(np.int64).max // 4
    # best[k][j]: cheapest split of the j narrowest rows into k groups; cut[k][j]: where the last
    # group starts.
    best = np.full((k_max + 1, n + 1), inf, dtype=np.int64)
    cut = np.zeros((k_max + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0
    for k in range(1, k_max + 1):
        for j in range(1, n + 1):
            starts = np.arange(0, j)
            costs = best[k - 1, starts] + (j - starts) * w[j - 1] + call_cost
            i = int(np.argmin(costs))
            best[k, j], cut[k, j] = costs[i], starts[i]
    k = int(np.argmin(best[1:, n])) + 1
    groups, j = [], n
    while k > 0:
        i = int(cut[k, j])
        groups.append(np.sort(order[i:j]))
        j, k = i, k - 1
    return groups[::-1]


def take_trimmed(batch: TokenBatch, rows: np.ndarray, widths: np.ndarray) -> TokenBatch:
    """Rows ``rows`` of a right-padded ``batch``, cut to the widest of them."""
    width = int(widths[rows].max())
    part = batch.take(rows)
    return TokenBatch(
        input_ids=part.input_ids[:, :width],
        attention_mask=part.attention_mask[:, :width],
        target_pos=part.target_pos,
        target_ids=part.target_ids,
        target_mask=part.target_mask,
        candidate_ids=part.candidate_ids,
    )
