"""The benchmark's plots: dev accuracy and training loss against wall time, peak-memory bars."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.report import TRAIN_LABELS


def _smooth(values: Sequence[float], width: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= width:
            acc -= values[i - width]
        out.append(acc / min(i + 1, width))
    return out


def plots(res: dict[str, Any], out: Path) -> list[str]:
    """accuracy.png, loss.png, memory.png in ``out``; returns the file names written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    import io

    written = []
    train = {k: v for k, v in (res.get("train") or {}).items() if v}

    def save(fig: Any, name: str) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        from zoo_ort.io import atomic_write_bytes

        atomic_write_bytes(out / name, buf.getvalue())
        written.append(name)

    if train:
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        for key, r in train.items():
            xs = [c["train_s"] for c in r["curve"]]
            ax.plot(
                xs, [100 * c["dev_acc"] for c in r["curve"]], marker="o", label=TRAIN_LABELS[key]
            )
        ax.set_xlabel("training time, s (evaluation excluded)")
        ax.set_ylabel(f"dev accuracy, % (first {res['plan']['dev_rows']} rows)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("SST-2 dev accuracy vs wall-clock training time")
        fig.tight_layout()
        save(fig, "accuracy.png")

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for key, r in train.items():
            times, total = [], 0.0
            for t in r["step_times_s"]:
                total += t
                times.append(total)
            width = max(1, len(times) // 20)
            a1.plot(times, _smooth(r["train_loss"], width), label=TRAIN_LABELS[key])
            a2.plot(
                [c["train_s"] for c in r["curve"]],
                [c["dev_loss"] for c in r["curve"]],
                marker="o",
                label=TRAIN_LABELS[key],
            )
        a1.set_title("training loss (moving average)")
        a2.set_title("dev loss (candidate cross-entropy)")
        for a in (a1, a2):
            a.set_xlabel("training time, s")
            a.grid(alpha=0.3)
        a2.legend(fontsize=7)
        fig.tight_layout()
        save(fig, "loss.png")

    bars: list[tuple[str, float, str]] = []
    for key, r in train.items():
        if r.get("phase_peak_rss_mb"):
            bars.append((TRAIN_LABELS[key] + ": training", r["phase_peak_rss_mb"], "C0"))
    for precision, r in (res.get("forward") or {}).items():
        if r and r.get("phase_peak_rss_mb"):
            label = "PyTorch eager" if precision == "torch" else f"zoo-ort {precision} base"
            bars.append((f"{label}: inference", r["phase_peak_rss_mb"], "C2"))
    if bars:
        fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(bars) + 1.2))
        names = [b[0] for b in bars]
        ax.barh(range(len(bars)), [b[1] for b in bars], color=[b[2] for b in bars])
        ax.set_yticks(range(len(bars)), names, fontsize=8)
        ax.invert_yaxis()
        for i, b in enumerate(bars):
            ax.text(b[1], i, f" {b[1]:.0f}", va="center", fontsize=8)
        ax.set_xlabel("peak RSS, MiB (training or inference phase, model included)")
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        save(fig, "memory.png")
    return written
