"""Federated vs centralised zoo-ort at equal forward work (issue 17's measurement).

For each Dirichlet α: a federation of ``--clients`` clients (``--per-round`` per round, ``--rounds``
rounds of ``--local-steps`` local steps), then centralised ``zoo-ort train`` with the same batch
size for as many steps as the federation's clients ran in total (equal rows forwarded). Writes
``results.json``, ``federated.png`` (dev accuracy against rounds and against rows forwarded) and
``table.md`` under ``--out``.

The real measurement (SmolLM2-135M-Instruct bundle, SST-2)::

    python -m benchmarks.federated --bundle BUNDLE --data sst2 --task sst2 --clients 10 \\
        --per-round 10 --rounds 50 --local-steps 10 --alphas 0.5 100 --out runs/fed-sst2

The smoke run (tiny random model, shipped sentiment set; minutes on two cores)::

    python -m benchmarks.federated --tiny --out /tmp/fed-tiny
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path
from typing import Any

from benchmarks.common import add_train_flags, tiny_llama_bundle
from zoo_ort.io import atomic_write_bytes, atomic_write_text

TRAIN_FLAGS = ("lr", "eps", "batch_size", "queries", "eval_rows", "max_length", "seed")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--data", default="sentiment")
    ap.add_argument("--task", default=None)
    ap.add_argument("--tiny", action="store_true", help="build a tiny random bundle and use it")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=None, help="default: all clients")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5, 100.0])
    add_train_flags(ap)
    ap.add_argument("--eval-every", type=int, default=1, help="rounds between evaluations")
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    bundle = tiny_llama_bundle("zoo-fed-tiny-") if a.tiny else a.bundle
    if bundle is None:
        ap.error("--bundle or --tiny")
    per_round = a.per_round or a.clients
    a.out.mkdir(parents=True, exist_ok=True)
    flags = {k: getattr(a, k) for k in TRAIN_FLAGS} | {"data": a.data, "task": a.task}
    from benchmarks.common import machine_info

    results: dict[str, Any] = {"config": {k: str(v) for k, v in vars(a).items()}, "runs": {}}
    results["machine"] = machine_info()  # CPU model and flags with every result
    for alpha in a.alphas:
        results["runs"][f"fed-a{alpha:g}"] = _federated(a, bundle, flags, alpha, per_round)
    central_steps = a.rounds * per_round * a.local_steps  # the clients' steps, all together
    every = max(per_round * a.local_steps * a.eval_every, 1)
    results["runs"]["central"] = _central(a, bundle, flags, central_steps, every)
    atomic_write_text(a.out / "results.json", json.dumps(results, indent=1, default=str))
    table = _table(results)
    atomic_write_text(a.out / "table.md", table)
    _plot(results, a.out / "federated.png")
    print(table)
    return results


def _settings(bundle: Path, flags: dict[str, Any], out: Path, **more: Any):
    from zoo_ort.app.wiring import resolve

    return resolve(bundle, {**flags, **more, "out": str(out)}).settings


def _federated(a: Any, bundle: Path, flags: dict, alpha: float, per_round: int) -> dict:
    from zoo_ort.loop.metrics import read_metrics
    from zoo_ort.scale.federated import federate

    out = a.out / f"fed-a{alpha:g}"
    s = _settings(bundle, flags, out)
    summary = federate(
        s,
        clients=a.clients,
        per_round=per_round,
        rounds=a.rounds,
        local_steps=a.local_steps,
        alpha=alpha,
        eval_every=a.eval_every,
        num_cpus=a.num_cpus,
        resume=(out / "checkpoints").exists(),
    )
    records = read_metrics(out)
    rows, curve = 0, []
    for r in records:
        if r.get("kind") == "round":
            rows += int(r.get("rows", 0))
        if r.get("eval"):
            curve.append({"round": r.get("round", 0), "rows": rows, **r["eval"]})
    rounds = [r for r in records if r.get("kind") == "round"]
    return {
        "curve": curve,
        "bytes_up": max(r["bytes_up_mean"] for r in rounds),
        "bytes_down": max(r["bytes_down_mean"] for r in rounds),
        "bytes_down_first": rounds[0]["bytes_down_mean"],
        "rows": rows,
        "seconds": summary["result"]["seconds"],
    }


def _central(a: Any, bundle: Path, flags: dict, steps: int, every: int) -> dict:
    from zoo_ort.app.wiring import train_run
    from zoo_ort.loop.metrics import read_metrics

    out = a.out / "central"
    s = _settings(bundle, flags, out, steps=steps, eval_every=every, save_every=every)
    summary = train_run(s, resume=(out / "checkpoints").exists())
    rows, curve = 0, []
    for r in read_metrics(out):
        rows += int(r.get("rows", 0))  # step records only: evaluation records have none
        if r.get("eval"):
            curve.append({"step": r["step"], "rows": rows, **r["eval"]})
    return {"curve": curve, "rows": rows, "steps": summary["result"].step}


def _table(results: dict) -> str:
    lines = [
        "| run | rows forwarded | final dev accuracy | best dev accuracy | bytes up / down "
        "per client per round |",
        "|---|---|---|---|---|",
    ]
    for name, run in results["runs"].items():
        accs = [c.get("accuracy") for c in run["curve"] if c.get("accuracy") is not None]
        final = f"{accs[-1]:.3f}" if accs else "-"
        best = f"{max(accs):.3f}" if accs else "-"
        io = f"{run['bytes_up']:.0f} / {run['bytes_down']:.0f}" if "bytes_up" in run else "-"
        lines.append(f"| {name} | {run['rows']} | {final} | {best} | {io} |")
    return "\n".join(lines) + "\n"


def _plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (by_round, by_rows) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in results["runs"].items():
        pts = [c for c in run["curve"] if c.get("accuracy") is not None]
        xs = [c["rows"] for c in pts]
        ys = [c["accuracy"] for c in pts]
        by_rows.plot(xs, ys, "o-", ms=3, label=name)
        if name != "central":
            by_round.plot([c["round"] for c in pts], ys, "o-", ms=3, label=name)
    by_round.set_xlabel("round")
    by_rows.set_xlabel("rows forwarded (all clients)")
    for ax in (by_round, by_rows):
        ax.set_ylabel("dev accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    plt.close(fig)


if __name__ == "__main__":
    main()
