"""Trunk + head bundles (``lora_layers``) where they should pay: dev scoring with and without the
trunk cache, and few-shot training against all-layer LoRA at equal wall time.

    python -m benchmarks.trunk_cache dev   --split B1 --one B2 [--all B3] [--dev-rows 872]
    python -m benchmarks.trunk_cache train --split B1 --all B3 --shots 512 --budget-s 3600
    python -m benchmarks.trunk_cache equal --split B1 --one B2

``B1`` is exported with ``lora_layers`` (two graphs), ``B2`` with the same ``lora_layers`` and
``split=False`` (one graph, the reference), ``B3`` a default all-layer bundle. For SmolLM2::

    zoo_ort.exporters.export_bundle("smollm2-135m", "B1", lora_layers=(20, 30))

*dev*: the SST-2 dev set scored ``--passes`` times with the initial adapter (as every
evaluation of a run does) by the one-graph bundle (``OrtEngine``), the trunk + head bundle
without a cache and with one; per pass its seconds, and the process RSS after it (the cache is
in that memory). *train*: MeZO's few-shot setting (``--shots`` examples per class, drawn with
the seed, revisited for many epochs), each contender training for ``--budget-s`` seconds of
wall time (evaluations off the clock) and then scored on the dev set. *equal*: the largest
per-row difference between the two bundles on dev rows under a random per-row adapter.
Results are printed as JSON with :func:`benchmarks.common.machine_info`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import DATA_DIR, current_rss_mb, machine_info

DEFAULT_CACHE_MB = 1024.0
# train: both contenders get these (not each bundle's recipe, which differ between exports made
# at different times): P-RGE as MeZO's few-shot runs use it, constant lr so that the contender
# doing more steps is not also given a different schedule.
PINNED_TRAINING: dict[str, Any] = {
    "estimator": "batched",
    "queries": 1,
    "batch_size": 16,
    "lr": 1e-2,
    "eps": 1e-2,
    "schedule": "constant",
    "warmup": 0,
    "steps": 10**9,
}


def _assignments(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as settings values (JSON where it parses, else the string)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set needs KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text
    return out


def _settings(bundle: str, data: str, **values: Any) -> Any:
    """SST-2 with zoo-ort's ``sst2`` task and MeZO's candidate loss (as the main benchmark)."""
    from zoo_ort.settings import settings

    defaults: dict[str, Any] = {
        "task": "sst2",
        "loss": "candidates",
        "estimator": "batched",
        "save_every": 0,
        "threads": os.cpu_count() or 1,
    }
    return settings(bundle=str(bundle), data=str(data), **(defaults | values))


def _engine(bundle_path: str, threads: int, cache_mb: float | None) -> Any:
    """OrtEngine for a one-graph bundle; TrunkEngine (cache of ``cache_mb``) for two graphs."""
    from zoo_ort.bundle import load_bundle
    from zoo_ort.engine.ort import OrtEngine
    from zoo_ort.engine.trunk import TrunkEngine

    bundle = load_bundle(bundle_path)
    if bundle.manifest.trunk is None:
        return OrtEngine(bundle, threads=threads)
    return TrunkEngine(bundle, threads=threads, trunk_cache_mb=cache_mb or 0.0)


def _prepare(bundle: str, data: str, engine: Any, **values: Any) -> Any:
    from zoo_ort.app.wiring import prepare

    return prepare(_settings(bundle, data, **values), engine=engine)


def _cache_figures(engine: Any) -> dict[str, Any]:
    cache = getattr(engine, "cache", None)
    if cache is None:
        return {}
    return {
        "trunk_rows": engine.trunk_rows,
        "cache_mb": cache.nbytes / 2**20,
        "cache_hits": cache.hits,
        "cache_misses": cache.misses,
    }


def dev_scoring(
    split: str,
    one: str | None = None,
    all_layers: str | None = None,
    *,
    dev_rows: int = 0,
    passes: int = 3,
    batch: int = 32,
    threads: int | None = None,
    cache_mb: float = DEFAULT_CACHE_MB,
    data: str = str(DATA_DIR / "sst2"),
    only: str | None = None,
) -> list[dict[str, Any]]:
    """Seconds and RSS of ``passes`` dev evaluations per contender (initial adapter); ``only``
    (a contender's name) runs that one alone, so that its RSS is its own process's."""
    threads = threads or os.cpu_count() or 1
    contenders: list[tuple[str, str, float | None]] = []
    if all_layers:
        contenders.append(("one graph, all layers", all_layers, None))
    if one:
        contenders.append(("one graph, same layers", one, None))
    contenders += [("trunk + head, no cache", split, 0.0), ("trunk + head, cache", split, cache_mb)]
    if only is not None:
        contenders = [c for c in contenders if c[0] == only]
        if not contenders:
            raise SystemExit(f"no contender named {only!r}")
    results = []
    for name, path, mb in contenders:
        engine = _engine(path, threads, mb)
        p = _prepare(path, data, engine, eval_rows=dev_rows, eval_batch_size=batch)
        lora = {**p.frozen, **p.params}
        times, rss, accuracy = [], [], None
        for _ in range(passes):
            t0 = time.perf_counter()
            metrics = p.evaluate(lora)
            times.append(time.perf_counter() - t0)
            rss.append(current_rss_mb())
            accuracy = metrics["accuracy"]
        results.append(
            {
                "contender": name,
                "bundle": path,
                "dev_rows": metrics["examples"],
                "pass_s": times,
                "rss_mb_after_pass": rss,
                "dev_acc": accuracy,
                **_cache_figures(engine),
            }
        )
        del p, engine
    return results


def few_shot_data(shots: int, seed: int, out: Path, data: Path = DATA_DIR / "sst2") -> Path:
    """A data folder with ``shots`` training examples per class (drawn with ``seed``) and the
    full dev set: MeZO's k-shot setting."""
    with (data / "train.tsv").open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    rng = np.random.default_rng(seed)
    chosen = []
    for label in sorted({r["label"] for r in rows}):
        of_label = [r for r in rows if r["label"] == label]
        chosen += [of_label[i] for i in rng.choice(len(of_label), shots, replace=False)]
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "train.tsv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(chosen)
    shutil.copy(data / "dev.tsv", out / "dev.tsv")
    return out


def train_for(
    bundle: str,
    data: str,
    budget_s: float,
    *,
    cache_mb: float = DEFAULT_CACHE_MB,
    threads: int | None = None,
    dev_rows: int = 0,
    **values: Any,
) -> dict[str, Any]:
    """Train ``bundle`` for ``budget_s`` seconds of wall time (the trunk's first pass and its
    cache included), then score the dev set (off the clock)."""

    threads = threads or os.cpu_count() or 1
    engine = _engine(bundle, threads, cache_mb)
    p = _prepare(
        bundle, data, engine, eval_rows=dev_rows, eval_every=0, eval_at_start=False, **values
    )
    steps: list[float] = []

    def on_step(record: dict[str, Any]) -> None:
        if record.get("kind") == "step":
            steps.append(record["step_time"])

    with tempfile.TemporaryDirectory(prefix="trunk-bench-") as run_dir:
        start = time.perf_counter()
        result = p.train(
            run_dir,
            evaluate=lambda _lora: {},
            save_adapter=None,
            on_step=on_step,
            should_stop=lambda: time.perf_counter() - start >= budget_s,
        )
        wall_s = time.perf_counter() - start
    metrics = p.evaluate({**p.frozen, **result.params})
    return {
        "bundle": bundle,
        "steps": len(steps),
        "wall_s": wall_s,
        "median_step_s": float(np.median(steps)) if steps else None,
        "first_step_s": steps[0] if steps else None,
        "dev_acc": metrics["accuracy"],
        "dev_loss": metrics["candidate_loss"],
        "rss_mb": current_rss_mb(),
        **_cache_figures(engine),
    }


def few_shot(
    split: str,
    all_layers: str,
    *,
    shots: int = 512,
    budget_s: float = 3600.0,
    seed: int = 0,
    **values: Any,
) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="trunk-fewshot-") as folder:
        data = str(few_shot_data(shots, seed, Path(folder)))
        return [
            {"contender": name, **train_for(path, data, budget_s, seed=seed, **values)}
            for name, path in (("all-layer LoRA", all_layers), ("trunk + head", split))
        ]


