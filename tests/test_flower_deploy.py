"""The federation on Flower's deployment engine: 1 SuperLink and 2 SuperNodes on 127.0.0.1 run
two rounds of the shipped app (zoo_ort/scale/flower_app) on the tiny bundle; every client
rebuilds the server's final adapter; every process is stopped. Skipped without ``flwr``."""

from __future__ import annotations

import importlib.util
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

HAVE_FLWR = importlib.util.find_spec("flwr") is not None
needs_flwr = pytest.mark.skipif(not HAVE_FLWR, reason="needs zoo-ort[fl] (flwr)")


@needs_flwr
def test_app_folder_is_a_valid_flower_app():
    from flwr.common.config import validate_config

    from zoo_ort.scale.fl_deploy import app_dir

    config = tomllib.loads((app_dir() / "pyproject.toml").read_text())
    ok, errors, _warnings = validate_config(config, check_module=True, project_dir=app_dir())
    assert ok, errors
    assert config["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "zoo_ort.scale.fl_apps:server_app",
        "clientapp": "zoo_ort.scale.fl_apps:client_app",
    }
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from zoo_ort.scale import fl_apps

    assert isinstance(fl_apps.server_app, ServerApp)
    assert isinstance(fl_apps.client_app, ClientApp)


@needs_flwr
def test_node_config_text_parses_back_in_flower():
    from flwr.common.config import parse_config_args

    from zoo_ort.scale.fl_deploy import node_config_arg

    values = {"partition-id": 1, "num-partitions": 2, "bundle": "/a b/c", "data": "sentiment"}
    assert parse_config_args([node_config_arg(values)]) == values
    with pytest.raises(Exception, match="quote"):
        node_config_arg({"data": "it's"})


def test_final_sync_and_duplicate_partitions_without_flower(tiny_bundle, tmp_path):
    """The pieces the deployment adds, driven by hand: a second node with a taken partition-id
    is refused; after the rounds a client rebuilds the server's final adapter (``sync``), or
    asks for the whole history when its cache is gone."""
    from zoo_ort.app.wiring import prepare, resolve
    from zoo_ort.loop.metrics import read_metrics
    from zoo_ort.scale.fl_client import FedClient
    from zoo_ort.scale.fl_core import state_digest
    from zoo_ort.scale.fl_server import FedConfig, FedServer, fed_settings

    flags = {"data": "sentiment", "out": str(tmp_path / "s"), "batch_size": 4, "lr": 0.05}
    flags |= {"eval_rows": 8, "max_length": 64, "threads": 1}
    cfg = FedConfig(clients=2, per_round=2, rounds=2, local_steps=1)
    s = fed_settings(resolve(tiny_bundle, flags).settings, cfg)
    clients = [FedClient(s, p, 2, cfg.alpha, cfg.local_steps) for p in (0, 1)]
    server = FedServer(s, cfg, tmp_path / "s", prepare(s, train=False))
    for c in clients:
        server.admit(100 + c.partition, c.hello())
    server.admit(107, clients[0].hello())  # a second SuperNode says partition-id=0
    assert sorted(server.members) == [100, 101] and "partition 0" in server.refused[107]
    caches: dict = {}
    while not server.done:
        sampled = server.sample()
        replies = {}
        for part, node in sampled.items():
            replies[node], caches[node] = clients[part].round(
                server.payload(node), caches.get(node)
            )
        server.finish_round(sampled, replies, {}, {})
    assert server.state.step == 4  # 2 rounds x 2 clients' blocks of 1 step (distinct seeds)
    final = state_digest(server.state)
    reply, cache = clients[0].sync(server.payload(100), caches[100])
    assert reply["status"] == "ok" and reply["digest"] == final and cache.step == 4
    lost, _ = clients[1].sync(server.payload(101), None)  # its cache is gone: needs history
    assert lost["status"] == "resync"
    server.resync(101)
    again, _ = clients[1].sync(server.payload(101), None)
    record = server.finish_sync({100: reply, 101: again})
    assert record["in_sync"] and record["client_digests"] == {"0": final, "1": final}
    assert not server.finish_sync({100: reply, 101: None})["in_sync"]
    assert [r["in_sync"] for r in read_metrics(tmp_path / "s") if r.get("kind") == "sync"] == [
        True,
        False,
    ]


