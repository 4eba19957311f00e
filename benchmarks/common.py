"""Shared benchmark plumbing: machine description, peak-RSS measurement, isolated runs, results.

Each contender of a benchmark runs in its own Python process (:func:`run_in_subprocess`) so that
its peak RSS is its own and not the high-water mark left by whatever ran before it in the same
interpreter. Inside that process, :class:`PeakRSS` narrows the measurement to one phase (training,
not model loading) by resetting the kernel's high-water mark on entry.

Nothing here imports torch: importing it would cost seconds and hundreds of MiB in every process
that only wants to write a table.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from zoo_ort.io import atomic_write_json, atomic_write_text, read_json

REPO_ROOT = Path(__file__).resolve().parents[1]
# A time budget never stops a contender before this many steps: on a loaded machine a tiny budget
# could otherwise leave one point, and nothing to compare (the quick run's budget is 1 s).
MIN_STEPS = 3
DATA_DIR = REPO_ROOT.parent / "shared" / "data"

_PACKAGES = ("numpy", "onnxruntime", "torch", "transformers", "peft", "tokenizers", "zoo-ort")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The CPU features integer and vector kernels depend on (machines differ between sessions).
_CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in _CPU_FLAGS if f in have]
    except OSError:
        pass
    return []


def _total_ram_mb() -> float | None:
    try:
        m = re.search(r"MemTotal:\s+(\d+)\s+kB", Path("/proc/meminfo").read_text())
        if m:
            return int(m.group(1)) / 1024
    except OSError:
        pass
    try:
        import psutil

        return psutil.virtual_memory().total / 2**20
    except ImportError:
        return None


def machine_info() -> dict[str, Any]:
    """Where the numbers were taken: CPU, cores, RAM, OS, Python and library versions.

    Versions come from package metadata, so nothing heavy is imported; a package that is not
    installed is reported as ``None``.
    """
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    versions: dict[str, str | None] = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "ram_total_mb": _total_ram_mb(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# --------------------------------------------------------------------------------------------
# Peak RSS


def _status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def current_rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def process_peak_rss_mb() -> float:
    """Peak RSS of this process since it started (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_high_water_mark() -> bool:
    # Linux >= 4.0: writing "5" to clear_refs resets VmHWM to the current RSS.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak resident memory of this process during a ``with`` block.

    On Linux the kernel's high-water mark (``VmHWM``) is reset on entry and read on exit, which
    catches every transient peak. Where that is not possible, a thread samples RSS every
    ``interval_s`` (may miss short spikes); ``method`` says which was used. The result includes
    whatever was already resident on entry (the loaded model): it is the memory the phase needs.
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.method = ""
        self.rss_before_mb: float | None = None
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled_kb = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            kb = _status_kb("VmRSS") or 0
            self._sampled_kb = max(self._sampled_kb, kb)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.rss_before_mb = current_rss_mb()
        if _reset_high_water_mark() and _status_kb("VmHWM") is not None:
            self.method = "VmHWM"
        else:
            self.method = "sampled"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.method == "VmHWM":
            self.peak_mb = (_status_kb("VmHWM") or 0) / 1024
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._sampled_kb = max(self._sampled_kb, _status_kb("VmRSS") or 0)
            self.peak_mb = self._sampled_kb / 1024

    def as_dict(self) -> dict[str, Any]:
        return {
            "phase_peak_rss_mb": self.peak_mb,
            "rss_before_mb": self.rss_before_mb,
            "rss_method": self.method,
        }


# --------------------------------------------------------------------------------------------
# Isolated runs


def _resolve(func_path: str) -> Any:
    module, _, name = func_path.partition(":")
    if not name:
        raise ValueError(f"func_path must look like 'package.module:function', got {func_path!r}")
    return getattr(importlib.import_module(module), name)


def run_in_subprocess(
    func_path: str,
    kwargs: Mapping[str, Any],
    *,
    timeout_s: float | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Call ``func_path`` (``"pkg.module:function"``) with JSON ``kwargs`` in a fresh interpreter.

    The function must return a JSON-serialisable dict. The child adds ``peak_rss_mb`` (its whole
    lifetime, ``ru_maxrss``) and ``child_wall_s``; a ``phase_peak_rss_mb`` the function measured
    itself with :class:`PeakRSS` is kept as is. Arguments and results travel as JSON files, never
    pickles. A failing child raises ``RuntimeError`` carrying the end of its stderr.
    """
    with tempfile.TemporaryDirectory(prefix="zoo-bench-") as tmp:
        args_path = Path(tmp) / "args.json"
        out_path = Path(tmp) / "result.json"
        atomic_write_json(args_path, {"func": func_path, "kwargs": dict(kwargs)})
        child_env = dict(os.environ if env is None else env)
        child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), child_env.get("PYTHONPATH", "")) if p
        )
        cmd = [sys.executable, "-m", "benchmarks.common", str(args_path), str(out_path)]
        proc = subprocess.run(
            cmd,
            cwd=REPO_ROOT,
            env=child_env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if proc.returncode != 0 or not out_path.is_file():
            tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
            raise RuntimeError(
                f"{func_path} failed in a subprocess (rc={proc.returncode}):\n{tail}"
            )
        return read_json(out_path)


def _child_main(args_path: str, out_path: str) -> None:
    start = time.perf_counter()
    spec = read_json(args_path)
    result = dict(_resolve(spec["func"])(**spec["kwargs"]))
    result["peak_rss_mb"] = process_peak_rss_mb()
    result["child_wall_s"] = time.perf_counter() - start
    atomic_write_json(out_path, result)


# --------------------------------------------------------------------------------------------
# Results


def ids_digest(seqs: Iterable[np.ndarray]) -> str:
    """A short hash of a list of token id sequences (lengths included): equal on two sides of a
    benchmark only if both tokenised the same examples the same way, in the same order."""
    h = hashlib.sha256()
    for s in seqs:
        a = np.asarray(s, dtype=np.int64)
        h.update(np.int64(len(a)).tobytes())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v == 0:
            return "0"
        mag = abs(v)
        if mag >= 1000:
            return f"{v:,.0f}"
        if mag >= 0.01:
            return f"{v:.4g}"
        return f"{v:.3e}"
    if isinstance(v, list | tuple):
        return ", ".join(_fmt(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str | tuple[str, str]] | None = None,
) -> str:
    """A GitHub markdown table of ``rows``.

    ``columns`` lists keys, or ``(key, header)`` pairs; by default every key, in first-seen order.
    Missing values are left blank; floats get 4 significant digits.
    """
    if columns is None:
        keys: list[str] = []
        for row in rows:
            keys.extend(k for k in row if k not in keys)
        columns = keys
    cols = [(c, c) if isinstance(c, str) else (c[0], c[1]) for c in columns]
    lines = [
        "| " + " | ".join(h for _, h in cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(k)) for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def write_results(
    out_dir: str | os.PathLike,
    name: str,
    rows: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any] | None = None,
    columns: Sequence[str | tuple[str, str]] | None = None,
) -> str:
    """Write ``{out_dir}/{name}.json`` (machine, meta, rows) and ``{name}.md``; return the table.

    Both files are written atomically; the JSON keeps the full rows (curves included), the
    markdown only the ``columns`` (scalar columns by default).
    """
    out = Path(out_dir)
    atomic_write_json(
        out / f"{name}.json",
        {"name": name, "machine": machine_info(), "meta": dict(meta or {}), "rows": list(rows)},
    )
    if columns is None:
        seen: list[str] = []
        for row in rows:
            seen.extend(
                k for k, v in row.items() if k not in seen and not isinstance(v, list | dict)
            )
        columns = seen
    table = markdown_table(rows, columns)
    atomic_write_text(out / f"{name}.md", f"# {name}\n\n{table}")
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="child side of run_in_subprocess")
    parser.add_argument("args_json")
    parser.add_argument("result_json")
    ns = parser.parse_args()
    _child_main(ns.args_json, ns.result_json)


# --------------------------------------------------------------------------------------------
# Shared by the federation scripts


def add_train_flags(ap: Any) -> None:
    """The training settings a federation script passes through to zoo-ort (None: not given)."""
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--eps", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--queries", type=int, default=None)
    ap.add_argument("--eval-rows", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)


def tiny_llama_bundle(prefix: str) -> Path:
    """A bundle of a tiny random Llama in a new temporary folder (smoke runs of the scripts)."""
    import tempfile

    from zoo_ort.exporters import export_bundle
    from zoo_ort.exporters.tiny import make_tiny_model

    root = Path(tempfile.mkdtemp(prefix=prefix))
    src = make_tiny_model("llama", root / "src")
    return export_bundle(str(src), root / "bundle", rank=4, mode="fa", seed=0)
