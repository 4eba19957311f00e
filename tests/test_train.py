"""The training loop on the numpy engine: convergence, resume bit-identity, kill -9, errors."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from numpy_engine import NumpyEngine, accuracy, batches_fn, lora_tensors, split_fa

from zoo_ort.engine.protocol import LabeledBatch
from zoo_ort.errors import ZooError
from zoo_ort.io import load_tensors, save_tensors
from zoo_ort.loop.checkpoint import load_latest
from zoo_ort.loop.metrics import plot, read_metrics
from zoo_ort.loop.train import train
from zoo_ort.settings import Settings, resolve_settings, settings

TESTS = Path(__file__).resolve().parent
TIMING = {"rows_per_s", "step_time", "steps_per_s", "eval_s"}


def _config(**kw) -> Settings:
    base = dict(
        steps=30,
        lr=0.05,
        eps=1e-2,
        queries=3,
        batch_size=4,
        optimizer="adam",
        schedule="cosine",
        warmup=3,
        weight_decay=0.01,
        seed=3,
        loss="candidates",
        save_every=4,
        eval_every=5,
        best_metric="accuracy",
        eval_at_start=False,
    )
    return settings(**(base | kw))


def _save_adapter(params, frozen, path: Path) -> None:
    save_tensors(path / "adapter.safetensors", params)


def _run(run_dir, config, *, engine=None, poison=frozenset(), **kw):
    engine = engine or NumpyEngine("softmax")
    params, frozen = split_fa(lora_tensors())
    return train(
        engine,
        params,
        frozen,
        batches_fn(seed=5, size=config.batch_size, poison_steps=poison),
        config,
        run_dir,
        evaluate=lambda lora: accuracy(engine, lora),
        **({"save_adapter": _save_adapter} | kw),
    )


def _stop_after(n):
    calls = iter(range(10**9))
    return lambda: next(calls) >= n


def _log(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run_dir)]


def _assert_same_run(a_dir, a, b_dir, b):
    assert a.step == b.step
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])  # bit-identical
    assert a.best_step == b.best_step and a.best_metric == b.best_metric
    for k in a.best_params or {}:
        np.testing.assert_array_equal(a.best_params[k], b.best_params[k])
    assert a.non_finite == b.non_finite and a.final_eval == b.final_eval
    assert _log(a_dir) == _log(b_dir)
    for sub in ("final", "best"):
        fa, fb = (load_tensors(d / sub / "adapter.safetensors") for d in (a_dir, b_dir))
        for k in fa:
            np.testing.assert_array_equal(fa[k], fb[k])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_loss_goes_down_on_quadratic(tmp_path, optimizer):
    rng = np.random.default_rng(0)
    params = {"l0.B": np.zeros((2, 8), np.float32), "l1.B": np.zeros((2, 8), np.float32)}
    targets = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    frozen = {"l0.A": np.zeros((6, 2), np.float32), "l1.A": np.zeros((6, 2), np.float32)}
    engine = NumpyEngine("quadratic", targets=targets)
    lr = 0.02 if optimizer == "sgd" else 0.05
    cfg = settings(
        steps=150,
        lr=lr,
        eps=1e-3,
        queries=4,
        batch_size=2,
        optimizer=optimizer,
        loss="lm",
        save_every=0,
    )
    res = train(engine, params, frozen, batches_fn(size=2), cfg, tmp_path)
    losses = [r["loss"] for r in res.history]
    assert np.mean(losses[-10:]) < 0.05 * np.mean(losses[:5])
    dist0 = sum(float(((targets[k]) ** 2).sum()) for k in params)
    dist = sum(float(((res.params[k] - targets[k]) ** 2).sum()) for k in params)
    assert dist < 0.05 * dist0


@pytest.mark.parametrize("loss", ["candidates", "lm"])
def test_softmax_model_learns(tmp_path, loss):
    engine = NumpyEngine("softmax")
    before = accuracy(engine, lora_tensors())
    res = _run(tmp_path, _config(steps=150, loss=loss, eval_every=0, lr=0.03), engine=engine)
    assert res.final_eval["loss"] < before["loss"] - 0.1
    assert res.final_eval["accuracy"] > before["accuracy"] + 0.1
    assert res.best_step == 150  # only the final evaluation


def test_batched_and_sequential_train_identically(tmp_path):
    a = _run(tmp_path / "a", _config(estimator="batched"))
    b = _run(tmp_path / "b", _config(estimator="sequential"))
    c = _run(tmp_path / "c", _config(estimator="batched", row_budget=5))
    for other in (b, c):
        for k in a.params:
            np.testing.assert_array_equal(a.params[k], other.params[k])


def test_callbacks_adapters_and_metrics(tmp_path):
    steps, seen_eval, frozen_seen = [], [], []
    engine = NumpyEngine("softmax")

    def evaluate(lora):
        frozen_seen.append(sorted(lora))
        out = accuracy(engine, lora)
        seen_eval.append(out)
        return out

    params, frozen = split_fa(lora_tensors())
    res = train(
        engine,
        params,
        frozen,
        batches_fn(seed=5),
        _config(eval_at_start=True),
        tmp_path,
        evaluate=evaluate,
        save_adapter=_save_adapter,
        on_step=steps.append,
    )
    assert steps[0]["kind"] == "eval" and steps[0]["step"] == 0 and "accuracy" in steps[0]["eval"]
    steps = steps[1:]
    assert [s["step"] for s in steps] == list(range(1, 31))
    assert all(s["kind"] == "step" for s in steps)
    assert all(s["steps_per_s"] > 0 and "lr" in s and len(s["g"]) == 3 for s in steps)
    assert [s["step"] for s in steps if "eval" in s] == [5, 10, 15, 20, 25, 30]
    assert steps[-1]["eval"] == res.final_eval
    assert len(seen_eval) == 7  # start, every 5 steps, final at 30
    assert frozen_seen[0] == ["l0.A", "l0.B", "l1.A", "l1.B"]
    assert steps[0]["lr"] == pytest.approx(0.05 / 4)  # warm-up ramp
    final = load_tensors(tmp_path / "final" / "adapter.safetensors")
    best = load_tensors(tmp_path / "best" / "adapter.safetensors")
    for k in res.params:
        np.testing.assert_array_equal(final[k], res.params[k])
        np.testing.assert_array_equal(best[k], res.best_params[k])
    evals = [r for r in read_metrics(tmp_path) if "eval" in r]
    assert [r["step"] for r in evals] == [0, 5, 10, 15, 20, 25, 30]
    accs = [r["eval"]["accuracy"] for r in evals]
    assert res.best_metric == max(accs) and res.best_step == evals[accs.index(max(accs))]["step"]
    if importlib.util.find_spec("matplotlib") is not None:  # the optional plot extra
        out = plot(tmp_path)
        assert out.path is not None and out.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("stops", [[0], [1], [4], [7], [13, 6], [29], [3, 0, 3, 3]])
def test_resume_after_stop_is_bit_identical(tmp_path, stops):
    cfg = _config(eval_at_start=True)
    ref = _run(tmp_path / "ref", cfg)
    run = tmp_path / "run"
    done = 0
    for j, n in enumerate(stops):
        res = _run(run, cfg, resume=j > 0, should_stop=_stop_after(n))
        done += n
        assert res.stopped and res.step == done
        assert load_latest(run).step == done
    res = _run(run, cfg, resume=True)
    assert not res.stopped
    _assert_same_run(tmp_path / "ref", ref, run, res)


@pytest.mark.parametrize("crash_at", [2, 9, 17, 30])
def test_resume_after_crash_is_bit_identical(tmp_path, crash_at):
    """An exception (like a crash) after step `crash_at`: the steps since the last checkpoint
    are redone, the log's extra lines are dropped, and everything ends bit-identical."""
    cfg = _config(optimizer="sgd", momentum=0.9, schedule="linear")
    ref = _run(tmp_path / "ref", cfg)

    def crash(record):
        if record["step"] == crash_at:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        _run(tmp_path / "run", cfg, on_step=crash)
    res = _run(tmp_path / "run", cfg, resume=True)
    _assert_same_run(tmp_path / "ref", ref, tmp_path / "run", res)
    again = _run(tmp_path / "run", cfg, resume=True)  # a finished run resumes to itself
    assert again.step == 30 and not again.history
    for k in res.params:
        np.testing.assert_array_equal(again.params[k], res.params[k])


