"""The benchmark suite in one command: zoo-ort against MeZO in PyTorch and first-order LoRA.

    python -m benchmarks.run            # SmolLM2-135M on SST-2, about 80 minutes on 2 cores
    python -m benchmarks.run --quick    # a tiny random model, a minute or two (CI)

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
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO_ROOT, machine_info, markdown_table, run_in_subprocess
from zoo_ort.io import atomic_write_json, atomic_write_text

ZOO = "benchmarks.zoo_bench"
TORCH = "benchmarks.torch_baselines:run_baseline"
TARGETS = {
    "speed_fp32": 1.4,
    "speed_int8": 3.0,
    "reach": 3.0,
    "rss_train_vs_infer": 1.2,
    "rss_vs_first_order": 0.5,
    "overhead": 0.03,
}


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
FULL = Plan(
    model="smollm2",
    B=16,
    q=1,
    lr_zo=1e-2,
    lr_fo=1e-3,
    eps=1e-2,
    dev_rows=300,
    train_limit=None,
    budget_s=600.0,
    train_steps=100_000,
    evals_per_run=10,
    zo_eval_every=20,
    prge_q=(1, 4, 8),
    prge_B=8,
    prge_steps=2,
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
        dict(
            bundle=bundles["fp32"],
            q_values=list(plan.prge_q),
            B=plan.prge_B,
            steps=plan.prge_steps,
            eps=plan.eps,
            seed=plan.seed,
            **data,
        ),
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
            B=plan.prge_B,
            steps=plan.signal_steps,
            eps=plan.eps,
            seed=plan.seed,
            **data,
        ),
    )
    # Inference on the same rows (memory reference, rows/s per base precision).
    res["forward"] = {}
    for precision, path in bundles.items():
        res["forward"][precision] = run(
            f"inference only ({precision})",
            f"{ZOO}:zoo_forward",
            dict(
                bundle=path,
                repeats=plan.forward_repeats,
                rss_steps=plan.rss_steps,
                dev_rows=plan.dev_rows,
                **same,
            ),
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
            dict(
                bundle=bundles[precision],
                lr=plan.lr_zo,
                eps=plan.eps,
                q=plan.q,
                seed=plan.seed,
                **zo_kw,
                **data,
            ),
        )
    res["train"]["first_order_torch"] = run(
        "first-order LoRA-FA in PyTorch (AdamW)",
        TORCH,
        dict(
            which="first_order",
            lr=plan.lr_fo,
            **fo_kw,
            **torch_common,
        ),
    )
    res["errors"] = run.errors
    res["load"] = run.load
    res["total_wall_s"] = time.perf_counter() - started
    return res


# --------------------------------------------------------------------------------------------
# Ratios and tables


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _best(curve: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    return max(curve, key=lambda c: (c["dev_acc"], -c["train_s"])) if curve else None


def time_to_reach(curve: Sequence[dict[str, Any]], acc: float) -> float | None:
    """Training seconds at the first evaluation whose dev accuracy is at least ``acc``."""
    for c in curve:
        if c["dev_acc"] >= acc - 1e-12:
            return float(c["train_s"])
    return None


def step_grid(a: dict[str, Any] | None, b: dict[str, Any] | None) -> int | None:
    """The step grid both runs were scored on (every K steps, no time grid), else None."""
    grids = {(_get(r, "config", "eval_every"), _get(r, "config", "eval_every_s")) for r in (a, b)}
    (every, every_s), *rest = grids
    return every if not rest and every and not every_s else None


def _same_step_row(res: dict[str, Any], best: dict[str, Any] | None) -> dict[str, Any] | None:
    """zoo-ort's (fp32) training time to MeZO-torch's best step, where both walked the same z.

    Read at equal steps, not on each side's own evaluation grid: only when the two g sequences
    agree (correlation >= 0.999), i.e. the trajectories are the same one.
    """
    d = same_directions(res)
    zoo = _get(res, "train", "zoo_fp32")
    if not d or d["corr"] is None or d["corr"] < 0.999 or not best or not zoo or not best["step"]:
        return None
    times = zoo.get("step_times_s") or []
    if len(times) < best["step"]:
        return None
    t_zoo = float(sum(times[: best["step"]]))
    r = _ratio(best["train_s"], t_zoo)
    return {
        "measure": f"time to MeZO-torch's best step ({best['step']}, {100 * best['dev_acc']:.1f}%) "
        "on the shared trajectory (fp32 base; same z, g corr >= 0.999)",
        "zoo-ort": f"{t_zoo:.0f} s",
        "reference": f"{best['train_s']:.0f} s",
        "ratio": _x(r),
        "target": "(context)",
        "met": "",
    }


def _met(value: float | None, target: float, higher_is_better: bool) -> str:
    if value is None:
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "yes" if ok else "no"


def _pct(x: float | None) -> str | None:
    return None if x is None else f"{100 * x:+.1f}%"


def _x(x: float | None) -> str | None:
    return None if x is None or math.isinf(x) else f"{x:.2f}x"


def _inference_rss(inf: dict[str, Any]) -> str:
    text = f"{inf['phase_peak_rss_mb']:.0f} MiB"
    steps = _get(inf, "config", "rss_steps")
    if steps and inf.get("step0_peak_rss_mb"):
        text += f" ({steps} steps' rows + dev; one batch: {inf['step0_peak_rss_mb']:.0f} MiB)"
    return text


def headline(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each as a ratio from this run."""
    tr = res.get("train", {})
    mezo = tr.get("mezo_torch")
    fo = tr.get("first_order_torch")
    rows: list[dict[str, Any]] = []
    for precision, key in (("fp32", "speed_fp32"), ("int8", "speed_int8"), ("int4", None)):
        zoo = tr.get(f"zoo_{precision}")
        if zoo is None:
            continue
        r = _ratio(_get(mezo, "median_step_s"), zoo["median_step_s"])
        rows.append(
            {
                "measure": f"steps/s vs MeZO-torch ({precision} base)",
                "zoo-ort": f"{zoo['median_step_s']:.3g} s/step",
                "reference": f"{mezo['median_step_s']:.3g} s/step" if mezo else None,
                "ratio": _x(r),
                "target": f">= {TARGETS[key]}x" if key else "(context)",
                "met": _met(r, TARGETS[key], True) if key else "",
            }
        )
    best = _best(_get(mezo, "curve") or [])
    start_acc = _get(mezo, "curve")[0]["dev_acc"] if _get(mezo, "curve") else None
    for precision in ("fp32", "int8", "int4"):
        zoo = tr.get(f"zoo_{precision}")
        if zoo is None or best is None:
            continue
        improved = start_acc is not None and best["dev_acc"] > start_acc
        t_zoo = time_to_reach(zoo["curve"], best["dev_acc"])
        t_ref = time_to_reach(mezo["curve"], best["dev_acc"])
        r = _ratio(t_ref, t_zoo) if improved else None
        if improved and t_zoo == 0:
            r = math.inf
        every = step_grid(mezo, zoo)
        grid = f"; both scored every {every} steps" if every else ""
        rows.append(
            {
                "measure": f"time to MeZO-torch's best dev acc {100 * best['dev_acc']:.1f}% "
                f"({precision} base{grid})",
                "zoo-ort": f"{t_zoo:.0f} s" if t_zoo is not None else "not reached",
                "reference": f"{t_ref:.0f} s" if t_ref is not None else None,
                "ratio": _x(r) if improved else "n/a (no gain over zero-shot)",
                "target": f">= {TARGETS['reach']}x sooner",
                "met": _met(r, TARGETS["reach"], True) if improved else "n/a",
            }
        )
    # The reading above also compares the two engines' rounding on borderline dev examples
    # (one example flips the threshold); this one compares the same point of the trajectory.
    step_row = _same_step_row(res, best)
    if step_row:
        rows.append(step_row)
    for precision in ("fp32", "int8"):
        z = tr.get(f"zoo_{precision}")
        if z and fo:
            a, b = z["curve"][-1]["dev_acc"], fo["curve"][-1]["dev_acc"]
            rows.append(
                {
                    "measure": f"dev acc after the same training budget, vs first-order torch "
                    f"({precision} base)",
                    "zoo-ort": f"{100 * a:.1f}%",
                    "reference": f"{100 * b:.1f}%",
                    "ratio": f"{100 * (a - b):+.1f} pts",
                    "target": "(context)",
                    "met": "",
                }
            )
    for precision in ("fp32", "int8"):
        z, inf = tr.get(f"zoo_{precision}"), _get(res, "forward", precision)
        if z and inf:
            r = _ratio(z["phase_peak_rss_mb"], inf["phase_peak_rss_mb"])
            rows.append(
                {
                    "measure": f"peak RSS, training / inference on the same rows ({precision})",
                    "zoo-ort": f"{z['phase_peak_rss_mb']:.0f} MiB",
                    "reference": _inference_rss(inf),
                    "ratio": _x(r),
                    "target": f"<= {TARGETS['rss_train_vs_infer']}x",
                    "met": _met(r, TARGETS["rss_train_vs_infer"], False),
                }
            )
    for precision in ("fp32", "int8"):
        z = tr.get(f"zoo_{precision}")
        if z and fo:
            r = _ratio(z["phase_peak_rss_mb"], fo["phase_peak_rss_mb"])
            rows.append(
                {
                    "measure": f"peak RSS while training vs first-order torch ({precision})",
                    "zoo-ort": f"{z['phase_peak_rss_mb']:.0f} MiB",
                    "reference": f"{fo['phase_peak_rss_mb']:.0f} MiB",
                    "ratio": _x(r),
                    "target": f"<= {TARGETS['rss_vs_first_order']}x",
                    "met": _met(r, TARGETS["rss_vs_first_order"], False),
                }
            )
    for precision, ovh in (res.get("overhead") or {}).items():
        if not ovh:
            continue
        own, own_ms = ovh.get("own_overhead"), _ms(ovh.get("median_own_s"))
        rows.append(
            {
                "measure": f"trainer's own work per step vs a bare ORT forward of the same rows "
                f"({precision}; step time minus its ORT runs, median)",
                "zoo-ort": f"{own_ms} ms" if own_ms else None,
                "reference": f"{ovh['median_ort_s']:.3g} s",
                "ratio": _pct(own),
                "target": f"<= +{100 * TARGETS['overhead']:.0f}%",
                "met": _met(own, TARGETS["overhead"], False),
            }
        )
        rows.append(
            {
                "measure": f"trainer step vs bare ORT forward of the same rows ({precision}, "
                "median of paired ratios; the forwards' own noise is in it)",
                "zoo-ort": f"{ovh['median_step_s']:.3g} s",
                "reference": f"{ovh['median_ort_s']:.3g} s",
                "ratio": _pct(ovh["median_paired_overhead"]),
                "target": "(context)",
                "met": "",
            }
        )
    return rows