def equality(
    split: str, one: str, *, dev_rows: int = 64, batch: int = 32, seed: int = 0
) -> dict[str, Any]:
    """Largest per-row |loss| and |candidate log-prob| difference, trunk + head against the
    one-graph bundle with the same LoRA sites, under a random per-row adapter on dev rows."""
    from zoo_ort.bundle import load_bundle
    from zoo_ort.engine.ort import OrtEngine
    from zoo_ort.engine.trunk import TrunkEngine

    engine = TrunkEngine(load_bundle(split), trunk_cache_mb=DEFAULT_CACHE_MB)
    reference = OrtEngine(load_bundle(one))
    p = _prepare(one, str(DATA_DIR / "sst2"), reference, eval_rows=dev_rows)
    rng = np.random.default_rng(seed)
    loss_diff = cand_diff = effect = 0.0
    rows = 0
    for start in range(0, min(dev_rows, len(p.dev_data)), batch):
        tokens = p.dev_data.batch(np.arange(start, min(start + batch, dev_rows))).tokens
        tokens = tokens.tile(2)  # two copies per example, as P-RGE's ± rows
        lora = _random_rows(p.bundle.manifest, p.frozen, p.params, tokens.rows, rng)
        a, b = engine.forward(tokens, lora), reference.forward(tokens, lora)
        # How far the random adapter moves the losses: what the differences are small against.
        base = reference.forward(tokens, {**lora, **{k: 0 * lora[k] for k in p.params}})
        effect = max(effect, float(np.abs(b.loss - base.loss).max()))
        loss_diff = max(loss_diff, float(np.abs(a.loss - b.loss).max()))
        cand_diff = max(cand_diff, float(np.abs(a.candidate_logprobs - b.candidate_logprobs).max()))
        rows += tokens.rows
    return {
        "rows": rows,
        "max_loss_diff": loss_diff,
        "max_candidate_diff": cand_diff,
        "lora_effect": effect,
    }