KILL_STEPS = 120


def child_main(run_dir: str) -> None:
    """Entry point of the subprocess that the kill -9 test kills mid-run."""
    cfg = _config(steps=KILL_STEPS, save_every=3)
    _run(Path(run_dir), cfg, engine=NumpyEngine("softmax", delay=0.02), resume=True)


def test_kill_9_mid_run_then_resume_is_bit_identical(tmp_path):
    run = tmp_path / "run"
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_train; "
        f"test_train.child_main({str(run)!r})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            ck = run / "checkpoints" / "latest.json"
            if ck.exists() and len(read_metrics(run)) > 20:
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    killed_at = load_latest(run).step
    assert 0 < killed_at < KILL_STEPS
    cfg = _config(steps=KILL_STEPS, save_every=3)
    res = _run(run, cfg, resume=True)
    ref = _run(tmp_path / "ref", cfg)
    _assert_same_run(tmp_path / "ref", ref, run, res)


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    cfg = _config(eval_every=0, save_every=0)
    res = _run(tmp_path / "all", cfg, poison=frozenset({3, 8}))
    assert res.non_finite == 2
    skipped = [r["step"] for r in res.history if r["skipped"]]
    assert skipped == [4, 9]
    assert all(np.isfinite(v).all() for v in res.params.values())
    # the poisoned step (index 3) leaves params unchanged: stopping before and after it agree
    p3 = _run(tmp_path / "p3", cfg, poison=frozenset({3, 8}), should_stop=_stop_after(3)).params
    p4 = _run(tmp_path / "p4", cfg, poison=frozenset({3, 8}), should_stop=_stop_after(4)).params
    p5 = _run(tmp_path / "p5", cfg, poison=frozenset({3, 8}), should_stop=_stop_after(5)).params
    for k in p3:
        np.testing.assert_array_equal(p3[k], p4[k])
        assert not np.array_equal(p4[k], p5[k])


