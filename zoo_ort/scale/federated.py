"""``zoo-ort federate``: zeroth-order LoRA training over a Flower federation (simulation engine).

:func:`federate` is the entry point: the train split is cut into ``clients`` Dirichlet(α) shards,
each round samples ``per_round`` clients that run ``local_steps`` ZO steps on their shard and
upload only their scalars, and the server replays the example-weighted average (see
:mod:`zoo_ort.scale.fl_core` for the protocol, :mod:`zoo_ort.scale.fl_deploy` for SuperLink and
SuperNodes). The run folder is the same as ``zoo-ort train``'s. Needs ``zoo-ort[fl]``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from zoo_ort.errors import ZooError
from zoo_ort.settings import Settings

Event = Callable[[str, dict[str, Any]], None]


def require_flwr() -> None:
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise ZooError("federated training needs Flower: pip install 'zoo-ort[fl]'") from None


def federate(
    settings: Settings,
    *,
    clients: int,
    per_round: int,
    rounds: int,
    local_steps: int,
    alpha: float = 0.5,
    g_limit: float | None = None,
    outlier_factor: float = 10.0,
    eval_every: int = 1,
    round_timeout: float | None = None,
    seeds: str = "distinct",
    resume: bool = False,
    num_cpus: int | None = None,
    faults: Mapping[int, str] | None = None,
    on_event: Event | None = None,
) -> dict[str, Any]:
    """Run a federation in Flower's simulation engine; returns a summary like ``train_run``.

    ``settings`` are those of ``zoo-ort train`` (``out`` is the server's run folder;
    ``steps`` is replaced by ``rounds * local_steps``, the global step count). ``faults``
    (partition -> "drop", "nan", "inf", "huge" or "settings") makes clients misbehave, for
    tests and drills. ``num_cpus`` caps the simulation's Ray workers (default: all cores, one
    per client process).
    """
    require_flwr()
    from flwr.simulation import run_simulation

    from zoo_ort.app.wiring import prepare
    from zoo_ort.scale.fl_apps import make_client_app, make_server_app
    from zoo_ort.scale.fl_client import FedClient
    from zoo_ort.scale.fl_server import FedConfig, FedServer, fed_settings

    emit = on_event or (lambda kind, info: None)
    cfg = FedConfig(
        clients=clients,
        per_round=per_round,
        rounds=rounds,
        local_steps=local_steps,
        alpha=alpha,
        g_limit=g_limit,
        outlier_factor=outlier_factor,
        eval_every=eval_every,
        round_timeout=round_timeout,
        seeds=seeds,
    ).validate()
    if not settings.out:
        raise ZooError("no run folder: pass --out RUN")
    s = fed_settings(settings, cfg)
    run_dir = Path(s.out)  # type: ignore[arg-type]
    faults = dict(faults or {})
    server_side = prepare(s, train=False)  # the server only evaluates: dev split, no shards
    client_settings = replace(s, threads=s.threads or 1)  # one core per client process
    holder: dict[str, FedServer] = {}

    def make_server(context: Any) -> FedServer:
        server = FedServer(s, cfg, run_dir, server_side, resume=resume)
        holder["server"] = server
        emit("start", {"rounds": rounds, "round": server.round, "steps": s.steps})
        return server

    def make_client(context: Any) -> FedClient:
        part = int(context.node_config["partition-id"])
        return FedClient(
            client_settings,
            partition=part,
            num_partitions=int(context.node_config["num-partitions"]),
            alpha=alpha,
            local_steps=local_steps,
            seeds=seeds,
            fault=faults.get(part),
        )

    def on_done(server: FedServer) -> None:
        from zoo_ort.app.wiring import adapter_saver

        server.close(adapter_saver(server_side.bundle))

    _save_config(run_dir, s, cfg, resume)
    started = time.perf_counter()
    if not _already_finished(run_dir, resume):
        cpus = num_cpus or min(os.cpu_count() or 1, clients)
        run_simulation(
            server_app=make_server_app(make_server, on_done),
            client_app=make_client_app(make_client),
            num_supernodes=clients,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": cpus, "include_dashboard": False},
            },
        )
    return summarise(run_dir, s, cfg, time.perf_counter() - started)


def _already_finished(run_dir: Path, resume: bool) -> bool:
    from zoo_ort.loop.checkpoint import load_latest

    ckpt = load_latest(run_dir)
    if ckpt is not None and not resume:
        raise ZooError(
            f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out"
        )
    return bool(ckpt is not None and ckpt.info.get("finished"))


def _save_config(run_dir: Path, s: Settings, cfg: Any, resume: bool) -> None:
    from dataclasses import asdict

    from zoo_ort.app.wiring import saved_settings
    from zoo_ort.io import atomic_write_json
    from zoo_ort.settings import save_toml

    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume or not (run_dir / "config.toml").exists():
        save_toml(run_dir / "config.toml", saved_settings(s), comment="federated run settings")
        atomic_write_json(run_dir / "federation.json", asdict(cfg))


def summarise(run_dir: Path, s: Settings, cfg: Any, seconds: float) -> dict[str, Any]:
    """The summary of a federated run folder: rounds, evaluations, bytes, lines to show."""
    from zoo_ort.loop.checkpoint import load_latest
    from zoo_ort.loop.metrics import read_metrics

    records = read_metrics(run_dir)
    rounds = [r for r in records if r.get("kind") == "round"]
    evals = [
        {"step": r["step"], "round": r.get("round"), **r["eval"]} for r in records if r.get("eval")
    ]
    ckpt = load_latest(run_dir)
    up = [r["bytes_up_mean"] for r in rounds if r.get("bytes_up_mean") is not None]
    down = [r["bytes_down_mean"] for r in rounds if r.get("bytes_down_mean") is not None]
    rejected = {p: why for r in rounds for p, why in r.get("rejected", {}).items()}
    result = {
        "rounds": len(rounds),
        "step": None if ckpt is None else ckpt.step,
        "finished": bool(ckpt and ckpt.info.get("finished")),
        "bytes_up_per_client_round": max(up) if up else None,
        "bytes_down_per_client_round": max(down) if down else None,
        "rejected": rejected,
        "dropped": sorted({p for r in rounds for p in r.get("dropped", [])}),
        "refused": [r.get("partition") for r in records if r.get("kind") == "refused"],
        "rows": sum(int(r.get("rows", 0)) for r in rounds),
        "final_eval": evals[-1] if evals else None,
        "run_dir": run_dir,
        "seconds": seconds,
    }
    name = s.best[0]
    last = evals[-1].get(name) if evals else None
    lines = [
        f"federated {len(rounds)} rounds x {cfg.local_steps} local steps over "
        f"{cfg.clients} clients ({cfg.per_round} per round, {cfg.seeds} seeds, "
        f"Dirichlet α={cfg.alpha})",
        f"dev {name}: {last}" if last is not None else "no evaluation",
        f"bytes per client per round: up {result['bytes_up_per_client_round']}, down "
        f"{result['bytes_down_per_client_round']} (largest round mean)",
        f"rejected clients: {rejected or 'none'}; dropped: {result['dropped'] or 'none'}",
        f"run folder {run_dir} ({seconds:.1f}s)",
    ]
    return {"result": result, "evals": evals, "lines": lines}