TRAIN_LABELS = {
    "mezo_torch": "MeZO-style ZO, PyTorch eager",
    "zoo_fp32": "zoo-ort P-RGE, fp32 base",
    "zoo_int8": "zoo-ort P-RGE, int8 base",
    "zoo_int4": "zoo-ort P-RGE, int4 base",
    "first_order_torch": "first-order LoRA-FA + AdamW, PyTorch",
}


def training_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    mezo_step = _get(res, "train", "mezo_torch", "median_step_s")
    for key, r in (res.get("train") or {}).items():
        if not r:
            rows.append({"contender": TRAIN_LABELS.get(key, key), "steps": "failed"})
            continue
        curve = r["curve"]
        best = _best(curve)
        evals = sum(c.get("eval_s", 0.0) for c in curve)
        rows.append(
            {
                "contender": TRAIN_LABELS.get(key, key),
                "steps": r["steps_done"],
                "rows/step": r["rows_per_step"],
                "median step s": r["median_step_s"],
                "step speed vs MeZO-torch": _x(_ratio(mezo_step, r["median_step_s"])),
                "train s": r["train_s"],
                "dev acc start": curve[0]["dev_acc"],
                "dev acc best": best["dev_acc"] if best else None,
                "dev acc end": curve[-1]["dev_acc"],
                "train peak RSS MiB": r.get("phase_peak_rss_mb"),
                "process peak RSS MiB": r.get("peak_rss_mb"),
                "eval s (off clock)": evals,
            }
        )
    return rows


