"""``OrtEngine``: the :class:`~zoo_ort.engine.protocol.Engine` protocol over ONNX Runtime.

Dynamic bundles get each batch split into up to ``length_groups`` forwards of rows of similar
length, each cut to its own longest row (:mod:`zoo_ort.padding`); results come back in row
order. Static bundles (``manifest.static``) get every batch
padded to the exported sizes: ``T`` by right-padding (pad id, mask 0), ``K`` and ``C`` with
masked/duplicate slots, and rows in chunks of ``N`` filled up with copies of the chunk's first
row; only the real rows and slots are returned. On EPs with device memory (CUDA) inputs and LoRA
tensors live on the device between steps and only the per-row outputs come back to the host.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from zoo_ort.bundle import (
    NPU_INPUT_NAMES,
    NPU_SCHEME,
    OUTPUTS,
    TOKEN_INPUTS,
    Bundle,
    Manifest,
    TensorSpec,
    npu_inputs,
)
from zoo_ort.bundle.manifest import head_inputs
from zoo_ort.engine.padding import length_groups, row_widths, take_trimmed
from zoo_ort.engine.protocol import EngineOutput, TokenBatch
from zoo_ort.engine.scratch import Scratch
from zoo_ort.errors import ZooError
from zoo_ort.providers import get_spec, make_session

log = logging.getLogger(__name__)

OUTPUT_NAMES = [o.name for o in OUTPUTS]
# Forwards per batch on host EPs: enough to drop most padding, few enough to keep GEMMs large.
DEFAULT_LENGTH_GROUPS = 4
# A forward's fixed cost in row·token positions (measured: well under a row of SmolLM2 prompt).
GROUP_CALL_COST = 64

# numpy dtype name -> the element type ORT reports as "tensor(<type>)"
_ORT_TYPES = {
    "float32": "float",
    "float64": "double",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "int64": "int64",
    "int32": "int32",
    "int8": "int8",
    "uint8": "uint8",
    "bool": "bool",
}


def _dims_problem(where: str, graph: Sequence[Any], want: Sequence[Any], static: Mapping) -> str:
    """Why a graph shape does not fit a manifest shape, or ""."""
    if len(graph) != len(want):
        return f"{where} has rank {len(graph)} in the graph, {len(want)} in the manifest"
    for axis, (g, w) in enumerate(zip(graph, want, strict=True)):
        fixed = w if isinstance(w, int) else static.get(w)
        if isinstance(g, int) and fixed is None:
            return (
                f"{where} axis {axis} is fixed at {g} in the graph, dynamic ({w}) in the manifest"
            )
        if isinstance(g, int) and g != fixed:
            return f"{where} axis {axis} is {g} in the graph, {fixed} in the manifest"
    return ""


def _host_scheme(manifest: Manifest) -> dict[str, Any] | None:
    scheme = manifest.graph.get("host_inputs")
    if scheme is None:
        return None
    if scheme.get("scheme") != NPU_SCHEME or not manifest.static:
        raise ZooError(
            f"bundle's graph wants host inputs {scheme.get('scheme')!r}, which this zoo-ort "
            f"builds only for static bundles of scheme {NPU_SCHEME!r}; re-export the bundle"
        )
    return dict(scheme)


def check_graph(manifest: Manifest, session: ort.InferenceSession) -> None:
    """Raise ZooError unless the session's inputs and outputs are the manifest's."""
    static = dict(manifest.static or {})
    problems: list[str] = []
    declared = {t.name: t for t in manifest.inputs}
    required_inputs = TOKEN_INPUTS
    if manifest.trunk is not None:  # the head of a two-graph bundle takes the trunk's output
        hidden = manifest.trunk.outputs[0].shape[-1] if manifest.trunk.outputs else 0
        required_inputs = head_inputs(int(hidden))
    if _host_scheme(manifest) is not None:
        required_inputs = [TensorSpec(name, "", []) for name in NPU_INPUT_NAMES]
    for required in required_inputs:
        if required.name not in declared:
            problems.append(f"the manifest lists no input {required.name}")
    for lora in manifest.lora_tensors():
        if lora.input not in declared:
            problems.append(f"the manifest lists no input for LoRA tensor {lora.input}")
        else:
            shape = (["N"] if lora.per_row else []) + list(lora.shape)
            if problem := _dims_problem(lora.input, declared[lora.input].shape, shape, static):
                problems.append(problem.replace("the graph", "the inputs list"))

    def compare(kind: str, graph_args: Sequence[Any], specs: list[TensorSpec]) -> None:
        by_name = {a.name: a for a in graph_args}
        for spec in specs:
            arg = by_name.pop(spec.name, None)
            if arg is None:
                problems.append(f"{kind} {spec.name} is not in the graph")
                continue
            want = f"tensor({_ORT_TYPES.get(spec.dtype, spec.dtype)})"
            if arg.type != want:
                problems.append(f"{kind} {spec.name} is {arg.type} in the graph, {want} expected")
            if problem := _dims_problem(f"{kind} {spec.name}", arg.shape, spec.shape, static):
                problems.append(problem)
        if kind == "input" and by_name:
            problems.append(f"graph inputs missing from the manifest: {', '.join(sorted(by_name))}")

    compare("input", session.get_inputs(), manifest.inputs)
    declared_outputs = {o.name for o in manifest.outputs}
    for required in OUTPUTS:
        if required.name not in declared_outputs:
            problems.append(f"the manifest lists no output {required.name}")
    compare("output", session.get_outputs(), manifest.outputs)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ZooError(
            f"bundle's manifest does not match its graph: {'; '.join(problems[:3])}{more}"
        )


class _DeviceFeeds:
    """Graph inputs kept in device memory across runs; outputs are bound to host memory.

    A tensor whose shape and dtype match the previous step's is copied into the same device
    buffer (``OrtValue.update_inplace``) instead of being reallocated, which is the usual case
    for LoRA tensors and for every input of a static bundle.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        device: str,
        device_id: int,
        output_names: Sequence[str] = OUTPUT_NAMES,
    ) -> None:
        self._session = session
        self._output_names = list(output_names)
        self._device = device
        self._device_id = device_id
        self._binding = session.io_binding()
        self._values: dict[str, tuple[ort.OrtValue, np.dtype, tuple[int, ...]]] = {}

    def value(self, name: str) -> ort.OrtValue | None:
        entry = self._values.get(name)
        return entry[0] if entry else None

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        for name, array in feeds.items():
            entry = self._values.get(name)
            if entry is not None and entry[1] == array.dtype and entry[2] == array.shape:
                entry[0].update_inplace(np.ascontiguousarray(array))
            else:
                value = ort.OrtValue.ortvalue_from_numpy(
                    np.ascontiguousarray(array), self._device, self._device_id
                )
                self._values[name] = (value, array.dtype, array.shape)
            self._binding.bind_ortvalue_input(name, self._values[name][0])
        for name in self._output_names:
            self._binding.bind_output(name, "cpu")
        self._binding.synchronize_inputs()
        self._session.run_with_iobinding(self._binding)
        self._binding.synchronize_outputs()
        # copies: the binding reuses its output buffers on the next run
        return [np.array(v.numpy(), copy=True) for v in self._binding.get_outputs()]


