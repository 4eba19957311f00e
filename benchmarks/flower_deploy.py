"""A federation on Flower's deployment engine, on this machine: 1 SuperLink, N SuperNodes.

Starts ``flower-superlink`` and ``--nodes`` ``flower-supernode`` processes on 127.0.0.1 (free
ports, insecure HTTP), submits the shipped app (``zoo_ort/scale/flower_app``) with ``flwr run``,
waits for ``--rounds`` rounds, checks that every client rebuilt the server's final adapter
(same digest), and stops every process, also on failure (see :func:`zoo_ort.scale.fl_deploy.
run_local`). The tiny random bundle and the shipped sentiment set (a minute on two cores)::

    python -m benchmarks.flower_deploy --tiny --out /tmp/fl-deploy

A real bundle::

    python -m benchmarks.flower_deploy --bundle BUNDLE --data sst2 --task sst2 --nodes 2 \\
        --rounds 2 --local-steps 2 --out runs/fl-deploy
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from benchmarks.common import add_train_flags, tiny_llama_bundle

TRAIN_FLAGS = ("lr", "eps", "batch_size", "queries", "eval_rows", "max_length", "seed")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--tiny", action="store_true", help="build a tiny random bundle and use it")
    ap.add_argument("--data", default="sentiment")
    ap.add_argument("--task", default=None)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--local-steps", type=int, default=1)
    ap.add_argument("--alpha", type=float, default=0.5)
    add_train_flags(ap)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run")
    ap.add_argument("--keep-home", action="store_true", help="keep FLWR_HOME and the logs")
    ap.add_argument("--out", type=Path, required=True, help="the server's run folder")
    a = ap.parse_args(argv)
    for k, v in {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}.items():
        os.environ.setdefault(k, v)
    from zoo_ort.scale.fl_deploy import run_local

    bundle = tiny_llama_bundle("zoo-fl-deploy-tiny-") if a.tiny else a.bundle
    if bundle is None:
        ap.error("--bundle or --tiny")
    settings = {k: getattr(a, k) for k in TRAIN_FLAGS if getattr(a, k) is not None}
    if a.tiny:
        settings = {"batch_size": 4, "lr": 0.05, "eval_rows": 16, "max_length": 64} | settings
    res = run_local(
        bundle,
        a.data,
        a.out,
        nodes=a.nodes,
        rounds=a.rounds,
        local_steps=a.local_steps,
        settings=settings,
        task=a.task,
        alpha=a.alpha,
        timeout=a.timeout,
        keep_home=a.keep_home,
    )
    summary = {
        "run_id": res["run_id"],
        "status": res["status"],
        "rounds": len(res["rounds"]),
        "step": res["step"],
        "final_digest": res["digest"],
        "client_digests": res["sync"]["client_digests"],
        "seconds": round(res["seconds"], 1),
        "out": str(res["out"]),
    }
    print(json.dumps(summary, indent=1))
    return res


if __name__ == "__main__":
    main()
