"""Training checkpoints: one safetensors file per checkpoint and an atomic ``latest`` pointer.

Layout under ``<run_dir>/checkpoints/``::

    step-00000120.safetensors   tensors "param/<name>", "opt/<key>", "best/<name>";
                                metadata "zoo_ort_checkpoint" = JSON of :attr:`Checkpoint.info`
    latest.json                 {"file": "step-00000120.safetensors", "step": 120}

A save writes the new file (temp + rename), then replaces ``latest.json`` (temp + rename), then
deletes all but the newest ``keep`` files. A ``kill -9`` at any moment therefore leaves
``latest.json`` naming a complete checkpoint. A state with a non-finite tensor is refused
before anything is written, so a good checkpoint is never replaced by a broken one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zoo_ort.errors import ZooError
from zoo_ort.io import (
    atomic_write_json,
    load_tensors,
    load_tensors_metadata,
    read_json,
    save_tensors,
)

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"
META_KEY = "zoo_ort_checkpoint"
FORMAT_VERSION = 1
_FILE_RE = re.compile(r"^step-(\d{8,})\.safetensors$")


@dataclass
class Checkpoint:
    step: int  # optimisation steps completed; the next step to run
    params: dict[str, np.ndarray]
    opt_state: dict[str, np.ndarray]  # optim.state_to_tensors form
    best_params: dict[str, np.ndarray] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # JSON-able: counters, config, digests


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def _file_name(step: int) -> str:
    return f"step-{step:08d}.safetensors"


def _check_finite(ckpt: Checkpoint) -> None:
    groups = [("param", ckpt.params), ("opt", ckpt.opt_state), ("best", ckpt.best_params or {})]
    for prefix, tensors in groups:
        for name, v in tensors.items():
            arr = np.asarray(v)
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise ZooError(
                    f"refusing to checkpoint step {ckpt.step}: {prefix} {name} is not finite "
                    "(the last good checkpoint is kept); lower the learning rate or eps"
                )


def save_checkpoint(run_dir: str | Path, ckpt: Checkpoint, keep: int = 2) -> Path:
    """Write ``ckpt`` and point ``latest.json`` at it; keep the newest ``keep`` files."""
    _check_finite(ckpt)
    folder = checkpoint_dir(run_dir)
    tensors: dict[str, np.ndarray] = {}
    for prefix, group in (
        ("param", ckpt.params),
        ("opt", ckpt.opt_state),
        ("best", ckpt.best_params or {}),
    ):
        tensors.update({f"{prefix}/{k}": np.asarray(v) for k, v in group.items()})
    info = dict(ckpt.info) | {
        "format_version": FORMAT_VERSION,
        "step": int(ckpt.step),
        "has_best": ckpt.best_params is not None,
    }
    path = folder / _file_name(ckpt.step)
    save_tensors(path, tensors, metadata={META_KEY: json.dumps(info, sort_keys=True)})
    atomic_write_json(folder / LATEST, {"file": path.name, "step": int(ckpt.step)})
    _prune(folder, latest=ckpt.step, keep=max(int(keep), 1))
    return path


def _prune(folder: Path, latest: int, keep: int) -> None:
    steps = []
    for p in folder.iterdir():
        m = _FILE_RE.match(p.name)
        if m:
            steps.append((int(m.group(1)), p))
        elif p.name.startswith(".") and p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)  # left by a write that was killed
    kept = sorted((s for s in steps if s[0] <= latest), reverse=True)[:keep]
    for s in steps:
        if s not in kept:  # older ones, and files past `latest` left by a killed earlier run
            s[1].unlink(missing_ok=True)


def has_checkpoint(run_dir: str | Path) -> bool:
    return (checkpoint_dir(run_dir) / LATEST).is_file()


def load_latest(run_dir: str | Path) -> Checkpoint | None:
    """The checkpoint ``latest.json`` names, or ``None`` if there is none yet."""
    folder = checkpoint_dir(run_dir)
    if not (folder / LATEST).is_file():
        return None
    pointer = read_json(folder / LATEST)
    name = pointer.get("file") if isinstance(pointer, dict) else None
    if not isinstance(name, str) or not _FILE_RE.match(name):
        raise ZooError(f"{folder / LATEST}: malformed checkpoint pointer")
    return load_checkpoint(folder / name)


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    meta = load_tensors_metadata(path)
    if META_KEY not in meta:
        raise ZooError(f"{path}: not a zoo-ort checkpoint")
    info = json.loads(meta[META_KEY])
    if info.get("format_version") != FORMAT_VERSION:
        raise ZooError(f"{path}: checkpoint format {info.get('format_version')} not supported")
    tensors = load_tensors(path)
    groups: dict[str, dict[str, np.ndarray]] = {"param": {}, "opt": {}, "best": {}}
    for key, v in tensors.items():
        prefix, _, name = key.partition("/")
        if prefix not in groups:
            raise ZooError(f"{path}: unexpected tensor {key}")
        groups[prefix][name] = v
    return Checkpoint(
        step=int(info["step"]),
        params=groups["param"],
        opt_state=groups["opt"],
        best_params=groups["best"] if info.get("has_best") else None,
        info=info,
    )


def tensors_digest(*groups: Mapping[str, np.ndarray]) -> str:
    """A SHA-256 over names, dtypes, shapes and bytes: identifies initial/frozen tensors."""
    import hashlib

    h = hashlib.sha256()
    for j, group in enumerate(groups):
        for name in sorted(group):
            arr = np.ascontiguousarray(group[name])
            h.update(f"{j}|{name}|{arr.dtype.str}|{arr.shape}|".encode())
            h.update(arr.tobytes())
    return h.hexdigest()