def prge_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    prge = res.get("prge")
    if not prge:
        return []
    return [
        {
            "q": r["q"],
            "B": r["B"],
            "rows/step": r["rows_per_step"],
            "batched: forwards": r["forwards_batched"],
            "sequential: forwards": r["forwards_sequential"],
            "batched s": r["batched_s"],
            "sequential s": r["sequential_s"],
            "batched speedup": _x(r["speedup"]),
            "max |g diff|": r["g_max_abs_diff"],
        }
        for r in prge["rows"]
    ]


def precision_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    fwd = res.get("forward") or {}
    base = _get(fwd, "fp32", "rows_per_s")
    base_train = _get(res, "train", "zoo_fp32", "rows_per_s")
    for precision in ("fp32", "int8", "int4"):
        f = fwd.get(precision)
        if precision not in _get(res, "bundles", "bundles") or {}:
            err = _get(res, "bundles", "errors", precision)
            if err:
                rows.append({"base": precision, "forward rows/s": f"not built: {err[:80]}"})
            continue
        t = _get(res, "train", f"zoo_{precision}")
        rows.append(
            {
                "base": precision,
                "forward rows/s": _get(f, "rows_per_s"),
                "vs fp32": _x(_ratio(_get(f, "rows_per_s"), base)),
                "training rows/s": _get(t, "rows_per_s"),
                "training vs fp32": _x(_ratio(_get(t, "rows_per_s"), base_train)),
                "zero-shot dev acc": _get(f, "zero_shot", "dev_acc"),
                "dev acc after budget": t["curve"][-1]["dev_acc"] if t else None,
                "inference peak RSS MiB": _get(f, "phase_peak_rss_mb"),
                "one batch's peak RSS MiB": _get(f, "step0_peak_rss_mb"),
                "graph + weights MiB": _bundle_mb(_get(res, "bundles", "bundles", precision)),
            }
        )
    t = _get(fwd, "torch")
    if t:
        rows.append(
            {
                "base": "PyTorch eager fp32 (B rows)",
                "forward rows/s": t["rows_per_s"],
                "vs fp32": _x(_ratio(t["rows_per_s"], base)),
                "inference peak RSS MiB": t.get("phase_peak_rss_mb"),
            }
        )
    return rows


