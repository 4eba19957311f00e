"""The benchmark suite in one command: zoo-ort against MeZO in PyTorch and first-order LoRA.

    python -m benchmarks.run            # SmolLM2-135M on SST-2, about 95 minutes on 2 cores
    python -m benchmarks.run --quick    # a tiny random model, a minute or two (CI)
    python -m benchmarks.run --tta sst2 --part zoo   # time to accuracy, see time_to_accuracy.py

Every contender runs in its own process (its peak RSS is its own), all with every core
(ORT intra-op threads = torch threads = ``os.cpu_count()``), on the same model, data, prompt,
loss (cross-entropy over the two label words), LoRA targets (q_proj, v_proj), rank 8, alpha 16
and initial adapter (the bundle's ``adapter_init``), with the same training rows at every step.
The comparisons are reported as ratios taken in this one run; absolute times are context.

Written to ``--out``: ``results.json`` (machine, settings, every contender's raw result and
curves), ``results.md`` (the tables below, the machine, the plots) and ``accuracy.png``,
``loss.png``, ``memory.png``. The tables are also printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, machine_info, run_in_subprocess
from benchmarks.plots import plots
from benchmarks.report import headline, report, same_data, same_directions
from benchmarks.time_to_accuracy import (
    CEILING_PART,
    CEILING_RUNS,
    SEEDED_PARTS,
    TRUNK_PARTS,
    ZOO_RUNS,
)
from zoo_ort.io import atomic_write_json, atomic_write_text

ZOO = "benchmarks.zoo_bench"
TORCH = "benchmarks.torch_baselines:run_baseline"


@dataclass(frozen=True)
class Plan:
    """What one run measures; ``quick`` and ``full`` below are the two presets."""

    model: str  # "tiny" or "smollm2"
    B: int
    q: int
    lr_zo: float
    lr_fo: float
    eps: float
    dev_rows: int
    train_limit: int | None
    budget_s: float | None  # training clock per contender (None: `train_steps` steps)
    train_steps: int
    evals_per_run: int  # dev evaluations spread over the budget (plus start and end)
    # The zeroth-order contenders walk the same directions, so they are scored every this many
    # steps instead (None: on the time grid too): time to an accuracy is read at equal steps.
    zo_eval_every: int | None
    prge_q: tuple[int, ...]
    prge_B: int
    prge_steps: int
    overhead_steps: int
    signal_steps: int  # steps of prge_q[-1] directions for the quantized-signal check
    forward_repeats: int
    rss_steps: int  # training steps' rows the inference-memory reference runs
    train_int4: bool
    max_len: int = 256
    seed: int = 0
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)


QUICK = Plan(
    model="tiny",
    B=4,
    q=1,
    lr_zo=1e-2,
    lr_fo=1e-3,
    eps=1e-2,
    dev_rows=32,
    train_limit=512,
    budget_s=None,
    train_steps=6,
    evals_per_run=2,
    zo_eval_every=None,
    prge_q=(1, 4, 8),
    prge_B=4,
    prge_steps=2,
    overhead_steps=4,
    signal_steps=2,
    forward_repeats=2,
    rss_steps=6,
    train_int4=True,
)
FULL = replace(  # the same method as QUICK on the real model, at full size
    QUICK,
    model="smollm2",
    B=16,
    dev_rows=300,
    train_limit=None,
    budget_s=600.0,
    train_steps=100_000,
    evals_per_run=10,
    zo_eval_every=20,
    prge_B=8,
    overhead_steps=16,
    signal_steps=3,
    forward_repeats=3,
    rss_steps=150,
    train_int4=False,
)


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Runner:
    """Runs contenders one by one in subprocesses; a failure is recorded, not raised."""

    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        self.errors: dict[str, str] = {}
        self.load: list[dict[str, Any]] = []  # the machine's load around each contender

    def __call__(self, name: str, func: str, kwargs: dict[str, Any]) -> dict[str, Any] | None:
        _say(f"{name} ...")
        t0 = time.perf_counter()
        before = _loadavg()
        try:
            result = run_in_subprocess(func, kwargs, timeout_s=self.timeout_s)
        except Exception as e:  # a failed contender must not lose the others' results
            self.errors[name] = f"{type(e).__name__}: {e}"
            _say(f"{name} FAILED: {str(e).splitlines()[-1] if str(e) else type(e).__name__}")
            return None
        finally:
            self.load.append({"contender": name, "before": before, "after": _loadavg()})
        _say(f"{name} done in {time.perf_counter() - t0:.0f} s")
        return result


def _loadavg() -> float | None:
    """The 1-minute load average: above the core count, contenders shared the CPU."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# Running everything


