"""`python -m benchmarks.run --quick` end to end on a tiny random model (about a minute).

No assertion is about time: the run must finish, write its files and tables, feed every side
the same tokens, and its ratio logic must be right on hand-made curves.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not an installed package
    sys.path.insert(0, str(REPO_ROOT))

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from benchmarks import report as bench_report  # noqa: E402
from benchmarks import run as bench_run  # noqa: E402
from benchmarks import zoo_bench  # noqa: E402

DATA = REPO_ROOT.parent / "shared" / "data" / "sst2"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data/sst2")


def test_zoo_side_uses_the_baselines_prompt_and_batches():
    from benchmarks import torch_baselines as tb
    from zoo_ort.tasks import balanced_batch_indices, batch_indices, build_task

    task = build_task(zoo_bench.run_settings("bundle").task)
    assert task.template == tb.TEMPLATE
    assert tuple(task.verbalizer.values()) == tb.CANDIDATES
    assert tuple(zoo_bench.TARGETS) == tuple(tb.DEFAULT_TARGETS)
    data = tb.PromptData(
        train_ids=[np.arange(3)] * 50,
        train_labels=np.zeros(50, np.int64),
        dev_ids=[],
        dev_labels=np.zeros(0, np.int64),
        candidate_ids=(1, 2),
        pad_id=0,
    )
    for step in (0, 1, 7):
        got = batch_indices(50, 16, 3, step)  # the order of zoo-ort's Prepared.batches()
        assert np.array_equal(got, data.train_indices(3, step, 16))
    # --sampler balanced: the same rows as zoo-ort's balanced batches
    labels = np.arange(50) % 3 == 0
    balanced = dataclasses.replace(data, train_labels=labels.astype(np.int64), sampler="balanced")
    for step in (0, 5):
        got = balanced_batch_indices(labels.astype(np.int64), 16, 3, step)
        assert np.array_equal(got, balanced.train_indices(3, step, 16))
        assert np.bincount(labels[got].astype(int)).tolist() == [8, 8]


def test_time_to_reach_and_headline_ratios():
    curve = [
        {"step": 0, "train_s": 0.0, "dev_acc": 0.5},
        {"step": 10, "train_s": 30.0, "dev_acc": 0.6},
        {"step": 20, "train_s": 60.0, "dev_acc": 0.7},
    ]
    assert bench_report.time_to_reach(curve, 0.6) == 30.0
    assert bench_report.time_to_reach(curve, 0.65) == 60.0
    assert bench_report.time_to_reach(curve, 0.8) is None

    def trainer(step_s, train_curve, rss):
        return {
            "median_step_s": step_s,
            "curve": train_curve,
            "phase_peak_rss_mb": rss,
            "rows_per_step": 32,
            "rows_per_s": 32 / step_s,
        }

    fast = [dict(c, train_s=c["train_s"] / 4) for c in curve]
    res = {
        "train": {
            "mezo_torch": trainer(3.0, curve, 1000.0),
            "zoo_fp32": trainer(1.0, fast, 600.0),
            "first_order_torch": trainer(3.0, curve, 1500.0),
        },
        "forward": {"fp32": {"phase_peak_rss_mb": 550.0}},
        "overhead": {
            "fp32": {
                "median_step_s": 1.02,
                "median_ort_s": 1.0,
                "overhead": 0.02,
                "median_paired_overhead": 0.05,
                "median_own_s": 0.025,
                "own_overhead": 0.025,
            }
        },
    }
    rows = {r["measure"]: r for r in bench_report.headline(res)}
    speed = rows["steps/s vs MeZO-torch (fp32 base)"]
    assert speed["ratio"] == "3.00x" and speed["met"] == "yes"
    reach = next(r for m, r in rows.items() if m.startswith("time to MeZO-torch's best"))
    assert reach["ratio"] == "4.00x" and reach["met"] == "yes"
    rss = rows["peak RSS, training / inference on the same rows (fp32)"]
    assert rss["ratio"] == "1.09x" and rss["met"] == "yes"
    fo = rows["peak RSS while training vs first-order torch (fp32)"]
    assert fo["ratio"] == "0.40x" and fo["met"] == "yes"
    own = next(r for m, r in rows.items() if m.startswith("trainer's own work per step"))
    assert own["zoo-ort"] == "25.0 ms" and own["ratio"] == "+2.5%" and own["met"] == "yes"
    paired = next(r for m, r in rows.items() if m.startswith("trainer step vs bare ORT forward"))
    assert paired["ratio"] == "+5.0%" and paired["target"] == "(context)"


def _zo_run(curve, g, step_times, every=0, every_s=None):
    """A ZO trainer's result as the benchmark records it, walking zoo-ort's directions."""
    return {
        "curve": curve,
        "config": {"directions": "zoo", "eval_every": every, "eval_every_s": every_s},
        "projected_grads": g,
        "step_times_s": step_times,
        "median_step_s": sum(step_times) / len(step_times),
    }


def test_time_to_mezo_best_step_on_the_shared_trajectory():
    mezo_curve = [
        {"step": 0, "train_s": 0.0, "dev_acc": 0.5},
        {"step": 2, "train_s": 6.0, "dev_acc": 0.8},
        {"step": 4, "train_s": 12.0, "dev_acc": 0.7},
    ]
    zoo_curve = [
        {"step": 0, "train_s": 0.0, "dev_acc": 0.5},
        {"step": 3, "train_s": 3.0, "dev_acc": 0.7},
    ]
    g = [[0.5], [-1.0], [2.0], [0.1]]
    mezo = _zo_run(mezo_curve, g, [3.0] * 4, every_s=6.0)
    zoo = _zo_run(zoo_curve, [[x[0] * (1 + 1e-6)] for x in g][:3], [1.0] * 3, every_s=3.0)
    res = {"train": {"mezo_torch": mezo, "zoo_fp32": zoo}}
    best = bench_report._best(mezo_curve)
    row = bench_report._same_step_row(res, best)
    # MeZO's best was its step 2, at 6 s; zoo-ort finished step 2 after 2 s.
    assert row["zoo-ort"] == "2 s" and row["reference"] == "6 s" and row["ratio"] == "3.00x"
    assert "(2, 80.0%)" in row["measure"] and row["target"] == "(context)"
    # Other directions (g uncorrelated) are not the same trajectory: no such reading.
    res["train"]["zoo_fp32"]["projected_grads"] = [[1.0], [1.0], [-1.0]]
    assert bench_report._same_step_row(res, best) is None
    res["train"]["zoo_fp32"]["projected_grads"] = [[x[0]] for x in g][:3]
    res["train"]["mezo_torch"]["config"]["directions"] = "torch"
    assert bench_report._same_step_row(res, best) is None


def test_step_grid_reads_time_to_accuracy_at_equal_steps():
    g = [[0.5], [-1.0], [2.0], [0.1]]
    grid = [0, 2, 4]
    accs = (0.5, 0.8, 0.7)  # the same trajectory, so the same accuracy at each step

    def curve(step_s):
        return [
            {"step": s, "train_s": step_s * s, "dev_acc": a}
            for s, a in zip(grid, accs, strict=True)
        ]

    mezo = _zo_run(curve(3.0), g, [3.0] * 4, every=2)
    zoo = _zo_run(curve(1.5), g, [1.5] * 4, every=2)
    assert bench_report.step_grid(mezo, zoo) == 2
    res = {"train": {"mezo_torch": mezo, "zoo_fp32": zoo}}
    rows = {r["measure"]: r for r in bench_report.headline(res)}
    reach = rows["time to MeZO-torch's best dev acc 80.0% (fp32 base; both scored every 2 steps)"]
    assert reach["zoo-ort"] == "3 s" and reach["reference"] == "6 s" and reach["ratio"] == "2.00x"
    # The same point of the trajectory, read from the step times.
    shared = next(r for m, r in rows.items() if "shared trajectory" in m)
    assert shared["zoo-ort"] == "3 s" and shared["ratio"] == "2.00x"
    # One borderline dev row scored apart at step 2 moves the threshold, not the shared reading.
    zoo["curve"][1]["dev_acc"] = 0.79
    rows = {r["measure"]: r for r in bench_report.headline(res)}
    reach = next(r for m, r in rows.items() if m.startswith("time to MeZO-torch's best"))
    assert reach["zoo-ort"] == "not reached"
    shared = next(r for m, r in rows.items() if "shared trajectory" in m)
    assert shared["ratio"] == "2.00x"
    res["plan"] = {"dev_rows": 100}
    alike = bench_report.same_directions(res)
    assert (alike["scored_steps"], alike["scored_equal"], alike["max_diff_dev_rows"]) == (3, 2, 1)
    zoo["curve"][1]["dev_acc"] = 0.8
    # Any other grid (another K, or a time grid on either side) is not a common step grid.
    zoo["config"]["eval_every"] = 3
    assert bench_report.step_grid(mezo, zoo) is None
    zoo["config"].update(eval_every=2, eval_every_s=60.0)
    assert bench_report.step_grid(mezo, zoo) is None
    assert bench_report.step_grid(mezo, None) is None
    rows = {r["measure"]: r for r in bench_report.headline(res)}
    assert any("shared trajectory" in m for m in rows)


def test_quick_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "results"
    # A training budget (1 s of training clock each) exercises the full mode's path: stop on
    # the clock, dev evaluations on a grid of training seconds.
    argv = ["--quick", "--budget", "1", "--out", str(out), "--cache", str(tmp_path / "cache")]
    rc = bench_run.main(argv)
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert rc == 0, res.get("errors")
    assert not res["errors"]
    plots = ("accuracy.png", "loss.png", "memory.png")
    if importlib.util.find_spec("matplotlib") is None:  # the optional plot extra
        plots = ()
    for name in ("results.md", *plots):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    if plots:
        assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    md = (out / "results.md").read_text()
    # The report re-renders from the JSON alone, to the same text.
    again = tmp_path / "again"
    assert bench_run.main(["--report-from", str(out / "results.json"), "--out", str(again)]) == 0
    assert (again / "results.md").read_text() == md
    assert bench_run.main(["--report-from", str(tmp_path / "missing.json")]) == 2
    for title in (
        "## Targets (ratios from this run)",
        "## Training under the same wall-clock budget",
        "## P-RGE: one forward of 2qB rows vs 2q forwards of B rows",
        "## Base precision",
        "## Trainer overhead",
    ):
        assert title in md and title in printed, title
    assert "Machine: " in md and "onnxruntime" in md
    assert "token hashes match" in md

    # Every side saw the same tokens; every contender ran with all cores and produced a curve.
    assert res["same_data"] is True
    train = res["train"]
    assert set(train) >= {"mezo_torch", "zoo_fp32", "zoo_int8", "first_order_torch"}
    for key, r in train.items():
        assert r["stopped"] == "time_budget" and r["train_s"] >= 1.0, key
        assert r["threads"] == res["plan"]["threads"], key
        curve = r["curve"]
        assert curve[0]["step"] == 0 and curve[-1]["step"] == r["steps_done"], key
        steps = [c["step"] for c in curve]
        assert len(steps) >= 2 and steps == sorted(set(steps)), key
        # Grid points are where the training clock first passed 0.5 s, 1.0 s, ...
        for c in curve[1:-1]:
            assert c["train_s"] >= 0.5, key
        assert all(0.0 <= c["dev_acc"] <= 1.0 for c in curve), key
        assert len(r["step_times_s"]) == len(r["train_loss"]) == r["steps_done"], key
        assert r["phase_peak_rss_mb"] > 0 and r["median_step_s"] > 0, key
    assert res["train"]["zoo_fp32"]["rows_per_step"] == 2 * res["plan"]["q"] * res["plan"]["B"]

    # MeZO-torch walked zoo-ort's directions on the same rows: from the same θ the two
    # independent implementations (PyTorch eager, the ORT graph) give the same g, and later
    # steps stay on the same trajectory.
    assert train["mezo_torch"]["config"]["directions"] == "zoo"
    d = res["same_directions"]
    assert d["steps"] >= 2 and d["first_step_rel_diff"] < 1e-3 and d["corr"] > 0.99
    assert "both walk the same z" in md

    # Batched and sequential P-RGE fed the engine the same rows: same projected gradients.
    prge = res["prge"]["rows"]
    assert [r["q"] for r in prge] == [1, 4, 8]
    assert all(r["g_max_abs_diff"] < 1e-3 for r in prge)
    assert all(r["forwards_sequential"] == 2 * r["q"] for r in prge)
    # The quantized bundles really are quantized and were timed.
    assert res["bundles"]["bundles"].keys() >= {"fp32", "int8"}
    for precision in res["bundles"]["bundles"]:
        fwd = res["forward"][precision]
        assert fwd["precision"] == precision
        # The inference-memory reference ran the training's first steps and the dev scoring,
        # and its peak covers the single batch it timed.
        assert fwd["config"]["rss_steps"] == res["plan"]["rss_steps"]
        assert fwd["phase_peak_rss_mb"] >= fwd["step0_peak_rss_mb"] > 0
        assert fwd["zero_shot"]["dev_rows"] == res["plan"]["dev_rows"]
        ovh = res["overhead"][precision]
        assert ovh["median_ort_s"] > 0
        # The step's own ORT runs are part of the step: its own work is what is left.
        in_ort, steps = ovh["in_step_ort_times_s"], ovh["step_times_s"]
        assert all(0 < o < t for o, t in zip(in_ort, steps, strict=True))
        assert 0 < ovh["median_own_s"] < ovh["median_step_s"]
    # Every base was scored on the same steps as fp32: fp32 against itself is exact (the
    # forwards are deterministic); int8 weights follow fp32's g (misaligned rows or directions
    # would leave no correlation).
    signal = {r["base"]: r for r in res["quant_signal"]["rows"]}
    assert set(signal) >= {"fp32", "int8", "int8-dynamic", "int8-dynamic-keep-down"}
    assert signal["fp32"]["g_rel_err_vs_fp32"] == 0.0 and signal["fp32"]["max_loss_change"] == 0.0
    assert signal["int8"]["g_corr_vs_fp32"] > 0.5
    plan = res["plan"]
    assert res["quant_signal"]["g_values"] == plan["prge_q"][-1] * plan["signal_steps"]
    measures = [r["measure"] for r in res["ratios"]]
    assert any(m.startswith("steps/s vs MeZO-torch (fp32") for m in measures)
    assert any(m.startswith("trainer step vs bare ORT forward") for m in measures)
    assert any(m.startswith("trainer's own work per step") for m in measures)