def signal_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    sig = res.get("quant_signal") or {}
    return [
        {
            "base": r["base"],
            "g corr vs fp32": f"{r['g_corr_vs_fp32']:.3f}",
            "g rel. error vs fp32": f"{r['g_rel_err_vs_fp32']:.2f}",
            "largest row-loss change": f"{r['max_loss_change']:.3f}",
            "forward s (2B rows)": r["forward_s"],
            "forward vs fp32": _x(r["speedup_vs_fp32"]),
        }
        for r in sig.get("rows", [])
    ]


def _bundle_mb(path: str | None) -> float | None:
    if not path or not Path(path).is_dir():
        return None
    return sum(p.stat().st_size for p in Path(path).glob("model.onnx*")) / 2**20


def overhead_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for precision, r in (res.get("overhead") or {}).items():
        if not r:
            continue
        rows.append(
            {
                "base": precision,
                "rows/step": r["rows_per_step"],
                "timed steps": len(r["step_times_s"]) - 1,
                "trainer step s (median)": r["median_step_s"],
                "bare ORT runs s (median, same forwards)": r["median_ort_s"],
                "overhead (medians)": _pct(r["overhead"]),
                "overhead (paired median)": _pct(r["median_paired_overhead"]),
                "trainer's own work ms/step (outside ORT)": _ms(r.get("median_own_s")),
                "own work / bare forward": _pct(r.get("own_overhead")),
                "forwards/step (length groups)": _forwards(r.get("forwards_per_step")),
                "one padded forward s (median)": r.get("median_single_forward_s"),
                "length grouping speedup": _x(r.get("grouping_speedup")),
            }
        )
    return rows


