"""benchmarks/time_to_accuracy.py: held-back rows, the targets' arithmetic, a tiny run end to end.

No assertion is about time: hand-made curves check the report's logic, the tiny run checks that
every contender trains on the same tokens and scores the whole dev split on its grid.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not an installed package
    sys.path.insert(0, str(REPO_ROOT))

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from benchmarks import run as bench_run  # noqa: E402
from benchmarks import time_to_accuracy as tta  # noqa: E402

DATA = REPO_ROOT.parent / "shared" / "data"


def _write(path: Path, header: str, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")


def test_held_back_rows_are_never_trained_on_nor_reported(tmp_path, monkeypatch):
    src = tmp_path / "data"
    monkeypatch.setattr(tta, "SELECT_ROWS", {"sst2": 3, "rte": 2})
    _write(src / "sst2" / "train.tsv", "sentence\tlabel", [f"tr{i}\t{i % 2}" for i in range(10)])
    _write(src / "sst2" / "dev.tsv", "sentence\tlabel", [f"dv{i}\t{i % 2}" for i in range(4)])
    _write(src / "sst2" / "test.tsv", "sentence\tlabel", [f"te{i}\t{i % 2}" for i in range(6)])
    _write(src / "rte" / "train.tsv", "s1\ts2\tlabel", [f"a{i}\tb{i}\t{i % 2}" for i in range(8)])
    _write(src / "rte" / "dev.tsv", "s1\ts2\tlabel", ["x\ty\t0"])

    def rows(path: Path) -> list[str]:
        return path.read_text().splitlines()[1:]

    sst2 = tta.task_folder("sst2", tmp_path / "cache", src)
    assert rows(sst2 / "select.tsv") == ["te0\t0", "te1\t1", "te2\t0"]
    assert rows(sst2 / "train.tsv") == rows(src / "sst2" / "train.tsv")
    assert rows(sst2 / "dev.tsv") == rows(src / "sst2" / "dev.tsv")
    rte = tta.task_folder("rte", tmp_path / "cache", src)
    assert rows(rte / "select.tsv") == ["a6\tb6\t0", "a7\tb7\t1"]
    assert rows(rte / "train.tsv") == [f"a{i}\tb{i}\t{i % 2}" for i in range(6)]
    assert not set(rows(rte / "select.tsv")) & set(rows(rte / "train.tsv"))


def test_rte_held_back_rows_are_what_zoo_ort_train_holdout_holds_back(
    tmp_path, tiny_bundle, monkeypatch
):
    """The delivered part's rule on RTE is `zoo-ort train --holdout N`'s: the same rows, the
    same training rows."""
    from zoo_ort.app.wiring import prepare, resolve

    monkeypatch.setattr(tta, "SELECT_ROWS", {"rte": 5})
    src, header = tmp_path / "data" / "rte", "sentence1\tsentence2\tlabel"
    _write(src / "train.tsv", header, [f"p{i} x\th{i} y\t{i % 2}" for i in range(30)])
    _write(src / "dev.tsv", header, ["p\th\t0"])
    folder = tta.task_folder("rte", tmp_path / "cache", src.parent)

    def prepared(data: Path, split: str = "dev", **flags):
        s = resolve(tiny_bundle, {"data": str(data), "task": "rte", "out": "unused", **flags})
        return prepare(s.settings, split=split)

    def rows(d) -> list[list[int]]:
        return [d.example(i).tolist() for i in range(len(d))]

    whole, parts = prepared(src, holdout=5), prepared(folder, split="select")
    assert rows(whole.holdout_data) == rows(parts.dev_data) and len(parts.dev_data) == 5
    assert rows(whole.train_data) == rows(parts.train_data) and len(parts.train_data) == 25


def _run(points: list[tuple[float, float]], **config) -> dict:
    curve = [{"step": i, "train_s": t, "dev_acc": a} for i, (t, a) in enumerate(points)]
    return {"curve": curve, "steps_done": len(points) - 1, "median_step_s": 1.0, "config": config}


def test_targets_read_the_curves():
    zoo = _run([(0, 0.80), (60, 0.84), (120, 0.86), (600, 0.87)])
    mezo = _run([(0, 0.80), (120, 0.81), (300, 0.84), (600, 0.83)], lr=1e-3, eps=1e-2, q=1, B=16)
    fo = _run([(0, 0.80), (600, 0.88)], lr=1e-3, B=16)
    runs = {"zoo_default": zoo, "mezo_torch": mezo, "first_order_torch": fo}
    rows = {r["measure"].split(" (")[0]: r for r in tta.targets("sst2", runs)}
    assert rows["SST-2 dev accuracy after 600 s"]["met"] == "yes"
    # MeZO's best (84% at 300 s) is reached by zoo-ort at 60 s: 5x sooner, just.
    sooner = rows["training s to MeZO-torch's best 600-s accuracy"]
    assert sooner["zoo"] == "60 s" and sooner["met"] == "yes (5.0x)"
    late = _run([(0, 0.80), (120, 0.83), (600, 0.85)])
    rows = tta.targets("rte", {"zoo_default": late, "mezo_torch": mezo})
    assert [r["met"] for r in rows] == ["no (0.5x)", "yes"]  # 84% first at 600 s; 85% > 83%
    never = _run([(0, 0.80), (600, 0.82)])
    assert tta.targets("rte", {"zoo_default": never, "mezo_torch": mezo})[0]["met"] == "no"
    # Times are read on the evaluation grid: a point scored after the step that crossed 120 s
    # (122 s) counts as 120 s, as MeZO's end (602 s) counts as its 600-s budget.
    grid = {"eval_at_s": [60.0, 120.0, 240.0], "time_budget_s": 600.0}
    zoo_late = _run([(0, 0.80), (61, 0.83), (122, 0.845), (601, 0.86)], **grid)
    mezo_end = _run([(0, 0.80), (120, 0.81), (602, 0.84)], eval_at_s=[120.0], time_budget_s=600.0)
    row = tta.targets("rte", {"zoo_default": zoo_late, "mezo_torch": mezo_end})[0]
    assert row["zoo"] == "120 s" and row["ref"] == "600 s (MeZO-torch)"
    assert row["met"] == "yes (5.0x)"
    # PyTorch runs record no budget in their config: the part's budget is the last grid point.
    mezo_end = _run([(0, 0.80), (300, 0.81), (602, 0.84)], eval_at_s=[120.0, 300.0, 450.0])
    row = tta.targets("rte", {"zoo_default": zoo_late, "mezo_torch": mezo_end}, 600.0)[0]
    assert row["ref"] == "600 s (MeZO-torch)" and row["met"] == "yes (5.0x)"
    assert tta.scheduled_s(zoo_late, 241.0) == 240.0 and tta.scheduled_s(zoo_late, 59.0) == 59.0
    # MeZO never passes its start (RTE here): no time to beat, said as such, not "0.0x".
    flat = _run([(0, 0.54), (300, 0.51), (600, 0.52)])
    row = tta.targets("rte", {"zoo_default": late, "mezo_torch": flat})[0]
    assert row["met"] == "n/a" and "never passed its start" in row["ref"]


def test_seeds_compare_means_with_their_standard_error():
    head = {"budget_s": 600.0, "bundle": "b", "recipe": {"lr": 0.02}, "mezo_lr": 0.003}
    parts = {
        "zoo": {**head, "runs": {"zoo_default": _run([(0, 0.54), (600, 0.50)])}},
        "torch": {**head, "runs": {"mezo_torch": _run([(0, 0.54), (600, 0.52)])}},
    }
    seeds = dict(head, seeds={})
    for seed, (z, m) in {"1": (0.56, 0.50), "2": (0.53, 0.51)}.items():
        runs = {"zoo_default": _run([(0, 0.54), (600, z)]), "mezo_torch": _run([(600, m)])}
        seeds["seeds"][seed] = {"runs": runs}
    ends = tta.seed_ends(parts, seeds)
    assert ends == {
        "zoo_default": {0: 0.50, 1: 0.56, 2: 0.53},
        "mezo_torch": {0: 0.52, 1: 0.50, 2: 0.51},
    }
    mean, se = tta.mean_se([0.50, 0.56, 0.53])
    assert mean == pytest.approx(0.53) and se == pytest.approx(0.03 / 3**0.5)
    assert tta.mean_se([0.5]) == (0.5, None)
    text = "\n".join(tta.seed_section("rte", ends))
    assert "| zoo-ort, recipe defaults | 0: 50.0%, 1: 56.0%, 2: 53.0% | 53.0% ± 1.7 (n=3) |" in text
    assert "| 51.0% ± 0.6 (n=3) (MeZO-torch) | higher | yes |" in text
    assert "Difference of the means: +2.0 points, standard error 1.8." in text
    # A part run with another recipe (or MeZO lr) is not one of the seeds: it is left out.
    parts["zoo"]["recipe"] = {"lr": 0.01}
    parts["torch"]["mezo_lr"] = 0.01
    ends = tta.seed_ends(parts, seeds)
    assert set(ends["zoo_default"]) == set(ends["mezo_torch"]) == {1, 2}
    # One seed a side: no comparison of means (no standard error to give), only the table.
    one = dict(head, seeds={"1": seeds["seeds"]["1"]})
    assert "mean over seeds" not in "\n".join(tta.seed_section("rte", tta.seed_ends({}, one)))
    assert "mean over seeds" not in "\n".join(tta.seed_section("sst2", ends))


def test_delivered_adapter_is_the_first_best_on_held_back_rows():
    def run(points: list[tuple[float, float, float]]) -> dict:
        curve = [{"step": i, "train_s": t, "dev_acc": d, "select_acc": h}
                 for i, (t, d, h) in enumerate(points)]  # fmt: skip
        return {"curve": curve}

    # The held-back rows pick 120 s (their first best; 600 s ties it), whose dev accuracy is
    # reported although dev was higher at 300 s: the rule never looks at dev.
    zoo = run([(0, 0.54, 0.50), (120, 0.52, 0.56), (300, 0.60, 0.53), (600, 0.51, 0.56)])
    assert tta.delivered(zoo["curve"])["train_s"] == 120
    flat = run([(0, 0.54, 0.55), (120, 0.50, 0.52), (600, 0.49, 0.54)])
    assert tta.delivered(flat["curve"])["dev_acc"] == 0.54  # the start, when nothing beats it
    res = {"seeds": {}}
    for seed, (z, m) in enumerate([(zoo, flat), (flat, zoo)]):
        res["seeds"][str(seed)] = {
            "machine": {"time_utc": "t"},
            "runs": {"zoo_default": z, "mezo_torch": m},
        }
    text = "\n".join(tta.delivered_section("rte", res))
    assert (
        "| zoo-ort, recipe defaults | 0: 52.0% (120 s), 1: 54.0% (0 s) | 53.0% ± 1.0 (n=2) |"
        in text
    )
    assert "| 0: 51.0%, 1: 49.0% | 50.0% ± 1.0 (n=2) |" in text  # the ends, beside
    assert "(MeZO-torch, same rule) | higher | no |" in text  # 53.0% against 53.0%
    assert "Difference of the means: +0.0 points, standard error 1.4." in text


def test_seed_flag_goes_with_the_seeds_part(capsys):
    for argv in (
        ["--tta", "rte", "--part", "seeds"],
        ["--tta", "rte", "--part", "delivered"],
        ["--tta", "rte", "--seed", "1"],
        ["--tta", "rte", "--part", "delivered", "--seed", "-1"],
    ):
        with pytest.raises(SystemExit) as e:
            bench_run.main(argv)
        assert e.value.code == 2
    assert "--seed goes with --tta TASK --part seeds" in capsys.readouterr().err


@pytest.mark.skipif(not (DATA / "sst2").is_dir(), reason="needs ../shared/data/sst2")
def test_quick_parts_end_to_end(tmp_path):
    """Both parts on the tiny model (1 s of training each), then the report from their files."""
    out, cache = tmp_path / "tta", tmp_path / "cache"
    for part in ("zoo", "torch"):
        argv = ["--tta", "sst2", "--part", part, "--quick", "--out", str(out)]
        assert bench_run.main([*argv, "--cache", str(cache)]) == 0, part
    zoo = json.loads((out / "sst2-zoo.json").read_text())
    torch_part = json.loads((out / "sst2-torch.json").read_text())
    runs = {**zoo["runs"], **torch_part["runs"]}
    assert set(runs) == {"zoo_default", "zoo_prge_before", "mezo_torch", "first_order_torch"}
    dev_rows = len((DATA / "sst2" / "dev.tsv").read_text().splitlines()) - 1
    for sha in ("train_tokens_sha", "dev_tokens_sha"):  # zoo-ort's encoding on every side
        assert len({r[sha] for r in runs.values()}) == 1, sha
    for key, r in runs.items():
        assert r["curve"][0]["step"] == 0 and r["curve"][-1]["dev_rows"] == dev_rows, key
        # Scored at the start, at the grid's points and at the end: never after every step.
        grid = tta.ZO_GRID if key.startswith("zoo") else tta.TORCH_GRID
        # (How many steps fit in 1 s depends on the machine's load: no count of steps is assumed.)
        assert r["config"]["eval_every"] == 0 and len(r["curve"]) <= len(grid) + 2, key
    assert zoo["runs"]["zoo_default"]["config"]["settings"]["lr"] == tta.recipe_training()["lr"]
    assert set(torch_part["sweep"]) == {str(lr) for lr in tta.MEZO_LRS}
    select_rows = tta.SELECT_ROWS["sst2"]
    assert all(r["final"]["dev_rows"] == select_rows for r in torch_part["sweep"].values())
    assert torch_part["mezo_lr"] in tta.MEZO_LRS
    text = (out / "README.md").read_text()
    assert "## SST2 (whole dev split)" in text and "MeZO-torch lr sweep" in text
    assert "| measure | zoo-ort defaults |" in text
    # --only re-runs one contender and keeps the other's result, said so in the report.
    argv = ["--tta", "sst2", "--part", "zoo", "--quick", "--out", str(out), "--cache", str(cache)]
    assert bench_run.main([*argv, "--only", "zoo_default"]) == 0
    again = json.loads((out / "sst2-zoo.json").read_text())
    assert again["runs"]["zoo_prge_before"] == zoo["runs"]["zoo_prge_before"]
    assert again["runs"]["zoo_default"]["wall_s"] != zoo["runs"]["zoo_default"]["wall_s"]
    assert again["kept"] == {"zoo_prge_before": zoo["machine"]["time_utc"]}
    assert (
        "P-RGE before (lr 1e-2, constant): kept from the part's run of"
        in (out / "README.md").read_text()
    )
    # The seeds part: zoo-ort's defaults and MeZO-torch (at the lr its part chose) with seed 1.
    with pytest.raises(SystemExit, match="seed 0 is the parts' own run"):
        bench_run.main([*argv[:3], "seeds", *argv[4:], "--seed", "0"])
    assert bench_run.main([*argv[:3], "seeds", *argv[4:], "--seed", "1"]) == 0
    seeds = json.loads((out / "sst2-seeds.json").read_text())
    runs = seeds["seeds"]["1"]["runs"]
    assert set(runs) == set(tta.SEED_RUNS) and seeds["mezo_lr"] == torch_part["mezo_lr"]
    assert runs["zoo_default"]["config"]["seed"] == runs["mezo_torch"]["config"]["seed"] == 1
    assert runs["mezo_torch"]["config"]["lr"] == torch_part["mezo_lr"]
    for sha in ("train_tokens_sha", "dev_tokens_sha"):  # the same rows as the parts' runs
        assert runs["mezo_torch"][sha] == torch_part["runs"]["mezo_torch"][sha], sha
    text = (out / "README.md").read_text()
    assert "### SST2 over training seeds" in text and "- seed 1, " in text
    # The delivered part: both on one grid, the held-back rows scored beside dev at every point.
    assert bench_run.main([*argv[:3], "delivered", *argv[4:], "--seed", "0"]) == 0
    runs = json.loads((out / "sst2-delivered.json").read_text())["seeds"]["0"]["runs"]
    assert set(runs) == set(tta.SEED_RUNS)
    for r in runs.values():
        assert r["config"]["eval_at_s"] == [f * 1.0 for f in tta.TORCH_GRID]
        assert all(0 <= c["select_acc"] <= 1 for c in r["curve"])
    # Both sides score the same held-back rows with the same initial adapter (ORT and PyTorch).
    zoo0, mezo0 = (runs[k]["curve"][0] for k in tta.SEED_RUNS)
    assert zoo0["select_acc"] == mezo0["select_acc"]
    assert zoo0["select_loss"] == pytest.approx(mezo0["select_loss"], abs=1e-4)
    assert "stopping rule on held-back rows delivers" in (out / "README.md").read_text()
    # The trunk part: zoo-ort on a trunk + head bundle (LoRA on the top layer), MeZO-torch as in
    # the delivered part, on the same grid and held-back rows.
    from zoo_ort.exporters import export_bundle

    from benchmarks.zoo_bench import TINY_ARCH, TINY_LAYERS

    trunk = export_bundle(
        str(cache / f"tiny-{TINY_ARCH}-src"), tmp_path / "trunk", rank=8, alpha=16.0,
        lora_layers=(1, TINY_LAYERS),
    )  # fmt: skip
    trunk_argv = [*argv[:3], "trunk", *argv[4:], "--seed", "0", "--bundle-trunk", str(trunk)]
    assert bench_run.main(trunk_argv) == 0
    part = json.loads((out / "sst2-trunk.json").read_text())
    assert part["lora_layers"] == [1, TINY_LAYERS] and part["trunk_bundle"] == str(trunk)
    assert part["recipe"]["steps"] == tta.TRUNK_STEPS
    runs = part["seeds"]["0"]["runs"]
    assert runs["zoo_default"]["bundle"] == str(trunk)
    assert runs["zoo_default"]["config"]["settings"]["steps"] == tta.TRUNK_STEPS
    assert runs["mezo_torch"]["config"]["lr"] == torch_part["mezo_lr"]
    for r in runs.values():
        assert r["config"]["eval_at_s"] == [f * 1.0 for f in tta.TORCH_GRID]
    # LoRA-FA starts at B = 0, so both score the base model at the start, whatever their layers.
    zoo0, mezo0 = (runs[k]["curve"][0] for k in tta.SEED_RUNS)
    assert zoo0["select_acc"] == mezo0["select_acc"]
    assert zoo0["select_loss"] == pytest.approx(mezo0["select_loss"], abs=1e-4)
    assert "delivers, zoo-ort on a trunk + head bundle" in (out / "README.md").read_text()
    # A one-graph bundle is not a trunk bundle: one line, nothing written.
    with pytest.raises(SystemExit, match="--part trunk needs --bundle-trunk B, a bundle exported"):
        bench_run.main([*trunk_argv[:-1], part["bundle"]])
    # The head part: as trunk, zoo-ort with HEAD_TRAINING on a bundle whose only LoRA is on the
    # last layer's o_proj (full LoRA, rank 1), what it trains read from the bundle's manifest.
    last = export_bundle(
        str(cache / f"tiny-{TINY_ARCH}-src"), tmp_path / "last", rank=1, mode="full",
        target_modules=["o_proj"], lora_layers=(TINY_LAYERS - 1, TINY_LAYERS),
    )  # fmt: skip
    head_argv = [*argv[:3], "head", *argv[4:], "--seed", "0", "--bundle-trunk", str(last)]
    assert bench_run.main(head_argv) == 0
    part = json.loads((out / "sst2-head.json").read_text())
    assert part["lora"] == {"mode": "full", "rank": 1, "modules": ["o_proj"]}
    assert part["lora_layers"] == [TINY_LAYERS - 1, TINY_LAYERS]
    zoo = part["seeds"]["0"]["runs"]["zoo_default"]
    for key, value in tta.HEAD_TRAINING.items():
        assert part["recipe"][key] == value and zoo["config"]["settings"][key] == value
    assert zoo["bundle"] == str(last)
    assert "delivers, zoo-ort on LoRA of the last layer only" in (out / "README.md").read_text()
    with pytest.raises(SystemExit, match="--part head needs --bundle-trunk B, a bundle exported"):
        bench_run.main([*head_argv[:-1], part["bundle"]])


def test_bundle_trunk_goes_with_the_trunk_part(capsys):
    for argv in (
        ["--tta", "rte", "--part", "trunk", "--seed", "0"],
        ["--tta", "rte", "--part", "head", "--seed", "0"],
        ["--tta", "rte", "--part", "delivered", "--seed", "0", "--bundle-trunk", "B"],
    ):
        with pytest.raises(SystemExit) as e:
            bench_run.main(argv)
        assert e.value.code == 2
        assert "--bundle-trunk goes with --tta TASK --part trunk|head" in capsys.readouterr().err


def test_trunk_part_is_reported_under_its_own_title():
    def run(points: list[tuple[float, float, float]]) -> dict:
        curve = [{"step": i, "train_s": t, "dev_acc": d, "select_acc": h}
                 for i, (t, d, h) in enumerate(points)]  # fmt: skip
        return {"curve": curve}

    res = {"part": "trunk", "lora_layers": [20, 30], "recipe": {"steps": 130}, "seeds": {}}
    for seed in (0, 1):
        zoo = run([(0, 0.54, 0.50), (300, 0.56 + seed / 100, 0.55)])
        mezo = run([(0, 0.54, 0.50), (300, 0.52, 0.53)])
        for r, end in ((zoo, 0.69 - seed / 100), (mezo, 0.70)):
            r["curve"][0]["dev_loss"], r["curve"][-1]["dev_loss"] = 0.6947, end
        res["seeds"][str(seed)] = {
            "machine": {"time_utc": "t"},
            "runs": {"zoo_default": zoo, "mezo_torch": mezo},
        }
    text = "\n".join(tta.delivered_section("rte", res))
    assert "delivers, zoo-ort on a trunk + head bundle" in text
    assert (
        "| zoo-ort, recipe defaults on a trunk + head bundle (LoRA on layers 20-30), cosine over "
        "130 steps | 0: 56.0% (300 s), 1: 57.0% (300 s) | 56.5% ± 0.5 (n=2) |" in text
    )
    assert "| 56.5% ± 0.5 (n=2) | 0: 0.6900, 1: 0.6800 |" in text  # the ends' loss, by seed
    assert "| 52.0% ± 0.0 (n=2) | 0: 0.7000, 1: 0.7000 |" in text
    assert "Dev candidate loss at the start: 0.6947 (chance, ln 2: 0.6931)." in text
    assert "(MeZO-torch, same rule) | higher | yes |" in text
    assert "Difference of the means: +4.5 points" in text


@pytest.mark.skipif(not (DATA / "rte").is_dir(), reason="needs ../shared/data/rte")
def test_ceiling_part_scores_dev_and_held_back_rows_with_epochs(tmp_path):
    """The ceiling part alone: first-order and zoo-ort's recipe on the tiny model, dev and the
    held-back rows scored at the start, on the grid and at the end; the report shows it without
    the 600-s parts, and ``--only`` re-runs one contender and keeps the other."""
    out, cache = tmp_path / "tta", tmp_path / "cache"
    argv = ["--tta", "rte", "--part", "ceiling", "--quick", "--budget", "2"]
    argv += ["--out", str(out), "--cache", str(cache)]
    assert bench_run.main(argv) == 0
    res = json.loads((out / "rte-ceiling.json").read_text())
    assert set(res["runs"]) == set(tta.CEILING_RUNS)
    fo, zoo = res["runs"]["first_order_torch"], res["runs"]["zoo_default"]
    assert fo["config"]["lr"] == tta.FIRST_ORDER_LR
    assert zoo["config"]["settings"]["lr"] == tta.recipe_training()["lr"]
    assert zoo["config"]["settings"]["steps"] == res["recipe"]["steps"] == 1  # 2 s / 3.82 s
    dev_rows = len((DATA / "rte" / "dev.tsv").read_text().splitlines()) - 1
    train_rows = len((DATA / "rte" / "train.tsv").read_text().splitlines()) - 1
    for run in (fo, zoo):
        assert 2 <= len(run["curve"]) <= len(tta.CEILING_GRID) + 2
        assert all(c["dev_rows"] == dev_rows for c in run["curve"])
        assert run["train_rows"] == train_rows - tta.SELECT_ROWS["rte"]
        assert all("select_acc" in c for c in run["curve"])
    assert all(c["select_rows"] == tta.SELECT_ROWS["rte"] for c in fo["curve"])
    text = (out / "README.md").read_text()
    assert "## RTE: 2 s of training (ceiling)" in text
    end = fo["curve"][-1]
    epochs = end["step"] * 16 / fo["train_rows"]
    assert f"| {end['step']} | {epochs:.2f} | {100 * end['dev_acc']:.1f}% |" in text
    assert bench_run.main([*argv, "--only", "first_order_torch"]) == 0
    again = json.loads((out / "rte-ceiling.json").read_text())
    assert again["runs"]["zoo_default"] == zoo and again["kept"] == {
        "zoo_default": res["machine"]["time_utc"]
    }


def test_only_names_a_contender_of_its_part(capsys):
    for part, who in (("zoo", "first_order_torch"), ("ceiling", "zoo_prge_before")):
        with pytest.raises(SystemExit) as e:
            bench_run.main(["--tta", "rte", "--part", part, "--only", who])
        assert e.value.code == 2
    assert "one of the part's contenders" in capsys.readouterr().err


def test_head_part_names_what_zoo_ort_trained():
    curve = [{"step": 0, "train_s": 0.0, "dev_acc": 0.54, "select_acc": 0.5}]
    res = {
        "part": "head",
        "lora_layers": [29, 30],
        "lora": {"mode": "full", "rank": 1, "modules": ["o_proj"]},
        "recipe": {"steps": 2800, "lr": 5e-3},
        "seeds": {"0": {"machine": {"time_utc": "t"}, "runs": {"zoo_default": {"curve": curve}}}},
    }
    text = "\n".join(tta.delivered_section("rte", res))
    assert "### RTE: the adapter a stopping rule on held-back rows delivers, zoo-ort on LoRA of " \
        "the last layer only" in text  # fmt: skip
    assert (
        "| zoo-ort FZOO on a trunk + head bundle (LoRA full rank 1 on o_proj of layers 29-30), "
        "lr 0.005, cosine over 2800 steps | 0: 54.0% (0 s) |" in text
    )