def _random_rows(
    manifest: Any,
    frozen: Mapping[str, np.ndarray],
    params: Mapping[str, np.ndarray],
    rows: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """The initial adapter with a random B per row (B = 0 would hide the LoRA path)."""
    out: dict[str, np.ndarray] = dict(frozen)
    for name, value in params.items():
        out[name] = (0.02 * rng.standard_normal((rows, *value.shape))).astype(np.float32)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["dev", "train", "equal"])
    parser.add_argument("--split", required=True, help="bundle exported with lora_layers")
    parser.add_argument("--one", help="the same lora_layers, split=False")
    parser.add_argument("--all", dest="all_layers", help="a default (all-layer) bundle")
    parser.add_argument("--dev-rows", type=int, default=0)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--cache-mb", type=float, default=DEFAULT_CACHE_MB)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--shots", type=int, default=512)
    parser.add_argument("--budget-s", type=float, default=3600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", help="dev: run this contender alone (its own RSS)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="train: a training setting for both contenders (e.g. lr=0.01); repeatable",
    )
    args = parser.parse_args(argv)
    run: Callable[[], Any]
    if args.what == "dev":

        def run() -> Any:
            return dev_scoring(
                args.split,
                args.one,
                args.all_layers,
                dev_rows=args.dev_rows,
                passes=args.passes,
                threads=args.threads,
                cache_mb=args.cache_mb,
                only=args.only,
            )
    elif args.what == "train":
        if not args.all_layers:
            parser.error("train needs --all (the all-layer bundle to compare with)")

        def run() -> Any:
            return few_shot(
                args.split,
                args.all_layers,
                shots=args.shots,
                budget_s=args.budget_s,
                seed=args.seed,
                cache_mb=args.cache_mb,
                threads=args.threads,
                dev_rows=args.dev_rows,
                **dict(PINNED_TRAINING, **_assignments(args.set)),
            )
    else:
        if not args.one:
            parser.error("equal needs --one (the one-graph bundle with the same layers)")

        def run() -> Any:
            return equality(args.split, args.one, dev_rows=args.dev_rows or 64)

    print(json.dumps({"machine": machine_info(), "results": run()}, indent=1))


if __name__ == "__main__":
    main()