def _ms(seconds: float | None) -> str | None:
    return None if seconds is None else f"{1e3 * seconds:.1f}"


def _forwards(counts: Sequence[int] | None) -> str | None:
    if not counts:
        return None
    return f"{min(counts)}-{max(counts)}" if min(counts) != max(counts) else str(counts[0])


def same_data_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, r in (res.get("train") or {}).items():
        if r:
            rows.append(
                {
                    "contender": TRAIN_LABELS.get(key, key),
                    "train rows": r.get("train_rows"),
                    "train tokens sha": r.get("train_tokens_sha"),
                    "dev tokens sha": r.get("dev_tokens_sha"),
                    "threads": r.get("threads"),
                }
            )
    return rows


def same_data(res: dict[str, Any]) -> bool:
    rows = same_data_rows(res)
    return bool(rows) and all(
        (r["train tokens sha"], r["dev tokens sha"])
        == (rows[0]["train tokens sha"], rows[0]["dev tokens sha"])
        for r in rows
    )


def same_directions(res: dict[str, Any]) -> dict[str, Any] | None:
    """How closely MeZO-torch's projected gradients follow zoo-ort's (fp32) step by step.

    Both draw zoo-ort's directions on the same rows, so step 1 (same θ) must agree to float
    precision; later steps drift apart only as the two parameter trajectories do.
    """
    a = _get(res, "train", "mezo_torch", "projected_grads")
    b = _get(res, "train", "zoo_fp32", "projected_grads")
    if not a or not b or _get(res, "train", "mezo_torch", "config", "directions") != "zoo":
        return None
    n = min(len(a), len(b))
    x, y = np.asarray(a[:n], float).ravel(), np.asarray(b[:n], float).ravel()
    first_a, first_b = np.asarray(a[0], float), np.asarray(b[0], float)
    scale = max(float(np.abs(first_a).max()), 1e-12)
    corr = float(np.corrcoef(x, y)[0, 1]) if x.size > 1 and x.std() and y.std() else None
    return {
        "steps": n,
        "first_step_rel_diff": float(np.abs(first_a - first_b).max()) / scale,
        "corr": corr,
        **_scored_alike(res),
    }


def _scored_alike(res: dict[str, Any]) -> dict[str, Any]:
    """At the steps both ZO trainers scored: how many dev accuracies are equal, and the largest
    difference in dev rows (same parameters up to float rounding, two engines)."""
    curves = [_get(res, "train", k, "curve") or [] for k in ("mezo_torch", "zoo_fp32")]
    accs = [{c["step"]: c["dev_acc"] for c in curve} for curve in curves]
    common = sorted(set(accs[0]) & set(accs[1]))
    rows = _get(res, "plan", "dev_rows") or 0
    diffs = [round(abs(accs[0][s] - accs[1][s]) * rows) for s in common]
    return {
        "scored_steps": len(common),
        "scored_equal": sum(d == 0 for d in diffs),
        "max_diff_dev_rows": max(diffs, default=0),
    }


