"""The run-curve report: training and wall minutes add up the log's own timings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.curve import curve, main  # noqa: E402
from zoo_ort.loop.metrics import read_metrics  # noqa: E402


def _write(tmp_path, records):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _step(n, t, lr=0.1):
    return {"kind": "step", "step": n, "step_time": t, "lr": lr}


def test_points_at_each_evaluation(tmp_path, capsys):
    _write(
        tmp_path,
        [
            {"step": 0, "eval": {"accuracy": 0.5, "candidate_loss": 0.7}, "eval_s": 30.0},
            _step(1, 60.0),
            _step(2, 60.0, lr=0.05),
            {"step": 2, "eval": {"accuracy": 0.75, "candidate_loss": 0.5}, "eval_s": 90.0},
        ],
    )
    points = curve(read_metrics(tmp_path))
    assert [p["step"] for p in points] == [0, 2]
    assert points[1]["train min"] == pytest.approx(2.0)
    assert points[1]["wall min"] == pytest.approx(2.5)  # + the first evaluation's 30 s
    assert points[1]["lr"] == 0.05 and points[1]["dev acc"] == 0.75
    assert main([str(tmp_path), "--png", str(tmp_path / "c.png")]) == 0
    assert "| 2 | 2 | 2.5 | 0.75 |" in capsys.readouterr().out
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_old_logs_share_the_untimed_wall_time(tmp_path):
    _write(
        tmp_path,
        [
            {"step": 0, "eval": {"accuracy": 0.5}},
            _step(1, 60.0),
            {"step": 1, "eval": {"accuracy": 0.6}},
        ],
    )
    points = curve(read_metrics(tmp_path), total_wall_s=100.0)  # 40 s over two evaluations
    assert points[1]["wall min"] == pytest.approx((60 + 20) / 60)
