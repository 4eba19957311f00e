"""Flower's ServerApp and ClientApp around :class:`FedServer` and :class:`FedClient`.

Only this module (and what runs it) imports ``flwr``. Messages carry one ConfigRecord
``"zoo"`` of plain values: a ``query.hello`` message (fingerprint handshake, once per node) and
one ``train`` message per sampled client per round. The same two apps run in the simulation
engine (:func:`zoo_ort.scale.federated.federate`) and under SuperLink + SuperNodes
(:mod:`zoo_ort.scale.fl_deploy`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid, ServerApp

from zoo_ort.scale.fl_client import FedClient, state_from_arrays, state_to_arrays
from zoo_ort.scale.fl_server import FedServer

log = logging.getLogger("zoo_ort.federated")
KEY = "zoo"
CACHE, CACHE_META = "zoo.cache", "zoo.cache.meta"
HELLO = "query.hello"
SYNC = "query.sync"
WAIT_FOR_NODES_S = 120.0  # how long a deployed server waits for its SuperNodes to connect


def pack(values: dict[str, Any]) -> RecordDict:
    return RecordDict({KEY: ConfigRecord(values)})


def unpack(msg: Message) -> dict[str, Any] | None:
    """The reply's values, or None for an error reply (a client that failed or dropped out)."""
    if msg.has_error() or not msg.has_content() or KEY not in msg.content:
        return None
    return dict(msg.content[KEY])


def wire_bytes(content: RecordDict) -> int:
    """Bytes of a message's content as Flower serialises it (protobuf; headers not counted)."""
    return recorddict_to_proto(content).ByteSize()


# -- server -----------------------------------------------------------------------------------


