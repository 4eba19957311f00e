"""Federated ZO training (issue 17): shards, screening, bit-identical rebuilds, resume, and a tiny
federation in Flower's simulation engine. The protocol tests drive FedServer and FedClient by
hand (no Flower); the simulation test is skipped when ``flwr`` (zoo-ort[fl]) is missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from zoo_ort.scale.fl_core import (
    ClientRound,
    aggregate,
    dirichlet_split,
    sample_clients,
    screen,
)

HAVE_FLWR = importlib.util.find_spec("flwr") is not None and importlib.util.find_spec("ray")


def _fed_settings(bundle: Path, out: Path, **over):
    from zoo_ort.app.wiring import resolve

    flags = {
        "data": "sentiment",
        "out": str(out),
        "batch_size": 4,
        "lr": 0.05,
        "eps": 0.01,
        "eval_rows": 16,
        "max_length": 64,
        "threads": 1,
    } | over
    return resolve(bundle, flags).settings


# -- shards and sampling ----------------------------------------------------------------------


def test_dirichlet_split_covers_all_and_small_alpha_is_skewed():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=400)

    def skew(alpha: float) -> float:
        shards = dirichlet_split(labels, 400, 10, alpha, seed=3)
        joined = np.concatenate(shards)
        assert sorted(joined.tolist()) == list(range(400))  # disjoint and complete
        # the mean share of a client's majority label: 0.5 for a perfectly even split
        return float(np.mean([max(np.mean(labels[s]), 1 - np.mean(labels[s])) for s in shards]))

    assert skew(0.1) > 0.85 > 0.65 > skew(100.0)
    a = dirichlet_split(labels, 400, 10, 0.5, seed=3)
    b = dirichlet_split(labels, 400, 10, 0.5, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert min(len(s) for s in a) > 0


def test_sampling_is_a_function_of_seed_and_round():
    assert sample_clients([3, 1, 2, 0], 4, 0, 5) == [0, 1, 2, 3]
    picks = [tuple(sample_clients(range(10), 3, 7, r)) for r in range(20)]
    assert picks == [tuple(sample_clients(range(10), 3, 7, r)) for r in range(20)]
    assert len(set(picks)) > 5 and all(len(set(p)) == 3 for p in picks)


# -- screening and aggregation ----------------------------------------------------------------


def _reply(part: int, g, examples: int = 10, fp: str = "fp", step: int = 4, digest: str = "d"):
    return ClientRound(part, fp, step, examples, g, None, digest, 0.5, 8)


def _screen(replies, **over):
    kw = dict(fingerprint="fp", step=4, digest="d", shape=(2, 1), g_limit=1e4, eps=0.01) | over
    return screen(replies, **kw)


def test_screen_rejects_poisoned_and_foreign_clients_whole():
    honest = [_reply(p, [[0.1 * (p + 1)], [-0.2]]) for p in range(4)]
    bad = [
        _reply(10, [[float("nan")], [0.1]]),
        _reply(11, [[float("inf")], [0.1]]),
        _reply(12, [[1e30], [0.1]]),
        _reply(13, [[0.1], [0.1]], fp="other"),
        _reply(14, [[0.1], [0.1]], step=2),
        _reply(15, [[0.1]]),  # wrong shape
        _reply(16, [[50.0], [-50.0]]),  # under the cap, but 100x the others' scale
    ]
    verdict = _screen(bad + honest)
    assert [r.partition for r in verdict.accepted] == [0, 1, 2, 3]
    assert sorted(verdict.rejected) == [10, 11, 12, 13, 14, 15, 16]
    assert "non-finite" in verdict.rejected[10] and "non-finite" in verdict.rejected[11]
    assert "exceeds the limit" in verdict.rejected[12]
    assert "fingerprint" in verdict.rejected[13] and "out of sync" in verdict.rejected[14]
    assert "median" in verdict.rejected[16]
    # two clients: no median rule, only the absolute cap
    assert len(_screen([honest[0], _reply(16, [[50.0], [-50.0]])]).accepted) == 2


def test_aggregate_is_example_weighted_and_order_free():
    a, b = _reply(0, [[1.0], [0.0]], examples=30), _reply(1, [[0.0], [4.0]], examples=10)
    pairs = aggregate([b, a], first=4)
    assert pairs.first == 4 and pairs.g == [[0.75], [1.0]]
    assert aggregate([a, b], first=4).g == pairs.g


def test_distinct_seeds_give_each_client_its_block_and_replay_all_of_them():
    from zoo_ort.scale.fl_core import aggregate_blocks, blocks

    assert blocks([3, 0, 2], 10, 2, "distinct") == {0: 10, 2: 12, 3: 14}
    assert blocks([3, 0, 2], 10, 2, "shared") == {0: 10, 2: 10, 3: 10}
    a, b = _reply(0, [[1.0], [0.0]], examples=30), _reply(3, [[0.0], [4.0]], examples=10)
    # Partition 2 was sampled but dropped: its block replays as zero moves. The others are
    # scaled by M·n/N over the accepted (2·30/40 = 1.5, 2·10/40 = 0.5): an even split keeps g.
    pairs = aggregate_blocks([b, a], first=10, partitions=[2, 3, 0], local_steps=2, queries=1)
    assert pairs.first == 10 and pairs.curv is None
    assert pairs.g == [[1.5], [0.0], [0.0], [0.0], [0.0], [2.0]]
    even = [_reply(0, [[1.0]], examples=5), _reply(1, [[-2.0]], examples=5)]
    assert aggregate_blocks(even, 0, [0, 1], 1, 1).g == [[1.0], [-2.0]]


# -- the protocol, driven by hand on the tiny bundle ------------------------------------------


def _federation(
    tiny_bundle: Path,
    out: Path,
    faults: dict[int, str] | None = None,
    seeds: str = "distinct",
    **over,
):
    from zoo_ort.app.wiring import prepare
    from zoo_ort.scale.fl_client import FedClient
    from zoo_ort.scale.fl_server import FedConfig, fed_settings

    cfg = FedConfig(clients=4, per_round=4, rounds=3, local_steps=2, alpha=0.5, seeds=seeds, **over)
    s = fed_settings(_fed_settings(tiny_bundle, out), cfg)
    clients = [
        FedClient(s, p, 4, 0.5, 2, fault=(faults or {}).get(p), seeds=seeds) for p in range(4)
    ]
    return s, cfg, prepare(s, train=False), clients


def _drive(server, clients, rounds: int, caches: dict | None = None) -> list[dict]:
    """Run ``rounds`` rounds as the Flower apps do (node id = partition + 100)."""
    caches = {} if caches is None else caches
    for c in clients:
        server.admit(c.partition + 100, c.hello())
    records = []
    for _ in range(rounds):
        sampled = server.sample()
        replies, up, down = {}, {}, {}
        for part, node in sampled.items():
            client = clients[part]
            try:
                rep, caches[part] = client.round(server.payload(node), caches.get(part))
            except RuntimeError:
                rep = None  # dropped out mid-round
            replies[node], up[node], down[node] = rep, 1, 1
        records.append(server.finish_round(sampled, replies, up, down))
    return records


@pytest.mark.parametrize("seeds", ["distinct", "shared"])
def test_clients_rebuild_the_servers_adapter_bit_for_bit(tiny_bundle, tmp_path, seeds):
    from zoo_ort.scale.fl_core import state_digest
    from zoo_ort.scale.fl_server import FedServer

    faults = {1: "huge", 3: "drop"}
    s, cfg, prep, clients = _federation(tiny_bundle, tmp_path / "a", faults, seeds)
    server = FedServer(s, cfg, tmp_path / "a", prep)
    caches: dict = {}
    records = _drive(server, clients, 3, caches)
    assert [r["accepted"] for r in records] == [[0, 2]] * 3
    assert all(set(r["rejected"]) == {"1"} and r["dropped"] == [3] for r in records)
    steps = 3 * 2 * (4 if seeds == "distinct" else 1)  # rounds x s (x M: a block per client)
    assert server.state.step == steps == s.steps and len(server.history) == steps
    if seeds == "distinct":  # per round: blocks of partitions 0, 1, 2, 3; 1 and 3 move nothing
        for r in range(3):
            blocks = [server.history.g[8 * r + 2 * j : 8 * r + 2 * j + 2] for j in range(4)]
            assert blocks[1] == blocks[3] == [[0.0], [0.0]]
            assert blocks[0] != blocks[1] and blocks[2] != blocks[1]
    # Every client, from its cache or from scratch, replays the history to the same bits.
    for client in clients:
        for start in (caches.get(client.partition), None):
            state = client.rebuild(start, server.history.since(0 if start is None else start.step))
            assert state_digest(state) == state_digest(server.state)
            for k, v in server.state.params.items():
                assert v.dtype == state.params[k].dtype and v.tobytes() == state.params[k].tobytes()
    moved = any(
        not np.array_equal(v, clients[0].initial.params[k]) for k, v in server.state.params.items()
    )
    assert moved
    # The poisoned client changed nothing: one that never answers leads to the same adapter.
    s2, cfg2, prep2, silent = _federation(
        tiny_bundle, tmp_path / "b", {1: "drop", 3: "drop"}, seeds
    )
    clean = FedServer(s2, cfg2, tmp_path / "b", prep2)
    _drive(clean, silent, 3)
    assert state_digest(clean.state) == state_digest(server.state)


def test_foreign_client_is_refused_by_fingerprint(tiny_bundle, tmp_path):
    from zoo_ort.scale.fl_server import FedServer

    s, cfg, prep, clients = _federation(tiny_bundle, tmp_path / "r", {2: "settings"})
    server = FedServer(s, cfg, tmp_path / "r", prep)
    for c in clients:
        server.admit(c.partition + 100, c.hello())
    assert sorted(server.members) == [100, 101, 103] and 102 in server.refused
    assert sorted(server.sample()) == [0, 1, 3]
    reply, cache = clients[2].round(server.payload(102), None)
    assert reply["status"] == "refused" and cache is None


def test_resumed_server_continues_bit_identically(tiny_bundle, tmp_path):
    from zoo_ort.scale.fl_core import state_digest
    from zoo_ort.scale.fl_server import FedServer

    s, cfg, prep, clients = _federation(tiny_bundle, tmp_path / "full")
    full = FedServer(s, cfg, tmp_path / "full", prep)
    _drive(full, clients, 3)

    s2, cfg2, prep2, clients2 = _federation(tiny_bundle, tmp_path / "cut")
    first = FedServer(s2, cfg2, tmp_path / "cut", prep2)
    _drive(first, clients2, 2)
    with pytest.raises(Exception, match="already holds a run"):
        FedServer(s2, cfg2, tmp_path / "cut", prep2)
    again = FedServer(s2, cfg2, tmp_path / "cut", prep2, resume=True)
    assert again.round == 2 and again.state.step == 16  # 2 rounds x 4 clients' blocks of 2
    _drive(again, clients2, 1)  # fresh caches: clients get the whole history once
    assert state_digest(again.state) == state_digest(full.state)
    assert again.history.g == full.history.g


# -- Flower's simulation engine ---------------------------------------------------------------


@pytest.mark.skipif(not HAVE_FLWR, reason="needs zoo-ort[fl] (flwr with ray)")
def test_tiny_federation_in_the_simulation_engine(tiny_bundle, tmp_path):
    from zoo_ort.adapters import load_peft_adapter
    from zoo_ort.bundle import load_bundle
    from zoo_ort.loop.checkpoint import load_latest
    from zoo_ort.loop.metrics import read_metrics
    from zoo_ort.scale.federated import federate

    out = tmp_path / "fed"
    s = _fed_settings(tiny_bundle, out)
    summary = federate(
        s,
        clients=4,
        per_round=4,
        rounds=3,
        local_steps=2,
        alpha=0.5,
        num_cpus=2,
        faults={1: "nan", 3: "drop"},
    )
    res = summary["result"]
    assert res["finished"] and res["rounds"] == 3 and res["step"] == 24  # 3 x 4 blocks of 2
    assert set(res["rejected"]) == {"1"} and res["dropped"] == [3]
    rounds = [r for r in read_metrics(out) if r.get("kind") == "round"]
    assert [r["accepted"] for r in rounds] == [[0, 2]] * 3
    # each round's clients rebuilt exactly the adapter the server had before the round
    before = [None] + [r["digest"] for r in rounds[:-1]]
    for prev, r in zip(before, rounds, strict=True):
        assert len(r["rebuilt_digests"]) == 1
        if prev is not None:
            assert r["rebuilt_digests"] == [prev]
    assert all(r["bytes_up_mean"] < 2048 and r["bytes_down_mean"] < 2048 for r in rounds)
    assert len([r for r in read_metrics(out) if r.get("eval")]) == 3
    for name in ("final/adapter_config.json", "final/adapter.onnx_adapter", "plot.png"):
        assert (out / name).exists() or name == "plot.png", name
    ckpt = load_latest(out)
    lora = load_peft_adapter(out / "final", load_bundle(tiny_bundle).manifest)
    for k, v in ckpt.params.items():
        assert np.array_equal(lora[k], v)
