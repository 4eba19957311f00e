"""The command line end to end on a tiny bundle: outputs, resume, replay, eval and bad input.

Every bad input must give one line on stderr, exit code 2 and no traceback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from zoo_ort.io import load_tensors

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2"


def zoo(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "zoo_ort", *map(str, args)],
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
    if importlib.util.find_spec("matplotlib") is not None:  # the optional plot extra
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
    line = {ln.split(" ")[0]: ln for ln in res.stdout.splitlines() if "usable here:" in ln}
    assert "usable here: yes" in line["cpu"]
    assert "usable here: no" in line["cuda"]
    assert "CUDAExecutionProvider" in line["cuda"]  # names are never cut


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
        (["--time-limit", "soon"], ["time_limit"]),
        (["--estimator", "magic"], ["estimator"]),
        (["--sampler", "stratified"], ["sampler"]),
        (["--trunk-cache-mb", "-1"], ["trunk_cache_mb"]),
    ],
)
def test_train_bad_input(tiny_bundle: Path, tmp_path: Path, args: list[str], words: list[str]):
    out = tmp_path / "run"
    res = zoo("train", tiny_bundle, *TRAIN, "--out", out, *args)
    assert_clean_error(res, *words)
    assert not (out / "checkpoints").exists()


def test_balanced_sampler_refuses_lm_data(tiny_bundle: Path, tmp_path: Path):
    data = tmp_path / "text"
    data.mkdir()
    for split in ("train", "dev"):
        (data / f"{split}.jsonl").write_text('{"text": "one line of text"}\n' * 3)
    out = tmp_path / "run"
    res = zoo(
        "train",
        tiny_bundle,
        "--data",
        data,
        "--task",
        "lm",
        "--loss",
        "lm",
        "--out",
        out,
        "--sampler",
        "balanced",
    )
    assert_clean_error(res, "balanced", "labelled")
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
    assert_clean_error(zoo("export", "smollm2-135m", "--out", out), "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"
    other = tmp_path / "other"
    assert_clean_error(
        zoo("export", "smollm2-135m", "--lora-layers", "20", "--out", other), "20:30"
    )
    assert not other.exists()


# -- what a newcomer meets --------------------------------------------------------------------


def test_version_help_defaults_and_show_config(tiny_bundle: Path, tmp_path: Path):
    from zoo_ort import __version__
    from zoo_ort.settings import DEFAULTS

    res = zoo("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"zoo-ort {__version__}"
    res = zoo("train", "--help")
    text = " ".join(res.stdout.split())
    assert f"(default {DEFAULTS.lr}; a recipe may set another)" in text
    assert "--out" in text and "required" in text
    assert "recipe" in text and "--show-config" in text
    assert "Usage: zoo-ort train [OPTIONS] BUNDLE" in text  # no {BUNDLE} placeholder braces
    res = zoo(
        "train",
        tiny_bundle,
        "--data",
        "sentiment",
        "--out",
        tmp_path / "s",
        "--lr",
        "0.5",
        "--show-config",
    )
    assert res.returncode == 0, res.stderr
    rows = {ln.split("│")[1].strip(): ln for ln in res.stdout.splitlines() if ln.count("│") >= 3}
    assert "0.5" in rows["lr"] and "flags" in rows["lr"]
    assert "default" in rows["adam_eps"]
    assert not (tmp_path / "s").exists()  # --show-config writes nothing


def test_help_fits_100_columns():
    env = dict(os.environ, COLUMNS="100")
    res = subprocess.run(
        [sys.executable, "-m", "zoo_ort", "train", "--help"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0
    # every description column starts early enough to hold a readable sentence
    for line in res.stdout.splitlines():
        if line.startswith("│ --") or line.startswith("│ *  --"):
            assert len(line) <= 100
            assert line.rstrip("│ ").find("  ", 4) < 50, line


def test_missing_data_folder_is_named_before_the_task(tiny_bundle: Path, tmp_path: Path):
    res = zoo("train", tiny_bundle, "--data", tmp_path / "missing", "--out", tmp_path / "r")
    assert_clean_error(res, "no such data file or folder")


def test_eval_accepts_a_run_folder(tiny_bundle: Path, run_dir: Path):
    res = zoo("eval", tiny_bundle, "--data", "sentiment", "--eval-rows", "16", "--adapter", run_dir)
    assert res.returncode == 0, res.stderr
    assert "best" in res.stderr
    best = zoo(
        "eval",
        tiny_bundle,
        "--data",
        "sentiment",
        "--eval-rows",
        "16",
        "--adapter",
        run_dir / "best",
    )
    assert res.stdout == best.stdout


def test_resume_says_where_and_a_finished_run_is_left_alone(tiny_bundle: Path, tmp_path: Path):
    out = tmp_path / "run"
    args = ["train", tiny_bundle, *TRAIN, "--out", out]
    assert zoo(*args).returncode == 0
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    res = zoo(*args, "--resume")
    assert res.returncode == 0, res.stderr
    assert "already finished" in res.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamp
    # a run stopped half way: kill it from outside after its first checkpoint, then resume
    half = tmp_path / "half"
    long = ["train", tiny_bundle, *TRAIN, "--steps", "400", "--eval-every", "100", "--out", half]
    proc = subprocess.Popen(
        [sys.executable, "-m", "zoo_ort", *map(str, long)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(half / "checkpoints" / "latest.json")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr  # saved, not finished: `train && next` must stop
    step = json.loads((half / "checkpoints" / "latest.json").read_text())["step"]
    assert 0 < step < 400
    res = zoo(*long, "--resume")
    assert res.returncode == 0, res.stderr
    assert f"resuming from step {step} of 400" in res.stdout + res.stderr


def _wait_for(path: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_export_shows_timed_stages_and_no_third_party_warnings(tiny_model_dir, tmp_path: Path):
    res = zoo("export", tiny_model_dir("llama"), "--out", tmp_path / "b", "--rank", "2")
    assert res.returncode == 0, res.stderr
    stages = [ln for ln in res.stderr.splitlines() if ln.strip().startswith("[")]
    assert len(stages) >= 3 and all(" s] " in ln for ln in stages), res.stderr
    assert "Warning" not in res.stderr and "warn" not in res.stderr.lower(), res.stderr
    assert (tmp_path / "b" / "manifest.json").is_file()


def test_federate_runs_a_tiny_federation_quietly(tiny_bundle: Path, tmp_path: Path):
    pytest.importorskip("flwr")
    out = tmp_path / "fed"
    args = ["--data", "sentiment", "--out", out, "--clients", "2", "--rounds", "1"]
    res = zoo("federate", tiny_bundle, *args, "--num-cpus", "2", "--eval-rows", "16")
    assert res.returncode == 0, res.stderr
    assert "dev accuracy" in res.stdout and (out / "final" / "adapter_config.json").is_file()
    noise = [ln for ln in (res.stdout + res.stderr).splitlines() if "DEPRECAT" in ln.upper()]
    assert not noise, noise  # Flower's and Ray's notices stay out of the user's terminal


def test_recipe_balanced_sampler_gives_way_to_lm_data(tiny_bundle: Path, tmp_path: Path):
    import json

    from zoo_ort.app.wiring import resolve

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for f in tiny_bundle.iterdir():
        if f.name != "manifest.json":
            (bundle / f.name).symlink_to(f)
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    manifest["defaults"] = {**manifest.get("defaults", {}), "sampler": "balanced"}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    text = tmp_path / "text"
    text.mkdir()
    for split in ("train", "dev"):
        (text / f"{split}.jsonl").write_text('{"text": "one line of text"}\n' * 3)
    lm = {"data": str(text), "task": "lm", "loss": "lm", "out": str(tmp_path / "r")}
    r = resolve(bundle, lm)
    assert r.settings.sampler == "shuffle" and r.sources["sampler"].startswith("recipe")
    cls = resolve(bundle, {"data": "sentiment", "out": str(tmp_path / "r")})
    assert cls.settings.sampler == "balanced" and cls.sources["sampler"] == "recipe"
    explicit = resolve(bundle, lm | {"sampler": "balanced"})
    assert explicit.settings.sampler == "balanced"  # refused when the data is loaded (see above)