def test_too_many_non_finite_steps_abort_with_good_checkpoint(tmp_path):
    cfg = _config(max_non_finite=1, save_every=2, eval_every=0)
    with pytest.raises(ZooError, match="non-finite"):
        _run(tmp_path, cfg, poison=frozenset({5, 6}))
    ck = load_latest(tmp_path)
    assert ck.step == 6 and ck.info["non_finite"] == 1
    assert all(np.isfinite(v).all() for v in ck.params.values())


def test_resume_refuses_other_settings(tmp_path):
    _run(tmp_path, _config(), should_stop=_stop_after(5))
    with pytest.raises(ZooError, match="lr: 0.05 -> 0.1"):
        _run(tmp_path, _config(lr=0.1), resume=True)
    with pytest.raises(ZooError, match="seed"):
        _run(tmp_path, _config(seed=4), resume=True)
    with pytest.raises(ZooError, match="already holds a run"):
        _run(tmp_path, _config())
    engine = NumpyEngine("softmax")
    params, frozen = split_fa(lora_tensors(seed=9))
    with pytest.raises(ZooError, match="another bundle"):
        train(engine, params, frozen, batches_fn(seed=5), _config(), tmp_path, resume=True)
    params, frozen = split_fa(lora_tensors())
    with pytest.raises(ZooError, match="another model/task"):
        train(
            engine,
            params,
            frozen,
            batches_fn(seed=5),
            _config(),
            tmp_path,
            resume=True,
            fingerprint={"task": "rte"},
        )
    # settings that do not change the trajectory may change
    res = _run(tmp_path, _config(save_every=7, keep_checkpoints=3), resume=True)
    assert res.step == 30


def test_candidates_loss_on_unlabelled_data(tmp_path):
    engine = NumpyEngine("softmax")
    params, frozen = split_fa(lora_tensors())
    fn = batches_fn()
    with pytest.raises(ZooError, match="candidates"):
        train(
            engine,
            params,
            frozen,
            lambda s: LabeledBatch(fn(s).tokens, None),
            _config(loss="candidates"),
            tmp_path,
        )


def _from_dict(d):
    return resolve_settings([("test", d)]).settings


def test_config_from_dict():
    cfg = _from_dict({"steps": 10, "lr": 1, "betas": [0.8, 0.9], "row_budget": None})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.betas == (0.8, 0.9)
    assert _from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ZooError, match="unknown setting"):
        _from_dict({"stepz": 10})
    with pytest.raises(ZooError):
        _from_dict({"steps": "10"})
    with pytest.raises(ZooError):
        _from_dict({"steps": 1.5})
    with pytest.raises(ZooError, match="estimator"):
        _from_dict({"estimator": "parallel"})
    with pytest.raises(ZooError):
        _from_dict({"eps": 0})


def test_metrics_log_survives_torn_line_and_plot_without_matplotlib(tmp_path, monkeypatch):
    from zoo_ort.loop.metrics import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"step": 1, "loss": np.float32(2.0), "g": np.array([1.0, float("nan")])})
    log.append({"step": 2, "loss": 1.5})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # killed mid-line
    assert read_metrics(tmp_path) == [
        {"step": 1, "loss": 2.0, "g": [1.0, "nan"]},
        {"step": 2, "loss": 1.5},
    ]
    log.truncate_after(1)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    out = plot(tmp_path)
    assert out.path is None and "matplotlib" in out.message
    assert not (tmp_path / "plot.png").exists()


def test_time_limit_ends_with_eval_adapters_and_a_resumable_checkpoint(tmp_path, monkeypatch):
    """A fake clock (1 s per reading) makes the budget deterministic; no wall time is asserted.
    Each step reads the clock twice (1 s of training); evaluations' readings are not counted."""
    import zoo_ort.loop.train as loop

    ticks = iter(range(10**6))
    monkeypatch.setattr(loop.time, "perf_counter", lambda: float(next(ticks)))
    saved: list[Path] = []
    cfg = _config(steps=30, time_limit="9s", eval_every=0)
    part = _run(tmp_path / "part", cfg, save_adapter=lambda p, f, d: saved.append(d))
    assert part.timed_out and not part.stopped and part.step == 9
    assert part.final_eval is not None and {d.name for d in saved} == {"final", "best"}
    assert load_latest(tmp_path / "part").step == part.step
    monkeypatch.undo()
    rest = _run(tmp_path / "part", _config(steps=30, eval_every=0), resume=True)
    whole = _run(tmp_path / "whole", _config(steps=30, eval_every=0))
    assert rest.step == whole.step == 30 and not rest.timed_out
    for k in whole.params:
        np.testing.assert_array_equal(rest.params[k], whole.params[k])
