"""A training run's dev-accuracy curve against steps and wall time, from its metrics log.

    python -m benchmarks.curve RUN [--png RUN/curve.png]

Prints a markdown table (step, training minutes, wall minutes, dev accuracy, candidate loss)
and, with ``--png``, plots accuracy against wall minutes. Training minutes add up the steps'
``step_time``; wall minutes add the evaluations' ``eval_s`` too (logs written before ``eval_s``
existed count each evaluation as the median of the known ones, or, given ``--total-wall-s`` (the
run's whole wall time), as an equal share of what the steps do not account for, or zero).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import markdown_table
from zoo_ort.io import atomic_write_bytes
from zoo_ort.loop.metrics import read_metrics


def curve(records: list[dict[str, Any]], total_wall_s: float | None = None) -> list[dict[str, Any]]:
    """One point per evaluation: where the run stood when it was taken."""
    known = [r["eval_s"] for r in records if "eval" in r and "eval_s" in r]
    evals = sum(1 for r in records if "eval" in r)
    steps_s = sum(float(r["step_time"]) for r in records if r.get("kind") == "step")
    if known:
        eval_guess = statistics.median(known)
    elif total_wall_s and evals:
        eval_guess = max(0.0, total_wall_s - steps_s) / evals
    else:
        eval_guess = 0.0
    train_s = wall_s = 0.0
    lr = None
    points = []
    for r in records:
        if r.get("kind") == "step":
            train_s += float(r["step_time"])
            wall_s += float(r["step_time"])
            lr = r.get("lr")
        if "eval" in r and "accuracy" in r["eval"]:
            points.append(
                {
                    "step": r["step"],
                    "train min": train_s / 60,
                    "wall min": wall_s / 60,
                    "dev acc": r["eval"]["accuracy"],
                    "candidate loss": r["eval"].get("candidate_loss"),
                    "lr": lr,
                }
            )
            wall_s += float(r.get("eval_s", eval_guess))
    return points


def plot(points: list[dict[str, Any]], path: Path, title: str) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot([p["wall min"] for p in points], [100 * p["dev acc"] for p in points], "o-")
    ax.set_xlabel("wall minutes (training + evaluation)")
    ax.set_ylabel("dev accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--png", type=Path)
    ap.add_argument("--title", default="")
    ap.add_argument("--total-wall-s", type=float, help="the run's wall time, for old logs")
    args = ap.parse_args(argv)
    points = curve(read_metrics(args.run), args.total_wall_s)
    print(markdown_table(points))
    if args.png:
        plot(points, args.png, args.title or str(args.run))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
