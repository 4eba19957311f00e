"""``TrunkEngine``: scoring a trunk + head bundle (LoRA on a range of layers, ``lora_layers``).

The layers below the lowest LoRA layer do not depend on the adapter, so their output is the same
for every row that carries the same tokens: in P-RGE the ``2·q`` perturbed copies of each of the
``B`` examples, and across steps every example seen before. The engine

* finds the distinct examples of a batch by hashing each row's tokens (ids and mask, through the
  row's width), whatever the row layout;
* runs the trunk once per distinct example not in its cache (in length groups, as
  :class:`~zoo_ort.engine.ort.OrtEngine` does for rows), and tiles the hidden states to the
  head's rows;
* keeps the trunk outputs of recent examples in an LRU cache of at most ``trunk_cache_mb``
  (0: no cache; the within-batch sharing still holds). The cache lives in this process's memory,
  so RSS figures include it; :attr:`TrunkCache.nbytes` says how much it holds.

A cached output is the stored result of an earlier trunk run, so a hit gives the head exactly
the input a miss gave it, bit for bit.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnxruntime as ort

from zoo_ort.bundle import Bundle, Manifest
from zoo_ort.bundle.manifest import HIDDEN
from zoo_ort.engine.ort import _ORT_TYPES, OrtEngine, _dims_problem
from zoo_ort.engine.padding import length_groups, row_widths, take_trimmed
from zoo_ort.engine.protocol import TokenBatch
from zoo_ort.errors import ZooError
from zoo_ort.providers import get_spec, make_session

MB = 2**20


def check_trunk_graph(manifest: Manifest, session: ort.InferenceSession) -> None:
    """Raise ZooError unless the trunk session's inputs and outputs are the manifest's."""
    trunk = manifest.trunk
    assert trunk is not None
    problems: list[str] = []
    for kind, args, specs in (
        ("input", session.get_inputs(), trunk.inputs),
        ("output", session.get_outputs(), trunk.outputs),
    ):
        by_name = {a.name: a for a in args}
        if sorted(by_name) != sorted(s.name for s in specs):
            problems.append(
                f"trunk {kind}s are {sorted(by_name)} in the graph, "
                f"{sorted(s.name for s in specs)} in the manifest"
            )
            continue
        for spec in specs:
            arg = by_name[spec.name]
            want = f"tensor({_ORT_TYPES.get(spec.dtype, spec.dtype)})"
            if arg.type != want:
                problems.append(f"trunk {kind} {spec.name} is {arg.type}, {want} expected")
            if problem := _dims_problem(f"trunk {kind} {spec.name}", arg.shape, spec.shape, {}):
                problems.append(problem)
    head_hidden = next((s for s in manifest.inputs if s.name == HIDDEN), None)
    trunk_hidden = next((s for s in trunk.outputs if s.name == HIDDEN), None)
    if head_hidden is None or trunk_hidden is None or head_hidden.shape != trunk_hidden.shape:
        problems.append(f"the trunk's {HIDDEN} output and the head's {HIDDEN} input differ")
    if problems:
        raise ZooError(f"bundle's manifest does not match its trunk graph: {'; '.join(problems)}")


def hidden_bytes(manifest: Manifest, examples: int, seq_len: int) -> int:
    """Bytes of trunk output for ``examples`` distinct examples of ``seq_len`` tokens: what the
    cache must hold for one batch (the app checks its budget with this before a run starts)."""
    trunk = manifest.trunk
    if trunk is None:
        raise ZooError("the bundle has no trunk graph (export it with lora_layers)")
    width = int(trunk.outputs[0].shape[-1])
    return int(examples) * int(seq_len) * width * np.dtype(np.float32).itemsize


def check_cache_budget(
    manifest: Manifest, trunk_cache_mb: float, examples: int, seq_len: int
) -> None:
    """ZooError unless a cache of ``trunk_cache_mb`` holds one batch of ``examples`` examples of
    up to ``seq_len`` tokens (0 turns the cache off and always passes)."""
    if trunk_cache_mb < 0:
        raise ZooError(f"trunk_cache_mb must be 0 (no cache) or positive, got {trunk_cache_mb}")
    need = hidden_bytes(manifest, examples, seq_len)
    if trunk_cache_mb and need > trunk_cache_mb * MB:
        raise ZooError(
            f"trunk_cache_mb {trunk_cache_mb:g} cannot hold one batch: {examples} examples of "
            f"{seq_len} tokens need {need / MB:.1f} MB of trunk output; raise it, or set 0 to "
            "turn the cache off"
        )


class TrunkCache:
    """Trunk outputs by example key, least recently used evicted first, within ``budget`` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget = int(budget)
        self._entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> np.ndarray | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: bytes, value: np.ndarray) -> None:
        """Store ``value``, evicting the least recently used entries to stay within budget."""
        if not self.budget:
            return
        size = value.nbytes
        if size > self.budget:
            return  # the batch check says this cannot happen; never exceed the budget anyway
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        while self._entries and self.nbytes + size > self.budget:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes
            self.evictions += 1
        self._entries[key] = value
        self.nbytes += size

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0


def example_keys(batch: TokenBatch, widths: np.ndarray) -> list[bytes]:
    """Per row, a hash of what the trunk sees of it: token ids and mask through its width.

    Rows with the same key get the same trunk output whatever their place in the batch; the
    width is part of what is hashed (the byte count), so a row cut shorter is another example.
    """
    ids = np.ascontiguousarray(batch.input_ids, dtype=np.int64)
    mask = np.ascontiguousarray(batch.attention_mask, dtype=np.int64)
    keys = []
    for row, width in enumerate(widths):
        h = hashlib.blake2b(digest_size=16)
        h.update(ids[row, :width].tobytes())
        h.update(mask[row, :width].tobytes())
        keys.append(h.digest())
    return keys


