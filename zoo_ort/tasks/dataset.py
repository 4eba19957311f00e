"""A task's split, tokenised once, and the token batches cut from it.

Classification rows end at the last prompt token: the one target slot (K=1) sits there, its
target is the gold label word's first token and the candidates are all label words' first
tokens. LM rows score every completion token (prompt/completion data) or every token after the
first (text data); K is the longest such run in the batch, shorter rows padded with mask 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from zoo_ort.engine.protocol import LabeledBatch, TokenBatch
from zoo_ort.errors import ZooError
from zoo_ort.tasks.encode import TextEncoder
from zoo_ort.tasks.files import Record, field_text, read_records, resolve_data, split_file
from zoo_ort.tasks.spec import LM, TaskSpec

DEFAULT_MAX_LENGTH = 256


@dataclass(frozen=True)
class TaskData:
    """``M`` pre-tokenised examples: example ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``.

    ``first[i]`` is the index of the first scored token (LM data: the scored positions are
    ``first-1 .. len-2``; classification: ``len``, where the label word would follow the prompt);
    ``labels[i]`` is the gold candidate index (classification; None for LM data).
    """

    spec: TaskSpec
    tokens: np.ndarray  # int64 [sum of lengths]
    offsets: np.ndarray  # int64 [M + 1]
    first: np.ndarray  # int64 [M]
    labels: np.ndarray | None  # int64 [M]
    candidates: np.ndarray  # int64 [C]
    pad_id: int
    source: str = ""
    truncated: int = 0  # examples shortened to fit max_length

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def is_lm(self) -> bool:
        return self.labels is None

    def example(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def split_tail(self, n: int) -> tuple[TaskData, TaskData]:
        """(the first ``len - n`` examples, the last ``n``): a held-back slice, as the file has it
        (a file sorted by label gives a one-label slice; shuffle such a file first)."""
        if not 0 < n < len(self):
            raise ZooError(f"cannot hold back {n} of {len(self)} examples")
        cut = len(self) - n

        def part(lo: int, hi: int) -> TaskData:
            start, stop = self.offsets[lo], self.offsets[hi]
            return replace(
                self,
                tokens=self.tokens[start:stop],
                offsets=self.offsets[lo : hi + 1] - start,
                first=self.first[lo:hi],
                labels=None if self.labels is None else self.labels[lo:hi],
            )  # ``truncated`` stays the whole file's count

        return part(0, cut), part(cut, len(self))

    def batch(self, indices: Sequence[int] | np.ndarray, pad_to: int | None = None) -> LabeledBatch:
        """Rows for ``indices``, right-padded to the longest row (or to ``pad_to`` tokens)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1 or len(idx) == 0:
            raise ValueError("a batch needs a non-empty 1-D list of example indices")
        seqs = [self.example(int(i)) for i in idx]
        longest = max(len(s) for s in seqs)
        width = longest if pad_to is None else int(pad_to)
        if longest > width:
            raise ZooError(
                f"an example has {longest} tokens but batches are padded to {width}; "
                f"use a max length of at most {width}"
            )
        rows = len(seqs)
        input_ids = np.full((rows, width), self.pad_id, dtype=np.int64)
        attention = np.zeros((rows, width), dtype=np.int64)
        for r, s in enumerate(seqs):
            input_ids[r, : len(s)] = s
            attention[r, : len(s)] = 1
        if self.labels is None:
            pos, tgt, mask, cand = self._lm_targets(seqs, idx)
            labels = None
        else:
            labels = self.labels[idx]
            pos = np.array([[len(s) - 1] for s in seqs], dtype=np.int64)
            tgt = self.candidates[labels][:, None].astype(np.int64)
            mask = np.ones((rows, 1), dtype=np.float32)
            cand = np.tile(self.candidates, (rows, 1))
        tokens = TokenBatch(
            input_ids=input_ids,
            attention_mask=attention,
            target_pos=pos,
            target_ids=tgt,
            target_mask=mask,
            candidate_ids=cand,
        )
        return LabeledBatch(tokens=tokens, labels=labels)

    def _lm_targets(
        self, seqs: list[np.ndarray], idx: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        firsts = self.first[idx]
        k = max(len(s) - f for s, f in zip(seqs, firsts, strict=True))
        rows = len(seqs)
        pos = np.zeros((rows, k), dtype=np.int64)
        tgt = np.full((rows, k), self.pad_id, dtype=np.int64)
        mask = np.zeros((rows, k), dtype=np.float32)
        for r, (s, f) in enumerate(zip(seqs, firsts, strict=True)):
            n = len(s) - f
            pos[r, :n] = np.arange(f - 1, len(s) - 1)
            tgt[r, :n] = s[f:]
            mask[r, :n] = 1.0
        cand = np.tile(self.candidates, (rows, 1))
        return pos, tgt, mask, cand


def load_task_data(
    data: str | Path,
    split: str,
    spec: TaskSpec,
    encoder: TextEncoder,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    limit: int | None = None,
) -> TaskData:
    """Read ``split`` of ``data`` (a shipped set's name, a split folder or a file) and tokenise it.

    ``limit`` keeps the first ``limit`` examples (the whole file is still read and checked).
    Prompts longer than ``max_length`` tokens lose the start of their longest field (see
    :func:`truncate_prompt`); ``TaskData.truncated`` counts them.
    """
    path = split_file(resolve_data(data), split)
    records = read_records(path)
    if limit is not None and limit > 0:
        records = records[:limit]
    minimum = len(encoder.prefix) + 2
    if max_length < minimum:
        raise ZooError(f"max length {max_length} is too small (at least {minimum})")
    if spec.kind == LM:
        return _tokenise_lm(records, spec, encoder, max_length, str(path))
    return _tokenise_classification(records, spec, encoder, max_length, str(path))


def _pack(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in seqs])
    flat = [t for s in seqs for t in s]
    return np.asarray(flat, dtype=np.int64), offsets