def _directions_line(res: dict[str, Any]) -> str:
    d = res.get("same_directions")
    if not d:
        return "MeZO-torch draws its own directions (torch.randn)."
    corr = f"{d['corr']:.4f}" if d["corr"] is not None else "n/a"
    return (
        "MeZO-torch draws zoo-ort's directions, so both walk the same z: the first step's "
        f"g differ by {100 * d['first_step_rel_diff']:.3f}% (relative), and g correlate at "
        f"{corr} over the {d['steps']} steps both ran."
        + _scored_alike_text(d, _get(res, "plan", "dev_rows"))
    )


def _scored_alike_text(d: dict[str, Any], dev_rows: int | None) -> str:
    if not d.get("scored_steps"):
        return ""
    return (
        f" At the {d['scored_steps']} steps both scored, dev accuracy is equal at "
        f"{d['scored_equal']} and differs by at most {d['max_diff_dev_rows']} of {dev_rows} rows "
        "(two engines' float rounding on borderline examples)."
    )


def machine_line(m: dict[str, Any]) -> str:
    v = m.get("versions", {})
    ram = m.get("ram_total_mb")
    return (
        f"{m.get('cpu_model')}, {m.get('cpu_count')} cores"
        f"{f', {ram / 1024:.0f} GiB RAM' if ram else ''}, {m.get('os')}; Python {m.get('python')}, "
        + ", ".join(f"{k} {val}" for k, val in v.items() if val)
    )


def load_line(res: dict[str, Any]) -> str:
    loads = [x for r in res.get("load", []) for x in (r["before"], r["after"]) if x is not None]
    if not loads:
        return ""
    cores = res["machine"].get("cpu_count") or 1
    line = f"1-minute load average around the contenders: {min(loads):.1f} to {max(loads):.1f}"
    # A contender itself keeps about `cores` threads busy; more than that is someone else.
    if max(loads) > cores + 0.5:
        line += (
            f" on {cores} cores: **other work shared the CPU during this run, so absolute "
            "times and the ratios between contenders run minutes apart are noisy**"
        )
    return line + "."


def tables(res: dict[str, Any]) -> list[tuple[str, str]]:
    """``(title, markdown table)`` pairs, in report order."""
    out = [
        ("Targets (ratios from this run)", headline(res)),
        ("Training under the same wall-clock budget", training_rows(res)),
        ("P-RGE: one forward of 2qB rows vs 2q forwards of B rows", prge_rows(res)),
        ("Base precision", precision_rows(res)),
        ("Trainer overhead", overhead_rows(res)),
        ("Quantized bases and the ZO signal", signal_rows(res)),
        ("Same data on every side", same_data_rows(res)),
    ]
    return [(title, markdown_table(rows)) for title, rows in out if rows]


# --------------------------------------------------------------------------------------------
# Plots