def make_server_app(
    make_server: Callable[[Context], FedServer],
    on_done: Callable[[FedServer], None],
    *,
    final_sync: bool | Callable[[Context], bool] = False,
    wait_for_nodes: float | Callable[[Context], float] = WAIT_FOR_NODES_S,
) -> ServerApp:
    """``final_sync``: after the last round every member rebuilds the final adapter and returns
    its digest (logged as a ``sync`` record). Either option may be a function of the Context
    (a deployment reads them from the run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        server = make_server(context)
        wait = wait_for_nodes(context) if callable(wait_for_nodes) else wait_for_nodes
        _wait_for_nodes(grid, server.cfg.clients, float(wait))
        while not server.done:
            _greet(grid, server)
            sampled = server.sample()
            if not sampled:
                raise RuntimeError("no client passed the fingerprint check; nothing to train")
            replies, up, down = _train_round(grid, server, sampled)
            record = server.finish_round(sampled, replies, up, down)
            log.info(
                "round %d: step %d, accepted %s, rejected %s, dropped %s",
                record["round"],
                record["step"],
                record["accepted"],
                record["rejected"],
                record["dropped"],
            )
        if final_sync(context) if callable(final_sync) else final_sync:
            _greet(grid, server)
            _sync(grid, server)
        on_done(server)

    return app


def _wait_for_nodes(grid: Grid, want: int, seconds: float = WAIT_FOR_NODES_S) -> None:
    deadline = time.monotonic() + seconds
    while len(list(grid.get_node_ids())) < want and time.monotonic() < deadline:
        time.sleep(0.5)


def _greet(grid: Grid, server: FedServer) -> None:
    """Hello to nodes not seen yet: they say their partition, examples and fingerprint."""
    new = [
        n
        for n in sorted(grid.get_node_ids())
        if n not in server.members and n not in server.refused
    ]
    if not new:
        return
    msgs = [Message(pack(server.hello_payload()), dst_node_id=n, message_type=HELLO) for n in new]
    for reply in grid.send_and_receive(msgs, timeout=server.cfg.round_timeout):
        server.admit(reply.metadata.src_node_id, unpack(reply))


def _train_round(
    grid: Grid, server: FedServer, sampled: dict[int, int]
) -> tuple[dict[int, dict | None], dict[int, int], dict[int, int]]:
    replies: dict[int, dict | None] = {}
    up: dict[int, int] = {}
    down: dict[int, int] = {}
    todo = sorted(sampled.values())
    for _attempt in range(2):  # a node asking to resync is sent the whole history once more
        msgs = []
        for node in todo:
            content = pack(server.payload(node))
            down[node] = down.get(node, 0) + wire_bytes(content)
            msgs.append(
                Message(content, dst_node_id=node, message_type="train", group_id=str(server.round))
            )
        got = {
            m.metadata.src_node_id: m
            for m in grid.send_and_receive(msgs, timeout=server.cfg.round_timeout)
        }
        todo = []
        for node in sorted(m.metadata.dst_node_id for m in msgs):
            msg = got.get(node)
            rep = None if msg is None else unpack(msg)
            if msg is not None and not msg.has_error():
                up[node] = up.get(node, 0) + wire_bytes(msg.content)
            replies[node] = rep
            if rep is not None and rep.get("status") == "resync":
                server.resync(node)
                todo.append(node)
        if not todo:
            break
    return replies, up, down


def _sync(grid: Grid, server: FedServer) -> dict:
    """Every member rebuilds the final global adapter; the server logs their digests."""
    replies: dict[int, dict | None] = {}
    todo = sorted(server.members)
    for _attempt in range(2):  # a node asking to resync is sent the whole history once more
        msgs = [
            Message(pack(server.payload(node)), dst_node_id=node, message_type=SYNC)
            for node in todo
        ]
        got = {
            m.metadata.src_node_id: unpack(m)
            for m in grid.send_and_receive(msgs, timeout=server.cfg.round_timeout)
        }
        todo = []
        for m in msgs:
            node = m.metadata.dst_node_id
            replies[node] = got.get(node)
            if replies[node] is not None and replies[node].get("status") == "resync":
                server.resync(node)
                todo.append(node)
        if not todo:
            break
    return server.finish_sync(replies)


# -- client -----------------------------------------------------------------------------------


def make_client_app(make_client: Callable[[Context], FedClient]) -> ClientApp:
    """``make_client(context)`` builds this node's client (called once per process and node)."""
    app = ClientApp()
    clients: dict[Any, FedClient] = {}

    def client_for(context: Context) -> FedClient:
        key = (context.run_id, context.node_id)
        if key not in clients:
            clients[key] = make_client(context)
        return clients[key]

    @app.query("hello")
    def hello(msg: Message, context: Context) -> Message:
        return Message(pack(client_for(context).hello()), reply_to=msg)

    @app.query("sync")
    def sync(msg: Message, context: Context) -> Message:
        client = client_for(context)
        reply, cache = client.sync(dict(msg.content[KEY]), _load_cache(client, context))
        _store_cache(context, cache, client.fingerprint)
        return Message(pack(reply), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        client = client_for(context)
        reply, cache = client.round(dict(msg.content[KEY]), _load_cache(client, context))
        _store_cache(context, cache, client.fingerprint)
        return Message(pack(reply), reply_to=msg)

    return app


def _load_cache(client: FedClient, context: Context) -> Any:
    # The node's cached global state lives in the Context (kept by the SuperNode or the
    # simulation between rounds), not in the process: Flower may run each call elsewhere.
    if CACHE not in context.state or CACHE_META not in context.state:
        return None
    arrays = {k: a.numpy() for k, a in context.state[CACHE].items()}
    meta = dict(context.state[CACHE_META])
    if meta.get("fingerprint") != client.fingerprint:
        return None
    return state_from_arrays(client.initial, arrays, meta)


def _store_cache(context: Context, state: Any, fingerprint: str) -> None:
    if state is None:
        context.state.pop(CACHE, None)
        context.state.pop(CACHE_META, None)
        return
    arrays, meta = state_to_arrays(state)
    context.state[CACHE] = ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()})
    context.state[CACHE_META] = ConfigRecord(meta | {"fingerprint": fingerprint})


# -- deployment (SuperLink + SuperNodes) ------------------------------------------------------
# The components named in ``zoo_ort/scale/flower_app/pyproject.toml``: the same apps, built from
# the run config (server) and the node config (client); see :mod:`zoo_ort.scale.fl_context`.


def _deployed_server() -> ServerApp:
    from zoo_ort.scale import fl_context

    return make_server_app(
        fl_context.server_from_context,
        fl_context.close_server,
        final_sync=fl_context.final_sync,
        wait_for_nodes=fl_context.wait_for_nodes,
    )


def _deployed_client() -> ClientApp:
    from zoo_ort.scale import fl_context

    return make_client_app(fl_context.client_from_context)


# Plain assignments: Flower checks the component names statically (flwr run, flwr build).
server_app = _deployed_server()
client_app = _deployed_client()