def _tokenise_classification(
    records: list[Record], spec: TaskSpec, encoder: TextEncoder, max_length: int, source: str
) -> TaskData:
    candidates = np.asarray(encoder.label_tokens(spec.words), dtype=np.int64)
    names = spec.fields
    values = [{n: field_text(r, n) for n in names} for r in records]
    labels = np.asarray(
        [
            spec.label_index(_label_value(r, spec.label_field), r.where)
            for r in records  # field check first so a missing label names its line
        ],
        dtype=np.int64,
    )
    budget = max_length - len(encoder.prefix)
    seqs = encoder.encode_many([spec.render(v) for v in values])
    truncated = 0
    for i, ids in enumerate(seqs):
        if len(ids) > budget:
            seqs[i] = truncate_prompt(spec, values[i], encoder, budget)
            truncated += 1
    seqs = [encoder.prefix + s for s in seqs]
    tokens, offsets = _pack(seqs)
    return TaskData(
        spec=spec,
        tokens=tokens,
        offsets=offsets,
        first=np.diff(offsets),  # the label word would be the token right after the prompt
        labels=labels,
        candidates=candidates,
        pad_id=encoder.pad_id,
        source=source,
        truncated=truncated,
    )


def _label_value(record: Record, name: str) -> object:
    if name not in record.values:
        have = ", ".join(record.values) or "none"
        raise ZooError(f"{record.where}: missing label field {name!r} (fields: {have})")
    return record.values[name]


def truncate_prompt(
    spec: TaskSpec, values: dict[str, str], encoder: TextEncoder, budget: int
) -> list[int]:
    """Tokens of the filled template in at most ``budget`` tokens, made to fit by dropping the
    start of the longest field, so the template's tail (where the answer goes) always survives.

    The cut is made in the text and the result re-tokenised, so the tokens are the ones the
    shortened text really has.
    """
    values = dict(values)
    while True:
        text, spans = spec.render_spans(values)
        ids, offsets = encoder.encode_offsets(text)
        excess = len(ids) - budget
        if excess <= 0:
            return ids
        name = max(values, key=lambda n: len(values[n]))
        if not values[name]:
            # Every field is empty and the template alone is too long: keep its tail.
            return ids[-budget:]
        start, end = spans[name]
        inside = [max(s, start) for s, e in offsets if e > start and s < end]
        if len(inside) <= excess:
            values[name] = ""
            continue
        cut = max(inside[excess] - start, 1)
        values[name] = values[name][cut:].lstrip()


def _tokenise_lm(
    records: list[Record], spec: TaskSpec, encoder: TextEncoder, max_length: int, source: str
) -> TaskData:
    first_keys = set(records[0].values)
    paired = {"prompt", "completion"} <= first_keys
    if not paired and "text" not in first_keys:
        raise ZooError(
            f"{records[0].where}: LM data needs fields prompt and completion, or text "
            f"(found: {', '.join(first_keys) or 'none'})"
        )
    prefix = encoder.prefix
    budget = max_length - len(prefix)
    seqs: list[list[int]] = []
    firsts: list[int] = []
    truncated = 0
    for r in records:
        if paired:
            prompt = encoder.encode(_raw_text(r, "prompt"))
            # EOS after the completion teaches the model to stop there.
            completion = encoder.encode(_raw_text(r, "completion"))
            if encoder.eos_id is not None:
                completion = completion + [encoder.eos_id]
            if not completion:
                raise ZooError(f"{r.where}: empty completion")
            context = 0 if prefix else min(len(prompt), 1)
            if len(prompt) + len(completion) > budget:
                truncated += 1
                completion = completion[: max(budget - context, 1)]
                keep = max(budget - len(completion), 0)
                prompt = prompt[len(prompt) - keep :]
            ids = prefix + prompt + completion
            first = max(len(prefix) + len(prompt), 1)
        else:
            ids = prefix + encoder.encode(_raw_text(r, "text"))
            if len(ids) > max_length:
                truncated += 1
                ids = ids[:max_length]
            first = 1
        if first >= len(ids):
            raise ZooError(f"{r.where}: too short to score (needs at least two tokens)")
        seqs.append(ids)
        firsts.append(first)
    tokens, offsets = _pack(seqs)
    dummy = encoder.eos_id if encoder.eos_id is not None else encoder.pad_id
    return TaskData(
        spec=spec,
        tokens=tokens,
        offsets=offsets,
        first=np.asarray(firsts, dtype=np.int64),
        labels=None,
        candidates=np.asarray([dummy], dtype=np.int64),
        pad_id=encoder.pad_id,
        source=source,
        truncated=truncated,
    )


def _raw_text(record: Record, name: str) -> str:
    # LM text keeps its whitespace: a completion's leading space is part of what is learned.
    if name not in record.values:
        have = ", ".join(record.values) or "none"
        raise ZooError(f"{record.where}: missing field {name!r} (fields: {have})")
    value = record.values[name]
    if not isinstance(value, str):
        raise ZooError(f"{record.where}: field {name!r} is {type(value).__name__}, expected text")
    return value