class TrunkEngine(OrtEngine):
    """:class:`OrtEngine` for trunk + head bundles: the trunk once per distinct example (and
    not again while its output is cached), the head on every row.

    ``trunk_cache_mb`` bounds the cache of trunk outputs (0: none); a batch whose distinct
    examples need more than the budget is a ZooError, as :func:`check_cache_budget` says ahead.
    """

    _runs_trunk = True

    def __init__(
        self,
        bundle: Bundle,
        provider: str = "cpu",
        provider_options: Mapping[str, object] | None = None,
        fallback: str | None = None,
        threads: int | None = None,
        length_groups: int | None = None,
        trunk_cache_mb: float = 0.0,
    ) -> None:
        trunk = bundle.manifest.trunk
        if trunk is None:
            raise ZooError(f"{bundle.path} has no trunk graph; score it with OrtEngine")
        if bundle.manifest.static:
            raise ZooError(f"{bundle.path}: a trunk + head bundle with static shapes is not run")
        if trunk_cache_mb is None or trunk_cache_mb < 0:
            raise ZooError(f"trunk_cache_mb must be 0 (no cache) or positive, got {trunk_cache_mb}")
        super().__init__(
            bundle,
            provider=provider,
            provider_options=provider_options,
            fallback=fallback,
            threads=threads,
            length_groups=length_groups,
        )
        assert bundle.trunk_path is not None
        self.trunk_session = make_session(
            bundle.trunk_path,
            get_spec(provider).name,
            dict(provider_options or {}),
            fallback=fallback,
            intra_op_threads=threads,
            # The head runs right after the trunk on the same cores: the trunk's threads must
            # sleep when it is done rather than spin (ORT's default) and slow the head down.
            session_options_extra={"session.intra_op.allow_spinning": "0"},
        )
        check_trunk_graph(self.manifest, self.trunk_session)
        self.trunk_cache_mb = float(trunk_cache_mb)
        self.cache = TrunkCache(int(self.trunk_cache_mb * MB))
        self.hidden_size = int(trunk.outputs[0].shape[-1])
        self.trunk_rows = 0  # rows the trunk has run, for reports
        self._row_hidden: list[np.ndarray] = []

    # -- the trunk -----------------------------------------------------------------------------
    def grouped_feeds(
        self, batch: TokenBatch, lora: Mapping[str, np.ndarray]
    ) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
        self._check_tokens(batch)
        self._row_hidden = self._trunk_outputs(batch)
        return super().grouped_feeds(batch, lora)

    def _trunk_outputs(self, batch: TokenBatch) -> list[np.ndarray]:
        """Per row, the trunk's hidden states through the row's width ([width, hidden])."""
        widths = row_widths(batch)
        keys = example_keys(batch, widths)
        first_row: dict[bytes, int] = {}
        for row, key in enumerate(keys):
            first_row.setdefault(key, row)
        if self.cache.budget:
            need = sum(int(widths[r]) for r in first_row.values()) * self.hidden_size * 4
            if need > self.cache.budget:
                raise ZooError(
                    f"trunk_cache_mb {self.trunk_cache_mb:g} cannot hold one batch: its "
                    f"{len(first_row)} distinct examples need {need / MB:.1f} MB of trunk "
                    "output; raise it, or set 0 to turn the cache off"
                )
        outputs: dict[bytes, np.ndarray] = {}
        missing = []
        for key, row in first_row.items():
            hit = self.cache.get(key)
            if hit is None:
                missing.append(row)
            else:
                outputs[key] = hit
        if missing:
            rows = np.asarray(missing, dtype=np.int64)
            for group in length_groups(widths[rows], self.length_groups, self.group_call_cost):
                part = take_trimmed(batch, rows[group], widths)
                hidden = self._run_trunk(part)
                for i, row in enumerate(rows[group]):
                    # A copy: the group's array is freed, and the cache holds only real columns.
                    outputs[keys[row]] = np.array(hidden[i, : widths[row]], copy=True)
            self.trunk_rows += len(missing)
            for row in missing:
                self.cache.put(keys[row], outputs[keys[row]])
        return [outputs[key] for key in keys]

    def _run_trunk(self, part: TokenBatch) -> np.ndarray:
        feeds: dict[str, Any] = {
            spec.name: np.ascontiguousarray(getattr(part, spec.name), dtype=np.int64)
            for spec in self.manifest.trunk.inputs  # type: ignore[union-attr]
        }
        (hidden,) = self.trunk_session.run([HIDDEN], feeds)
        return hidden

    # -- the head ------------------------------------------------------------------------------
    def _group_feeds(
        self, batch: TokenBatch, rows: np.ndarray, widths: np.ndarray, index: int
    ) -> dict[str, np.ndarray]:
        feeds = super()._group_feeds(batch, rows, widths, index)
        del feeds["input_ids"]
        width = feeds["attention_mask"].shape[1]
        block = self._scratch.get((HIDDEN, index), (len(rows), width, self.hidden_size))
        for i, row in enumerate(rows):
            hidden = self._row_hidden[row]
            block[i, : len(hidden)] = hidden
            # Columns past a row's width are padding (mask 0): any finite value leaves the real
            # positions unchanged; zeros keep them finite.
            block[i, len(hidden) :] = 0.0
        feeds[HIDDEN] = block
        return feeds