@needs_flwr
def test_superlink_and_two_supernodes_run_two_rounds(tiny_bundle, tmp_path):
    from zoo_ort.adapters import load_peft_adapter
    from zoo_ort.bundle import load_bundle
    from zoo_ort.loop.checkpoint import load_latest, tensors_digest
    from zoo_ort.scale.fl_deploy import DeployError, _alive, check_run, run_local

    out = tmp_path / "run"
    settings = {"batch_size": 4, "lr": 0.05, "eps": 0.01, "eval_rows": 16, "max_length": 64}
    res = run_local(
        tiny_bundle,
        "sentiment",
        out,
        nodes=2,
        rounds=2,
        local_steps=1,
        settings=settings,
        timeout=300,
        home=tmp_path / "flwr-home",
        keep_home=True,
    )
    assert res["status"] == "finished:completed" and res["step"] == 4
    assert [r["accepted"] for r in res["rounds"]] == [[0, 1], [0, 1]]
    # Every process started (SuperLink, SuperNodes, their SuperExecs and app processes) is gone.
    assert len(res["stopped_pids"]) >= 3
    assert not [p for p in res["stopped_pids"] if _alive(p)]
    assert _processes_with_home(tmp_path / "flwr-home") == []
    logs = {p.name: p.read_text() for p in (tmp_path / "flwr-home" / "logs").glob("*.log")}
    assert sorted(logs) == ["superlink.log", "supernode-0.log", "supernode-1.log"]
    assert all("query.sync" in logs[f"supernode-{k}.log"] for k in (0, 1))

    # The server's final adapter, read back from final/, is what both clients rebuilt.
    ckpt = load_latest(out)
    lora = load_peft_adapter(out / "final", load_bundle(tiny_bundle).manifest)
    for k, v in ckpt.params.items():
        assert np.array_equal(lora[k], v)
    final = tensors_digest({k: lora[k] for k in ckpt.params})[:32]
    assert res["sync"]["client_digests"] == {"0": final, "1": final}
    assert res["rounds"][0]["digest"] != final  # the second round moved the adapter
    assert res["rounds"][1]["rebuilt_digests"] == [res["rounds"][0]["digest"]]

    # The check fails on a client that rebuilt something else.
    lines = (out / "metrics.jsonl").read_text().splitlines()
    sync = json.loads(lines[-1])
    assert sync["kind"] == "sync"
    sync["client_digests"]["1"], sync["in_sync"] = "0" * 32, False
    (out / "metrics.jsonl").write_text("\n".join([*lines[:-1], json.dumps(sync)]) + "\n")
    with pytest.raises(DeployError, match="clients rebuilt"):
        check_run(out)


@needs_flwr
def test_a_failing_run_is_reported_and_every_process_stopped(tiny_bundle, tmp_path):
    """The ServerApp fails (no such data): the launcher raises with the logs and still stops
    every process it started (none is left with its FLWR_HOME)."""
    from zoo_ort.scale.fl_deploy import DeployError, run_local

    home = tmp_path / "h"
    with pytest.raises(DeployError, match="finished:failed"):
        run_local(
            tiny_bundle,
            "/nowhere/data",
            tmp_path / "run",
            nodes=1,
            rounds=1,
            timeout=180,
            home=home,
        )
    assert (home / "logs" / "superlink.log").exists()
    assert _processes_with_home(home) == []


def _processes_with_home(home: Path) -> list[int]:
    """Live processes whose environment has FLWR_HOME=home (Linux /proc)."""
    needle = f"FLWR_HOME={home.resolve()}".encode() + b"\0"
    found = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in env.read_bytes() + b"\0":
                stat = (env.parent / "stat").read_text()
                if stat[stat.rindex(")") + 2] != "Z":
                    found.append(int(env.parent.name))
        except (OSError, ValueError):
            continue
    return found