class OrtEngine:
    """Scores token batches under per-row LoRA tensors with ONNX Runtime.

    ``provider_options`` are ORT option strings as :func:`zoo_ort.providers.parse_options`
    returns them; ``fallback="cpu"`` accepts running on the CPU if the EP cannot start.
    """

    def __init__(
        self,
        bundle: Bundle,
        provider: str = "cpu",
        provider_options: Mapping[str, object] | None = None,
        fallback: str | None = None,
        threads: int | None = None,
        length_groups: int | None = None,
    ) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        if self.manifest.trunk is not None and not self._runs_trunk:
            raise ZooError(
                f"{bundle.path} is a trunk + head bundle (LoRA on layers "
                f"{self.manifest.trunk.layers[0]}:{self.manifest.trunk.layers[1]}); score it with "
                "zoo_ort.engine.trunk.TrunkEngine"
            )
        spec = get_spec(provider)
        self.session = make_session(
            bundle.model_path,
            spec.name,
            dict(provider_options or {}),
            fallback=fallback,
            intra_op_threads=threads,
        )
        check_graph(self.manifest, self.session)
        self._lora = {t.input: t for t in self.manifest.lora_tensors()}
        self._dtypes = {t.name: np.dtype(t.dtype) for t in self.manifest.inputs}
        self._static = dict(self.manifest.static or {})
        self._host = _host_scheme(self.manifest)
        tok = self.manifest.tokenizer
        pad = next(
            (tok.get(k) for k in ("pad_token_id", "eos_token_id") if tok.get(k) is not None), 0
        )
        self._pad_id = int(pad)
        self._device: _DeviceFeeds | None = None
        self._device_proven = False
        if spec.io_binding_device and spec.ort_name in self.active_providers:
            device_id = int(dict(provider_options or {}).get("device_id", 0))
            self._device = _DeviceFeeds(self.session, spec.io_binding_device, device_id)
        # Host EPs pay for every padded position; a GPU pays more for extra launches than for
        # padding, so it gets one forward per batch.
        if length_groups is None:
            length_groups = 1 if self._device is not None else DEFAULT_LENGTH_GROUPS
        self.length_groups = max(1, int(length_groups))
        self.group_call_cost = GROUP_CALL_COST
        self._scratch = Scratch()  # the groups' LoRA rows, rewritten by every forward

    # Subclasses that feed the head of a two-graph bundle (TrunkEngine) say so.
    _runs_trunk = False

    @property
    def active_providers(self) -> list[str]:
        """The providers the session really uses, best first (e.g. ``["CUDAExecutionProvider",
        "CPUExecutionProvider"]``)."""
        return list(self.session.get_providers())

    @property
    def uses_io_binding(self) -> bool:
        return self._device is not None

    # -- the Engine protocol -------------------------------------------------------------------
    def forward(self, batch: TokenBatch, lora: Mapping[str, np.ndarray]) -> EngineOutput:
        self._check_tokens(batch)
        if batch.rows == 0:
            self._lora_feeds(lora, 0)
            k, c = batch.target_pos.shape[1], batch.candidate_ids.shape[1]
            return EngineOutput(np.zeros(0, np.float32), np.zeros((0, k, c), np.float32))
        if not self._static:
            loss, cand = self._run_grouped(self.grouped_feeds(batch, lora), batch.rows)
        else:
            feeds = self._token_feeds(batch)
            feeds.update(self._lora_feeds(lora, batch.rows))
            loss, cand = self._run_static(feeds, batch)
        return EngineOutput(
            loss=loss.astype(np.float32), candidate_logprobs=cand.astype(np.float32)
        )

    def grouped_feeds(
        self, batch: TokenBatch, lora: Mapping[str, np.ndarray]
    ) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """``(rows, feeds)`` of each forward a dynamic bundle gets for ``batch``: rows of similar
        length, cut to their own longest row (see :mod:`zoo_ort.padding`). The feeds are valid
        until the next call (the groups' LoRA rows live in reused memory)."""
        self._check_tokens(batch)
        lora_feeds = self._lora_feeds(lora, batch.rows)
        widths = row_widths(batch)
        groups = length_groups(widths, self.length_groups, self.group_call_cost)
        # The groups partition the rows: one buffer of all rows per tensor holds every group's
        # copy as a slice, so the memory kept is one batch's worth whatever the split.
        gathered = {
            name: self._scratch.get(name, array.shape, array.dtype)
            for name, array in lora_feeds.items()
            if self._lora[name].per_row and len(groups) > 1
        }
        parts, start = [], 0
        for index, rows in enumerate(groups):
            feeds = self._group_feeds(batch, rows, widths, index)
            stop = start + len(rows)
            for name, array in lora_feeds.items():
                if name in gathered:
                    feeds[name] = np.take(array, rows, axis=0, out=gathered[name][start:stop])
                else:  # shared by all rows, or one group holding every row in order
                    feeds[name] = array
            parts.append((rows, feeds))
            start = stop
        return parts

    # -- feeds ---------------------------------------------------------------------------------
    def _group_feeds(
        self, batch: TokenBatch, rows: np.ndarray, widths: np.ndarray, index: int
    ) -> dict[str, np.ndarray]:
        """The token feeds of length group ``index`` (rows ``rows``, cut to their widest)."""
        return self._token_feeds(take_trimmed(batch, rows, widths))

    @staticmethod
    def _check_tokens(batch: TokenBatch) -> None:
        n = batch.rows
        for name, array in batch.arrays().items():
            shape = list(np.shape(array))
            if len(shape) != 2 or shape[0] != n:
                raise ZooError(f"batch {name} has shape {shape}, expected [{n}, ...]")

    def _token_feeds(self, batch: TokenBatch) -> dict[str, np.ndarray]:
        return {
            name: np.ascontiguousarray(array, dtype=self._dtypes.get(name, array.dtype))
            for name, array in batch.arrays().items()
        }

    def _lora_feeds(self, lora: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        missing = sorted(set(self._lora) - set(lora))
        extra = sorted(set(lora) - set(self._lora))
        if missing or extra:
            raise ZooError(
                f"LoRA tensors do not match the bundle (missing {missing[:3]}, "
                f"unexpected {extra[:3]})"
            )
        feeds = {}
        for name, spec in self._lora.items():
            array = np.asarray(lora[name])
            want = ((rows,) if spec.per_row else ()) + tuple(spec.shape)
            if array.shape != want:
                raise ZooError(
                    f"LoRA tensor {name} has shape {list(array.shape)}, expected {list(want)}"
                )
            feeds[name] = np.ascontiguousarray(array, dtype=self._dtypes.get(name, np.float32))
        return feeds

    def _run(self, feeds: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if self._device is not None:
            try:
                loss, cand = self._device.run(feeds)
                self._device_proven = True
                return loss, cand
            except Exception as e:  # ORT's own error types
                if self._device_proven:
                    raise
                # An EP whose allocator cannot back OrtValues made this way (plugin EPs register
                # theirs differently): feed from host memory instead; ORT copies the inputs.
                log.warning("IO binding failed on first use (%s); feeding from host memory", e)
                self._device = None
        loss, cand = self.session.run(OUTPUT_NAMES, dict(feeds))
        return loss, cand

    def _run_grouped(
        self, parts: list[tuple[np.ndarray, dict[str, np.ndarray]]], n_rows: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Run every group's forward and put the results back in row order."""
        outs = [(rows, *self._run(feeds)) for rows, feeds in parts]
        if len(outs) == 1:  # one group holds every row, in order
            return outs[0][1], outs[0][2]
        _, loss0, cand0 = outs[0]
        loss = np.empty((n_rows, *loss0.shape[1:]), dtype=loss0.dtype)
        cand = np.empty((n_rows, *cand0.shape[1:]), dtype=cand0.dtype)
        for rows, part_loss, part_cand in outs:
            loss[rows], cand[rows] = part_loss, part_cand
        return loss, cand

    # -- static bundles ------------------------------------------------------------------------
    def _run_static(
        self, feeds: dict[str, np.ndarray], batch: TokenBatch
    ) -> tuple[np.ndarray, np.ndarray]:
        static = self._static
        n, t = batch.input_ids.shape
        k, c = batch.target_pos.shape[1], batch.candidate_ids.shape[1]
        for symbol, size in (("T", t), ("K", k), ("C", c)):
            if symbol in static and size > static[symbol]:
                raise ZooError(
                    f"batch has {symbol}={size} but the bundle was exported with static "
                    f"{symbol}={static[symbol]}; shorten the inputs or re-export with a larger size"
                )
        padded = dict(feeds)
        for names, symbol, size in (
            (("input_ids", "attention_mask"), "T", t),
            (("target_pos", "target_ids", "target_mask"), "K", k),
            (("candidate_ids",), "C", c),
        ):
            extra = static.get(symbol, size) - size
            for name in names:
                if extra:
                    fill = self._pad_id if name == "input_ids" else 0
                    mode: dict[str, Any] = (
                        {"mode": "edge"} if name == "candidate_ids" else {"constant_values": fill}
                    )
                    padded[name] = np.pad(feeds[name], ((0, 0), (0, extra)), **mode)
        rows_per_run = static.get("N", n)
        per_row = [name for name, spec in self._lora.items() if spec.per_row] + [
            i.name for i in TOKEN_INPUTS
        ]
        losses, cands = [], []
        for start in range(0, n, rows_per_run):
            real = np.arange(start, min(start + rows_per_run, n))
            rows = np.concatenate([real, np.full(rows_per_run - len(real), real[0])])
            chunk = {
                name: (np.ascontiguousarray(a[rows]) if name in per_row else a)
                for name, a in padded.items()
            }
            if self._host is not None:
                tokens = {i.name: chunk.pop(i.name) for i in TOKEN_INPUTS}
                chunk.update(npu_inputs(tokens, int(self._host["vocab_size"])))
            loss, cand = self._run(chunk)
            losses.append(loss[: len(real)])
            cands.append(cand[: len(real), :k, :c])
        return np.concatenate(losses), np.concatenate(cands)
