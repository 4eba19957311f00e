"""``--holdout H``: the last H training rows are held back, never trained on, and pick ``best/``;
the dev split is still scored and reported, but no longer chooses anything."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from numpy_engine import NumpyEngine, accuracy, batches_fn, lora_tensors, split_fa
from test_cli import TRAIN, assert_clean_error, same_tensors, zoo

from zoo_ort.app.wiring import prepare, resolve
from zoo_ort.bundle import load_bundle
from zoo_ort.errors import ZooError
from zoo_ort.loop.metrics import read_metrics
from zoo_ort.loop.train import train
from zoo_ort.settings import settings
from zoo_ort.tasks.dataset import load_task_data
from zoo_ort.tasks.encode import TextEncoder
from zoo_ort.tasks.files import resolve_data, split_file
from zoo_ort.tasks.spec import build_task

HELD = 40


def _rows(data) -> list[list[int]]:
    return [data.example(i).tolist() for i in range(len(data))]


def test_split_tail_keeps_every_row_in_order(tiny_bundle: Path):
    encoder = TextEncoder.from_bundle(load_bundle(tiny_bundle))
    whole = load_task_data("sentiment", "train", build_task("sst2"), encoder)
    head, tail = whole.split_tail(HELD)
    assert (len(head), len(tail)) == (len(whole) - HELD, HELD)
    assert _rows(head) + _rows(tail) == _rows(whole)
    np.testing.assert_array_equal(np.concatenate([head.labels, tail.labels]), whole.labels)
    np.testing.assert_array_equal(np.concatenate([head.first, tail.first]), whole.first)
    b = tail.batch([0, HELD - 1])  # a held-back slice batches like any split
    assert b.size == 2 and b.labels.tolist() == tail.labels[[0, HELD - 1]].tolist()
    for n in (0, len(whole)):
        with pytest.raises(ZooError, match="hold back"):
            whole.split_tail(n)


def _prepared(bundle: Path, out: Path, **flags):
    return prepare(resolve(bundle, {"data": "sentiment", "out": str(out), **flags}).settings)


def test_prepare_holds_back_the_tail_and_scores_it_like_a_dev_split(tiny_bundle, tmp_path):
    plain = _prepared(tiny_bundle, tmp_path / "a", eval_rows=0)
    held = _prepared(tiny_bundle, tmp_path / "b", eval_rows=0, holdout=HELD)
    assert held.settings.best == ("holdout_accuracy", "max")
    assert _rows(held.train_data) == _rows(plain.train_data)[:-HELD]
    assert _rows(held.holdout_data) == _rows(plain.train_data)[-HELD:]
    assert plain.holdout_data is None
    # The held-back rows are scored as a dev split made of the same rows would be (the reference:
    # a data folder whose dev.tsv is the training file's last rows, scored without --holdout).
    lines = split_file(resolve_data("sentiment"), "train").read_text().splitlines()
    folder = tmp_path / "tail"
    folder.mkdir()
    (folder / "train.tsv").write_text("\n".join(lines[:-HELD]) + "\n")
    (folder / "dev.tsv").write_text("\n".join([lines[0], *lines[-HELD:]]) + "\n")
    flags = {"data": str(folder), "task": held.settings.task, "out": "x"}
    ref = prepare(resolve(tiny_bundle, flags).settings)
    rng = np.random.default_rng(0)
    lora = {**held.frozen, **{k: rng.normal(0, 0.5, v.shape) for k, v in held.params.items()}}
    got, dev, tail = held.evaluate(lora), plain.evaluate(lora), ref.evaluate(lora)
    assert got["holdout_examples"] == HELD == tail["examples"]
    for k in ("accuracy", "candidate_loss"):
        assert got[f"holdout_{k}"] == pytest.approx(tail[k], abs=1e-6)
        assert got[k] == dev[k]  # the dev figures do not change


def test_best_is_picked_on_the_held_back_metric_not_on_dev(tmp_path):
    """A scripted evaluation where dev and held-back rows disagree: best/ follows the latter."""
    engine = NumpyEngine("softmax")
    dev_acc = iter([0.5, 0.9, 0.6, 0.7])
    held_acc = iter([0.5, 0.6, 0.8, 0.7])

    def evaluate(lora):
        return accuracy(engine, lora) | {
            "accuracy": next(dev_acc),
            "holdout_accuracy": next(held_acc),
        }

    params, frozen = split_fa(lora_tensors())
    config = settings(steps=3, eval_every=1, batch_size=4, queries=2, lr=0.05, holdout=8)
    res = train(engine, params, frozen, batches_fn(seed=5), config, tmp_path, evaluate=evaluate)
    assert (res.best_step, res.best_metric) == (2, 0.8)
    evals = [r["eval"] for r in read_metrics(tmp_path) if "eval" in r]
    assert [e["accuracy"] for e in evals] == [0.5, 0.9, 0.6, 0.7]  # dev still logged


def test_cli_train_with_holdout(tiny_bundle: Path, tmp_path: Path):
    out = tmp_path / "run"
    res = zoo("train", tiny_bundle, *TRAIN, "--holdout", str(HELD), "--out", out)
    assert res.returncode == 0, res.stderr
    assert "held-back accuracy: before" in res.stdout and "dev accuracy: before" in res.stdout
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval" in r]
    held = [r["eval"]["holdout_accuracy"] for r in evals]
    assert all(r["eval"]["holdout_examples"] == HELD for r in evals)
    assert "holdout = 40" in (out / "config.toml").read_text()
    # best/ holds the adapter of the best held-back accuracy: the run's final adapter exactly
    # when the last evaluation is the only best one.
    if held.count(max(held)) == 1:
        same = same_tensors(*(out / d / "adapter_model.safetensors" for d in ("best", "final")))
        assert same == (held.index(max(held)) == len(held) - 1)


@pytest.mark.parametrize(
    "value,words", [("-1", ["holdout", ">= 0"]), ("400", ["holdout 400", "no training rows"])]
)
def test_cli_bad_holdout(tiny_bundle: Path, tmp_path: Path, value: str, words: list[str]):
    out = tmp_path / "run"
    res = zoo("train", tiny_bundle, *TRAIN, "--holdout", value, "--out", out)
    assert_clean_error(res, *words)
    assert not (out / "checkpoints").exists()
