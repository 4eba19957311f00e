"""The run's metrics log (``metrics.jsonl``) and its plot (``plot.png``).

One JSON object per line, appended and flushed line by line: a crash can at worst leave a torn
last line, which :func:`read_metrics` skips. Training records carry ``"step"`` (1-based: the
number of steps done) and evaluation records additionally ``"eval"`` (a dict of metrics).
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoo_ort.io import atomic_write_bytes, atomic_write_text
from zoo_ort.settings import HOLDOUT_PREFIX

METRICS = "metrics.jsonl"
PLOT = "plot.png"


def jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if hasattr(v, "tolist"):  # numpy scalars and arrays
        return jsonable(v.tolist())
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the log strictly parseable
    return v


class MetricsLog:
    """Append-only JSONL log; one record per call, flushed to the OS at once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(jsonable(record), sort_keys=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (left by a run killed after its last checkpoint)."""
        if not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a metrics log (a torn last line is ignored)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


@dataclass(frozen=True)
class PlotResult:
    path: Path | None  # the PNG written, or None
    message: str  # what happened, for the CLI to show


# What each logged metric is, in the plot's legend ("loss" alone would not say which loss).
LABELS = {
    "loss": "dev LM loss (label token's NLL over the vocabulary)",
    "candidate_loss": "dev candidate loss (CE over the label words)",
    "accuracy": "dev accuracy",
    "nll": "dev NLL per token",
}


def _label(key: str) -> str:
    """The legend of an eval metric; ``holdout_*`` ones are the held-back training rows'."""
    base = key.removeprefix(HOLDOUT_PREFIX)
    label = LABELS.get(base, f"dev {base}")
    return label.replace("dev ", "held-back ", 1) if base != key else label


def plot(run_dir: str | Path, title: str | None = None) -> PlotResult:
    """Draw training loss and evaluation metrics vs step into ``run_dir/plot.png``."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / METRICS)
    train = [r for r in records if "loss" in r and "eval" not in r]
    evals = [r for r in records if isinstance(r.get("eval"), dict)]
    if not train and not evals:
        return PlotResult(None, f"no metrics in {run_dir / METRICS}; nothing to plot")
    try:
        os.environ.setdefault("MPLBACKEND", "Agg")
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return PlotResult(
            None, "matplotlib is not installed; skipped the plot (pip install 'zoo-ort[plot]')"
        )

    def series(rs: list[dict[str, Any]], get) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for r in rs:
            y = get(r)
            if isinstance(y, (int, float)) and math.isfinite(y):
                xs.append(int(r["step"]))
                ys.append(float(y))
        return xs, ys

    eval_keys = sorted(
        {k for r in evals for k, v in r["eval"].items() if isinstance(v, (int, float))}
    )
    acc_keys = [k for k in eval_keys if "acc" in k]
    fig, axes = plt.subplots(1, 2 if acc_keys else 1, figsize=(11 if acc_keys else 6, 4))
    ax_loss = axes[0] if acc_keys else axes
    xs, ys = series(train, lambda r: r.get("loss"))
    if xs:
        ax_loss.plot(xs, ys, lw=0.8, alpha=0.5, label="train loss (mean of the θ±εz rows)")
        if len(ys) >= 10:
            w = max(len(ys) // 20, 2)
            smooth = [
                sum(ys[max(0, i - w + 1) : i + 1]) / len(ys[max(0, i - w + 1) : i + 1])
                for i in range(len(ys))
            ]
            ax_loss.plot(xs, smooth, lw=1.5, label=f"train loss (mean of {w})")
    for k in eval_keys:
        if k.endswith("loss"):  # counts (examples, tokens) and perplexity have other scales
            ex, ey = series(evals, lambda r, k=k: r["eval"].get(k))
            ax_loss.plot(ex, ey, "o-", label=_label(k))
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    if acc_keys:
        for k in acc_keys:
            ex, ey = series(evals, lambda r, k=k: r["eval"].get(k))
            axes[1].plot(ex, ey, "o-", label=_label(k))
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("accuracy")
        axes[1].legend(fontsize=8)
        axes[1].grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    out = run_dir / PLOT
    atomic_write_bytes(out, buf.getvalue())
    return PlotResult(out, f"wrote {out}")
