"""Ray workers: zoo-ort's bytes per step per worker, Ray's overhead per step, and scaling.

Runs a small random Llama (exported here unless ``--bundle`` is given) for a few steps as one
process with 2 ORT threads, and as 2 Ray workers with 1 thread each (sharing by query and by
example), on a local Ray cluster. Step times are medians after warm-up; Ray's overhead is a
step's driver wall time minus the slowest worker's own time, and the round trip of an empty
actor call. Numbers, not assertions: ``python -m benchmarks.ray_scaling [--out F.json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine_info
from zoo_ort.app.wiring import resolve, train_run
from zoo_ort.io import load_tensors
from zoo_ort.loop.metrics import read_metrics
from zoo_ort.scale.ray_workers import import_ray, train_with_workers

WARMUP = 2


def _bundle(folder: Path, hidden: int, layers: int) -> Path:
    from zoo_ort.exporters import export_bundle
    from zoo_ort.exporters.tiny import make_tiny_model

    src = make_tiny_model("llama", folder / "src", hidden=hidden, layers=layers)
    return export_bundle(str(src), folder / "bundle", rank=8, mode="fa", seed=0)


def _same_adapter(a: Path, b: Path) -> bool:
    ta = load_tensors(a / "final" / "adapter_model.safetensors")
    tb = load_tensors(b / "final" / "adapter_model.safetensors")
    return all(np.array_equal(ta[k], tb[k]) for k in ta)


def _noop_round_trip_s(ray, workers: int, calls: int = 50) -> float:
    @ray.remote(num_cpus=1)
    class Noop:
        def step(self, header):
            return None

    actors = [Noop.remote() for _ in range(workers)]
    ray.get([a.step.remote(None) for a in actors])
    t0 = time.perf_counter()
    for _ in range(calls):
        ray.get([a.step.remote((None, 0, False)) for a in actors])
    dt = (time.perf_counter() - t0) / calls
    for a in actors:
        ray.kill(a)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle", help="an exported bundle (default: a random Llama built here)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--queries", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    ray = import_ray()
    tmp = Path(tempfile.mkdtemp(prefix="zoo-ray-bench-"))
    bundle = Path(args.bundle) if args.bundle else _bundle(tmp, args.hidden, args.layers)
    flags = dict(data="sentiment", steps=args.steps, queries=args.queries, eval_every=0)
    flags |= dict(batch_size=args.batch_size, eval_rows=16, eval_at_start=False, save_every=0)

    def settings(name: str, threads: int):
        return resolve(bundle, flags | {"out": str(tmp / name), "threads": threads}).settings

    single = tmp / "single"
    train_run(settings("single", 2))
    times = [r["step_time"] for r in read_metrics(single) if r.get("kind") == "step"]
    out: dict = {
        "machine": machine_info(),
        "bundle": str(bundle),
        "config": flags | {"hidden": args.hidden, "layers": args.layers},
        "single_1x2_step_s": statistics.median(times[WARMUP:]),
    }
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out["ray_noop_round_trip_s"] = _noop_round_trip_s(ray, 2)
        for share in ("query", "example"):
            res = train_with_workers(
                settings(share, 2), workers=2, share=share, worker_threads=1, digest_every=10
            )
            report = res["workers"]
            walls = [s["wall_s"] for s in _stats(res)][WARMUP:]
            over = [s["wall_s"] - s["worker_s"] for s in _stats(res)][WARMUP:]
            out[share] = {
                "workers_2x1_step_s": statistics.median(walls),
                "ray_overhead_per_step_s": statistics.median(over),
                "zoo_sent_bytes_per_worker_step": report["sent_bytes"],
                "zoo_received_bytes_per_worker_step": report["received_bytes"],
                "speedup_vs_single": out["single_1x2_step_s"] / statistics.median(walls),
                "adapter_bit_identical_to_single": _same_adapter(single, tmp / share),
            }
    finally:
        ray.shutdown()
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def _stats(res: dict) -> list[dict]:
    return res["workers"]["per_step"]


if __name__ == "__main__":
    main()