def _eval_grid(plan: Plan, zeroth_order: bool) -> dict[str, Any]:
    """The contenders' evaluation grid: of training seconds under a budget (so each gets as
    many evaluations), else of steps; the zeroth-order ones on ``zo_eval_every`` steps if set."""
    if zeroth_order and plan.zo_eval_every:
        return {"eval_every": plan.zo_eval_every}
    if plan.budget_s is None:
        return {"eval_every": max(1, plan.train_steps // plan.evals_per_run)}
    return {"eval_every_s": plan.budget_s / plan.evals_per_run}


def run_all(plan: Plan, cache: Path, fp32_bundle: str | None, rebuild: bool) -> dict[str, Any]:
    timeout = None if plan.budget_s is None else 6 * plan.budget_s + 1800
    run = Runner(timeout)
    started = time.perf_counter()
    res: dict[str, Any] = {"plan": asdict(plan), "machine": machine_info()}
    prep = run(
        "bundles",
        f"{ZOO}:prepare_bundles",
        dict(model=plan.model, cache_dir=str(cache), fp32_bundle=fp32_bundle, rebuild=rebuild),
    )
    if prep is None or "fp32" not in prep["bundles"]:
        res["errors"] = run.errors
        res["load"] = run.load
        return res
    res["bundles"] = prep
    bundles: dict[str, str] = prep["bundles"]
    torch_model = prep.get("hf_folder") or "smollm2"
    data = dict(train_limit=plan.train_limit, threads=plan.threads)
    same = dict(B=plan.B, q=plan.q, eps=plan.eps, seed=plan.seed, **data)
    probe = dict(B=plan.prge_B, eps=plan.eps, seed=plan.seed, **data)  # steps that only score
    torch_common = dict(
        model=torch_model,
        threads=plan.threads,
        seed=plan.seed,
        bundle=bundles["fp32"],
        train_limit=plan.train_limit,
        max_len=plan.max_len,
    )

    # 1. P-RGE batched vs sequential, same engine and rows.
    res["prge"] = run(
        "P-RGE batched vs sequential (fp32)",
        f"{ZOO}:prge_modes",
        dict(bundle=bundles["fp32"], q_values=list(plan.prge_q), steps=plan.prge_steps, **probe),
    )
    # 5. Trainer overhead, every base precision.
    res["overhead"] = {}
    for precision, path in bundles.items():
        res["overhead"][precision] = run(
            f"trainer overhead ({precision})",
            f"{ZOO}:zoo_overhead",
            dict(bundle=path, steps=plan.overhead_steps, lr=plan.lr_zo, **same),
        )
    # 4b. Which quantized bases keep the ZO signal (g against fp32's on the same steps).
    res["quant_signal"] = run(
        "quantized bases and the ZO signal",
        "benchmarks.quant_signal:quant_signal",
        dict(
            bundles=bundles,
            cache_dir=str(cache),
            q=plan.prge_q[-1],
            steps=plan.signal_steps,
            **probe,
        ),
    )
    # Inference on the same rows (memory reference, rows/s per base precision).
    reference = dict(rss_steps=plan.rss_steps, dev_rows=plan.dev_rows)
    res["forward"] = {}
    for precision, path in bundles.items():
        res["forward"][precision] = run(
            f"inference only ({precision})",
            f"{ZOO}:zoo_forward",
            dict(bundle=path, repeats=plan.forward_repeats, **reference, **same),
        )
    res["forward"]["torch"] = run(
        "inference only (PyTorch eager)",
        TORCH,
        dict(which="forward", rows=plan.B, repeats=plan.forward_repeats, **torch_common),
    )
    # 2-4. Training under the same wall-clock budget.
    train_kw = dict(
        steps=plan.train_steps if plan.budget_s is None else 100_000,
        time_budget_s=plan.budget_s,
        dev_rows=plan.dev_rows,
        B=plan.B,
    )
    zo_kw = {**train_kw, **_eval_grid(plan, zeroth_order=True)}
    fo_kw = {**train_kw, **_eval_grid(plan, zeroth_order=False)}
    res["train"] = {}
    res["train"]["mezo_torch"] = run(
        "MeZO-style ZO in PyTorch",
        TORCH,
        dict(
            which="mezo",
            directions="zoo",
            lr=plan.lr_zo,
            eps=plan.eps,
            q=plan.q,
            **zo_kw,
            **torch_common,
        ),
    )
    precisions = [p for p in ("fp32", "int8", "int4") if p in bundles]
    if not plan.train_int4:
        precisions = [p for p in precisions if p != "int4"]
    for precision in precisions:
        res["train"][f"zoo_{precision}"] = run(
            f"zoo-ort training ({precision})",
            f"{ZOO}:zoo_train",
            {**zo_kw, **same, "bundle": bundles[precision], "lr": plan.lr_zo},
        )
    res["train"]["first_order_torch"] = run(
        "first-order LoRA-FA in PyTorch (AdamW)",
        TORCH,
        dict(which="first_order", lr=plan.lr_fo, **fo_kw, **torch_common),
    )
    res["errors"] = run.errors
    res["load"] = run.load
    res["total_wall_s"] = time.perf_counter() - started
    return res


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="zoo-ort vs MeZO in PyTorch vs first-order LoRA, side by side.",
    )
    p.add_argument("--quick", action="store_true", help="tiny random model, a few steps (CI)")
    p.add_argument(
        "--out",
        default=None,
        help="results folder (default benchmarks/results; --quick: benchmarks/cache/results-quick)",
    )
    p.add_argument(
        "--cache",
        default=str(REPO_ROOT / "benchmarks" / "cache"),
        help="where bundles are built and reused",
    )
    p.add_argument(
        "--bundle-fp32",
        default=None,
        help="an existing fp32 bundle of the model to use instead of exporting one",
    )
    p.add_argument("--rebuild", action="store_true", help="rebuild cached bundles")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"training seconds per contender (full default {FULL.budget_s:.0f})",
    )
    p.add_argument("--steps", type=int, default=None, help="steps per contender, no budget")
    p.add_argument("--B", type=int, default=None)
    p.add_argument("--q", type=int, default=None)
    p.add_argument("--dev-rows", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--train-int4", action="store_true", help="also train on the int4 base")
    p.add_argument(
        "--report-from",
        default=None,
        help="re-render the tables and plots of an earlier results.json (runs nothing)",
    )
    p.add_argument(
        "--tta",
        choices=("sst2", "rte"),
        default=None,
        help="time to accuracy on this task (benchmarks/time_to_accuracy.py), one --part a call",
    )
    p.add_argument(
        "--part",
        choices=("zoo", "torch", *SEEDED_PARTS, CEILING_PART),
        default="zoo",
        help="with --tta (seeds: zoo-ort's defaults and MeZO-torch again, with --seed; "
        "delivered: the same scoring the held-back rows too, for a stopping rule; trunk: as "
        "delivered, zoo-ort on --bundle-trunk; head: as trunk, zoo-ort's FZOO tuned for LoRA on "
        "the last layer only; ceiling: first-order and zoo-ort's recipe for --budget s)",
    )
    p.add_argument(
        "--seed", type=int, default=None, help="with --tta TASK --part seeds|delivered|trunk|head"
    )
    p.add_argument(
        "--bundle-trunk",
        default=None,
        help="with --tta TASK --part trunk|head: zoo-ort's bundle, exported with lora_layers",
    )
    p.add_argument(
        "--tta-report", action="store_true", help="re-render the time-to-accuracy report"
    )
    p.add_argument(
        "--only",
        action="append",
        choices=tuple(dict.fromkeys((*ZOO_RUNS, *CEILING_RUNS))),
        help="with --tta --part zoo|ceiling: re-run this contender, keep the others' last results",
    )
    a = p.parse_args(argv)
    if a.only and not (a.tta and a.part in ("zoo", CEILING_PART)):
        p.error("--only goes with --tta TASK --part zoo|ceiling")
    if a.only and not set(a.only) <= set(ZOO_RUNS if a.part == "zoo" else CEILING_RUNS):
        p.error(f"--only with --part {a.part}: one of the part's contenders")
    seeded = a.part in SEEDED_PARTS and a.tta is not None
    if (a.seed is not None) != seeded:
        p.error(
            "--seed goes with --tta TASK --part seeds|delivered|trunk|head, and those parts need it"
        )
    if (a.bundle_trunk is not None) != (a.tta is not None and a.part in TRUNK_PARTS):
        p.error("--bundle-trunk goes with --tta TASK --part trunk|head, and those parts need it")
    if a.seed is not None and a.seed < 0:
        p.error("--seed must be >= 0")
    if a.tta or a.tta_report:
        from benchmarks import time_to_accuracy as tta

        out = Path(a.out or REPO_ROOT / "benchmarks" / "results" / "tta")
        budget = a.budget if a.budget is not None else FULL.budget_s
        if a.quick:
            budget = a.budget if a.budget is not None else 1.0
        return tta.main(
            a.tta,
            a.part,
            a.bundle_fp32,
            Path(a.cache),
            budget,
            out,
            quick=a.quick,
            only=a.only,
            seed=a.seed,
            trunk_bundle=a.bundle_trunk,
        )

    plan = QUICK if a.quick else FULL
    changes: dict[str, Any] = {}
    if a.budget is not None:
        changes["budget_s"] = a.budget
    if a.steps is not None:
        changes.update(train_steps=a.steps, budget_s=None)
    for name in ("B", "q", "threads"):
        if getattr(a, name) is not None:
            changes[name] = getattr(a, name)
    if a.dev_rows is not None:
        changes["dev_rows"] = a.dev_rows
    if a.train_int4:
        changes["train_int4"] = True
    plan = replace(plan, **changes)
    default_out = "benchmarks/cache/results-quick" if a.quick else "benchmarks/results"
    out = Path(a.out or REPO_ROOT / default_out)
    out.mkdir(parents=True, exist_ok=True)
    args = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python -m benchmarks.run", *args])

    if a.report_from:
        try:
            res = json.loads(Path(a.report_from).read_text())
        except (OSError, ValueError) as e:
            _say(f"cannot read {a.report_from}: {e}")
            return 2
        command = res.get("command", command)
    else:
        res = run_all(plan, Path(a.cache), a.bundle_fp32, a.rebuild)
        res["command"] = command
    train_rows = {r.get("train_rows") for r in (res.get("train") or {}).values() if r}
    if len(train_rows) == 1:
        res["train_rows"] = train_rows.pop()
    res["ratios"] = headline(res)
    res["same_data"] = same_data(res)
    res["same_directions"] = same_directions(res)
    atomic_write_json(out / "results.json", res)
    pngs = plots(res, out)
    text = report(res, pngs, command)
    atomic_write_text(out / "results.md", text)
    print(text)
    _say(f"results in {out}")
    return 1 if res.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
