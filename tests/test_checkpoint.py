"""Checkpoint files: exact round trip, atomic pointer, pruning, refusal of broken states."""

from __future__ import annotations

import json

import numpy as np
import pytest

from zoo_ort.errors import ZooError
from zoo_ort.loop.checkpoint import (
    CHECKPOINT_DIR,
    LATEST,
    Checkpoint,
    has_checkpoint,
    load_latest,
    save_checkpoint,
    tensors_digest,
)


def _ckpt(step, value=1.0):
    rng = np.random.default_rng(step)
    return Checkpoint(
        step=step,
        params={"l0.B": rng.standard_normal((2, 3)).astype(np.float32) * value},
        opt_state={"0/count": np.array([step], np.int64), "0/m/l0.B": np.ones((2, 3), np.float32)},
        best_params={"l0.B": np.full((2, 3), 0.5, np.float32)},
        info={"non_finite": 2, "best_metric": 0.75, "config": {"lr": 0.1}},
    )


def _files(run_dir):
    return sorted(p.name for p in (run_dir / CHECKPOINT_DIR).iterdir())


def test_roundtrip_is_exact(tmp_path):
    assert load_latest(tmp_path) is None and not has_checkpoint(tmp_path)
    ck = _ckpt(7)
    save_checkpoint(tmp_path, ck)
    back = load_latest(tmp_path)
    assert back.step == 7
    np.testing.assert_array_equal(back.params["l0.B"], ck.params["l0.B"])
    assert back.params["l0.B"].dtype == np.float32
    np.testing.assert_array_equal(back.opt_state["0/count"], [7])
    np.testing.assert_array_equal(back.best_params["l0.B"], ck.best_params["l0.B"])
    assert back.info["non_finite"] == 2 and back.info["best_metric"] == 0.75
    assert back.info["config"] == {"lr": 0.1}


def test_latest_pointer_and_keep_last_two(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, _ckpt(step), keep=2)
    assert _files(tmp_path) == [LATEST, "step-00000020.safetensors", "step-00000030.safetensors"]
    assert json.loads((tmp_path / CHECKPOINT_DIR / LATEST).read_text())["step"] == 30
    assert load_latest(tmp_path).step == 30


def test_leftovers_of_killed_runs_are_cleaned(tmp_path):
    save_checkpoint(tmp_path, _ckpt(10))
    folder = tmp_path / CHECKPOINT_DIR
    (folder / ".step-00000020.safetensors.abc.tmp").write_bytes(b"half")  # killed mid-write
    save_checkpoint(tmp_path, _ckpt(30))
    # a resumed run that restarts from 10 must not leave the orphan 30 around later
    (folder / LATEST).write_text(json.dumps({"file": "step-00000010.safetensors", "step": 10}))
    save_checkpoint(tmp_path, _ckpt(20))
    assert _files(tmp_path) == [LATEST, "step-00000010.safetensors", "step-00000020.safetensors"]


def test_non_finite_state_never_replaces_good_checkpoint(tmp_path):
    save_checkpoint(tmp_path, _ckpt(10))
    bad = _ckpt(20, value=np.nan)
    with pytest.raises(ZooError, match="not finite"):
        save_checkpoint(tmp_path, bad)
    assert load_latest(tmp_path).step == 10
    assert _files(tmp_path) == [LATEST, "step-00000010.safetensors"]


def test_malformed_pointer(tmp_path):
    save_checkpoint(tmp_path, _ckpt(10))
    (tmp_path / CHECKPOINT_DIR / LATEST).write_text('{"file": "../../etc/passwd"}')
    with pytest.raises(ZooError, match="malformed"):
        load_latest(tmp_path)
    (tmp_path / CHECKPOINT_DIR / LATEST).write_text("{not json")
    with pytest.raises(ZooError):
        load_latest(tmp_path)


def test_corrupt_checkpoint_file_is_a_zoo_error(tmp_path):
    path = save_checkpoint(tmp_path, _ckpt(10))
    path.write_bytes(b"\x00" * 10)
    with pytest.raises(ZooError):
        load_latest(tmp_path)


def test_digest_sees_values_names_and_groups():
    a = {"x": np.zeros(3, np.float32)}
    assert tensors_digest(a) == tensors_digest({"x": np.zeros(3, np.float32)})
    assert tensors_digest(a) != tensors_digest({"x": np.ones(3, np.float32)})
    assert tensors_digest(a) != tensors_digest({"y": np.zeros(3, np.float32)})
    assert tensors_digest(a, {}) != tensors_digest({}, a)
