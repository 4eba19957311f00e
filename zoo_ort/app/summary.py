"""What a finished (or stopped) training call tells the user: run folder, before/after, files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zoo_ort.loop.metrics import plot
from zoo_ort.loop.train import BEST_DIR, FINAL_DIR, TrainResult
from zoo_ort.settings import HOLDOUT_PREFIX, Settings


def summary_lines(
    s: Settings, result: TrainResult, run_dir: Path, evals: list[dict[str, Any]], wall_s: float
) -> list[str]:
    """``evals``: the run's evaluations, ``{"step", **metrics}`` in order."""
    lines = [f"run folder: {run_dir}"]
    if result.already_finished:
        lines.append(
            f"this run already finished ({result.step} steps); nothing was changed. "
            "Train longer in a new --out, or with more --steps from its config."
        )
    elif result.timed_out:
        lines.append(
            f"time limit ({s.time_limit}) reached at step {result.step} of {s.steps}: final "
            "evaluation, adapters and a checkpoint written; --resume continues the run"
        )
    elif result.stopped:
        lines.append(f"stopped at step {result.step}; continue with the same command and --resume")
    metric = s.best[0]
    if evals:
        first, last = evals[0], evals[-1]
        # With --holdout, best/ is picked on the held-back rows; the dev split is still shown.
        shown = [metric.removeprefix(HOLDOUT_PREFIX), metric] if s.holdout else [metric]
        for name in shown:
            if name not in first or name not in last:
                continue
            best = (
                f"; best {result.best_metric:.4f} at step {result.best_step}"
                if name == metric and result.best_metric is not None
                else ""
            )
            where = "held-back" if name.startswith(HOLDOUT_PREFIX) else "dev"
            lines.append(
                f"{where} {name.removeprefix(HOLDOUT_PREFIX)}: before {first[name]:.4f} (step "
                f"{first['step']}) -> after {last[name]:.4f} (step {last['step']}){best}"
            )
    if not result.stopped:
        lines.append(
            f"adapters (PEFT + .onnx_adapter): {run_dir / FINAL_DIR}, {run_dir / BEST_DIR}"
        )
    plotted = plot(run_dir, plot_title(s)) if not result.already_finished else None
    where: Any = plotted.path if plotted and plotted.path else (plotted.message if plotted else "")
    lines.append(f"metrics: {run_dir / 'metrics.jsonl'}" + (f"; plot: {where}" if where else ""))
    lines.append(f"wall time this call: {wall_s:.0f} s")
    return lines


def plot_title(s: Settings) -> str:
    model = Path(s.bundle or "bundle").name
    return (
        f"{model} on {s.task} ({Path(str(s.data)).name}): {s.estimator}, loss {s.loss}, "
        f"q={s.queries} B={s.batch_size} lr {s.lr} ({s.schedule}) eps {s.eps}, seed {s.seed}"
    )