def _smooth(values: Sequence[float], width: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= width:
            acc -= values[i - width]
        out.append(acc / min(i + 1, width))
    return out


def plots(res: dict[str, Any], out: Path) -> list[str]:
    """accuracy.png, loss.png, memory.png in ``out``; returns the file names written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    import io

    written = []
    train = {k: v for k, v in (res.get("train") or {}).items() if v}

    def save(fig: Any, name: str) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        from zoo_ort.io import atomic_write_bytes

        atomic_write_bytes(out / name, buf.getvalue())
        written.append(name)

    if train:
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        for key, r in train.items():
            xs = [c["train_s"] for c in r["curve"]]
            ax.plot(
                xs, [100 * c["dev_acc"] for c in r["curve"]], marker="o", label=TRAIN_LABELS[key]
            )
        ax.set_xlabel("training time, s (evaluation excluded)")
        ax.set_ylabel(f"dev accuracy, % (first {res['plan']['dev_rows']} rows)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("SST-2 dev accuracy vs wall-clock training time")
        fig.tight_layout()
        save(fig, "accuracy.png")

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for key, r in train.items():
            times, total = [], 0.0
            for t in r["step_times_s"]:
                total += t
                times.append(total)
            width = max(1, len(times) // 20)
            a1.plot(times, _smooth(r["train_loss"], width), label=TRAIN_LABELS[key])
            a2.plot(
                [c["train_s"] for c in r["curve"]],
                [c["dev_loss"] for c in r["curve"]],
                marker="o",
                label=TRAIN_LABELS[key],
            )
        a1.set_title("training loss (moving average)")
        a2.set_title("dev loss (candidate cross-entropy)")
        for a in (a1, a2):
            a.set_xlabel("training time, s")
            a.grid(alpha=0.3)
        a2.legend(fontsize=7)
        fig.tight_layout()
        save(fig, "loss.png")

    bars: list[tuple[str, float, str]] = []
    for key, r in train.items():
        if r.get("phase_peak_rss_mb"):
            bars.append((TRAIN_LABELS[key] + ": training", r["phase_peak_rss_mb"], "C0"))
    for precision, r in (res.get("forward") or {}).items():
        if r and r.get("phase_peak_rss_mb"):
            label = "PyTorch eager" if precision == "torch" else f"zoo-ort {precision} base"
            bars.append((f"{label}: inference", r["phase_peak_rss_mb"], "C2"))
    if bars:
        fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(bars) + 1.2))
        names = [b[0] for b in bars]
        ax.barh(range(len(bars)), [b[1] for b in bars], color=[b[2] for b in bars])
        ax.set_yticks(range(len(bars)), names, fontsize=8)
        ax.invert_yaxis()
        for i, b in enumerate(bars):
            ax.text(b[1], i, f" {b[1]:.0f}", va="center", fontsize=8)
        ax.set_xlabel("peak RSS, MiB (training or inference phase, model included)")
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        save(fig, "memory.png")
    return written


# --------------------------------------------------------------------------------------------
# Report


def report(res: dict[str, Any], pngs: Sequence[str], command: str) -> str:
    plan = res["plan"]
    model = "SmolLM2-135M-Instruct" if plan["model"] == "smollm2" else "a tiny random Qwen2"
    budget = (
        f"{plan['budget_s']:.0f} s of training clock per contender"
        if plan["budget_s"]
        else f"{plan['train_steps']} steps per contender"
    )
    lines = [
        "# zoo-ort benchmarks",
        "",
        f"`{command}` -- {model} on SST-2 (train {res.get('train_rows', 'all')} rows, dev first "
        f"{plan['dev_rows']}), LoRA-FA r=8 alpha=16 on q_proj/v_proj, q={plan['q']}, "
        f"B={plan['B']}, ZO lr {plan['lr_zo']} eps {plan['eps']}, first-order AdamW lr "
        f"{plan['lr_fo']}; {budget}; {plan['threads']} threads for ORT and torch.",
        "",
        f"Machine: {machine_line(res['machine'])}. Taken {res['machine'].get('time_utc')}, "
        f"total {res.get('total_wall_s', 0) / 60:.1f} min. {load_line(res)}",
        "",
        "Same prompt, label words, loss, initial adapter and training rows on every side: "
        + ("token hashes match." if same_data(res) else "**token hashes differ, see below**.")
        + " "
        + _directions_line(res),
        "",
    ]
    for title, table in tables(res):
        lines += [f"## {title}", "", table]
    if pngs:
        lines += ["## Plots", ""] + [f"![{p[:-4]}]({p})" for p in pngs] + [""]
    if res.get("errors"):
        lines += ["## Failures", ""]
        lines += [f"- {k}: `{v.splitlines()[-1] if v else ''}`" for k, v in res["errors"].items()]
        lines += [""]
    return "\n".join(lines)


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
    a = p.parse_args(argv)

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
    train_rows = {_get(r, "train_rows") for r in (res.get("train") or {}).values() if r}
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
