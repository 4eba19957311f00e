"""What Flower's ServerApp and ClientApp build from its configs on the deployment engine.

* the **run config** (``[tool.flwr.app.config]`` of the app folder, overridden by ``flwr run
  ... --run-config``): bundle, data, task, out, ``settings`` (a JSON object of ``zoo-ort train``
  settings), clients, per-round, rounds, local-steps, seeds, alpha, ...;
* each SuperNode's **node config** (``flower-supernode --node-config``): ``partition-id``,
  ``num-partitions`` (1: the device's whole train split is its shard), and optionally the
  device's own ``bundle``, ``data`` and ``threads``.

These functions run inside Flower's processes (:mod:`zoo_ort.scale.fl_apps`), handed a Context.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from zoo_ort.errors import ZooError


def fed_config(rc: Mapping[str, Any]) -> Any:
    """The :class:`~zoo_ort.scale.fl_server.FedConfig` of a run config."""
    from zoo_ort.scale.fl_server import FedConfig

    clients = int(rc.get("clients", 1))
    return FedConfig(
        clients=clients,
        per_round=int(rc.get("per-round", 0)) or clients,
        rounds=int(rc.get("rounds", 1)),
        local_steps=int(rc.get("local-steps", 1)),
        alpha=float(rc.get("alpha", 0.5)),
        g_limit=float(rc.get("g-limit", 0.0)) or None,
        outlier_factor=float(rc.get("outlier-factor", 10.0)),
        eval_every=int(rc.get("eval-every-rounds", 1)),
        round_timeout=float(rc.get("round-timeout", 0.0)) or None,
        seeds=str(rc.get("seeds", "distinct")),
    ).validate()


def run_settings(rc: Mapping[str, Any], bundle: str, data: str, out: str | None = None) -> Any:
    """``zoo-ort train`` settings from the run config's ``settings`` JSON, task and rounds
    (``steps`` = rounds x local steps), on this side's bundle and data."""
    from zoo_ort.app.wiring import resolve
    from zoo_ort.scale.fl_server import fed_settings

    try:
        extra = json.loads(str(rc.get("settings") or "{}"))
    except json.JSONDecodeError as e:
        raise ZooError(f"run config 'settings' is not JSON: {e}") from None
    if not isinstance(extra, dict):
        raise ZooError("run config 'settings' must be a JSON object of zoo-ort settings")
    if not bundle or not data:
        raise ZooError("no bundle or data: set them in the run config or the node config")
    flags = extra | {"data": data, "task": rc.get("task") or None}
    if out:
        flags["out"] = out
    s = resolve(bundle, flags, for_training=bool(out)).settings
    return fed_settings(s, fed_config(rc))


def server_from_context(context: Any) -> Any:
    """The ServerApp's :class:`~zoo_ort.scale.fl_server.FedServer` (run config only)."""
    from zoo_ort.app.wiring import prepare
    from zoo_ort.scale.federated import _save_config
    from zoo_ort.scale.fl_server import FedServer

    rc = context.run_config
    if not rc.get("out"):
        raise ZooError("no run folder: set 'out' in the run config")
    s = run_settings(rc, str(rc.get("bundle", "")), str(rc.get("data", "")), str(rc["out"]))
    cfg, resume = fed_config(rc), bool(rc.get("resume", False))
    server = FedServer(s, cfg, s.out, prepare(s, train=False), resume=resume)
    _save_config(Path(s.out), s, cfg, resume)
    return server


def close_server(server: Any) -> None:
    from zoo_ort.app.wiring import adapter_saver

    server.close(adapter_saver(server.p.bundle))


def final_sync(context: Any) -> bool:
    return bool(context.run_config.get("final-sync", True))


def wait_for_nodes(context: Any) -> float:
    return float(context.run_config.get("wait-for-nodes", 120.0))


def client_from_context(context: Any) -> Any:
    """A SuperNode's :class:`~zoo_ort.scale.fl_client.FedClient`: partition, data and bundle
    from its node config (bundle and data default to the run config's)."""
    from zoo_ort.scale.fl_client import FedClient

    rc, nc = context.run_config, context.node_config
    bundle = str(nc.get("bundle") or rc.get("bundle") or "")
    data = str(nc.get("data") or rc.get("data") or "")
    s = run_settings(rc, bundle, data)
    threads = int(nc.get("threads", 0) or 0) or s.threads or 1
    cfg = fed_config(rc)
    return FedClient(
        replace(s, threads=threads),
        partition=int(nc.get("partition-id", 0)),
        num_partitions=int(nc.get("num-partitions", 1)),
        alpha=cfg.alpha,
        local_steps=cfg.local_steps,
        seeds=cfg.seeds,
    )
