"""The command line end to end on a tiny bundle: outputs, resume, replay, eval and bad input.

Every bad input must give one line on stderr, exit code 2 and no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from zoo_ort.io import load_tensors

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2"


def zoo(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "zoo_ort.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def same_tensors(a: Path, b: Path) -> bool:
    # Compare values bit for bit; the file bytes may differ (safetensors' metadata map order).
    ta, tb = load_tensors(a), load_tensors(b)
    return ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)


def assert_clean_error(res: subprocess.CompletedProcess, *words: str) -> None:
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


TRAIN = ["--data", "sentiment", "--steps", "4", "--eval-every", "2", "--eval-rows", "16"]
TRAIN += ["--queries", "2", "--batch-size", "4", "--lr", "0.05", "--save-every", "2"]


@pytest.fixture(scope="module")
def run_dir(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    res = zoo("train", tiny_bundle, *TRAIN, "--out", out)
    assert res.returncode == 0, res.stderr
    assert "dev accuracy: before" in res.stdout
    return out


def test_train_writes_adapters_metrics_plot_and_config(run_dir: Path):
    for sub in ("final", "best"):
        assert (run_dir / sub / "adapter_model.safetensors").is_file()
        cfg = json.loads((run_dir / sub / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
        assert (run_dir / sub / "adapter.onnx_adapter").is_file()
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r.get("kind") == "step"]
    assert steps == [1, 2, 3, 4]
    assert [r["step"] for r in records if r.get("eval")] == [0, 2, 4]
    assert (run_dir / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "steps = 4" in (run_dir / "config.toml").read_text()
    # B was trained: the final LoRA-B tensors moved away from zero.
    final = load_tensors(run_dir / "final" / "adapter_model.safetensors")
    assert any(np.abs(v).max() > 0 for k, v in final.items() if "lora_B" in k)


def test_rerun_without_resume_is_refused_and_resume_is_a_no_op(tiny_bundle: Path, run_dir: Path):
    final = run_dir / "final" / "adapter_model.safetensors"
    before = load_tensors(final)
    assert_clean_error(zoo("train", tiny_bundle, *TRAIN, "--out", run_dir), "resume")
    res = zoo("train", tiny_bundle, *TRAIN, "--out", run_dir, "--resume")
    assert res.returncode == 0, res.stderr
    after = load_tensors(final)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_saved_config_replays_the_run_bit_identically(tiny_bundle: Path, run_dir: Path, tmp_path):
    out = tmp_path / "replay"
    res = zoo("train", tiny_bundle, "--config", run_dir / "config.toml", "--out", out)
    assert res.returncode == 0, res.stderr
    name = "final/adapter_model.safetensors"
    assert same_tensors(run_dir / name, out / name)


def test_resume_with_changed_settings_is_refused(tiny_bundle: Path, run_dir: Path):
    res = zoo("train", tiny_bundle, *TRAIN, "--lr", "0.1", "--out", run_dir, "--resume")
    assert_clean_error(res)


def test_eval_with_adapter_matches_the_runs_final_evaluation(tiny_bundle: Path, run_dir: Path):
    res = zoo(
        "eval",
        tiny_bundle,
        "--data",
        "sentiment",
        "--eval-rows",
        "16",
        "--adapter",
        run_dir / "final",
    )
    assert res.returncode == 0, res.stderr
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r["eval"] for r in records if r.get("eval")][-1]
    assert f"{final['accuracy']:.4f}" in res.stdout
    assert f"{final['loss']:.4f}" in res.stdout


def test_providers_lists_cpu_usable_and_cuda_not():
    res = zoo("providers")
    assert res.returncode == 0, res.stderr
    line = {ln.split("│")[1].strip(): ln for ln in res.stdout.splitlines() if ln.count("│") > 3}
    assert "yes" in line["cpu"]
    assert "no" in line["cuda"]


@pytest.mark.parametrize(
    "args,words",
    [
        (["--provider", "cuda"], ["cuda"]),
        (["--provider", "warp-drive"], ["warp-drive"]),
        (["--data", "/nonexistent/folder"], ["/nonexistent/folder"]),
        (["--data", "/nonexistent/[bold]x"], ["/nonexistent/[bold]x"]),  # printed as is
        (["--task", "nope"], ["nope"]),
        (["--loss", "bogus"], ["loss"]),
        (["--steps", "0"], ["steps"]),
    ],
)
def test_train_bad_input(tiny_bundle: Path, tmp_path: Path, args: list[str], words: list[str]):
    out = tmp_path / "run"
    res = zoo("train", tiny_bundle, *TRAIN, "--out", out, *args)
    assert_clean_error(res, *words)
    assert not (out / "checkpoints").exists()


def test_bad_bundle_and_bad_data(tmp_path: Path, tiny_bundle: Path):
    assert_clean_error(
        zoo("train", tmp_path / "none", "--data", "sentiment", "--out", tmp_path / "r")
    )
    bad = tmp_path / "data"
    bad.mkdir()
    (bad / "train.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\t7\n")
    (bad / "dev.tsv").write_text("sentence\tlabel\ngood film\t1\n")
    res = zoo("train", tiny_bundle, "--task", "sst2", "--data", bad, "--out", tmp_path / "r")
    assert_clean_error(res, "train.tsv", "3")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_bundle.iterdir():
        (broken / f.name).symlink_to(f)
    (broken / "manifest.json").unlink()
    (broken / "manifest.json").write_text("{not json")
    assert_clean_error(zoo("eval", broken, "--data", "sentiment"), "manifest.json")


def test_export_bad_input_writes_nothing(tmp_path: Path):
    out = tmp_path / "bundle"
    assert_clean_error(zoo("export", "no-such-model-anywhere", "--out", out))
    assert_clean_error(zoo("export", "smollm2-135m", "--rank", "0", "--out", out), "rank")
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_clean_error(zoo("export", "smollm2-135m", "--out", out))
    assert (out / "keep.txt").read_text() == "precious"
