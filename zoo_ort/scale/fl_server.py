"""The federation's server without Flower: global state, history, rounds, outputs, resume.

The run folder is a ``zoo-ort train`` run folder (``checkpoints/``, ``metrics.jsonl``,
``final/``, ``best/``, ``plot.png``, ``config.toml``); each checkpoint also holds the round
number and the aggregated history (the scalars of every global step, JSON floats, exact), so a
resumed server can bring any client up to date.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from zoo_ort.errors import ZooError
from zoo_ort.loop.checkpoint import load_latest, tensors_digest
from zoo_ort.loop.metrics import METRICS, MetricsLog, jsonable
from zoo_ort.loop.resume import restore_state, run_identity, save_state
from zoo_ort.scale.fl_client import flatten, manifest_sha256, unflatten
from zoo_ort.scale.fl_core import (
    SEEDS,
    ClientRound,
    History,
    aggregate,
    aggregate_blocks,
    blocks,
    default_g_limit,
    federation_fingerprint,
    finite_mean,
    replay,
    sample_clients,
    screen,
    state_digest,
)
from zoo_ort.settings import Settings
from zoo_ort.zo.step import init_state

log = logging.getLogger("zoo_ort.federated")


@dataclass(frozen=True)
class FedConfig:
    clients: int  # K: shards of the train split (simulation: SuperNodes)
    per_round: int  # M: clients sampled per round
    rounds: int  # R
    local_steps: int  # s: local ZO steps per client per round
    alpha: float = 0.5  # Dirichlet concentration of the label split (large: ~IID)
    g_limit: float | None = None  # |g| cap; None: 100/eps (see fl_core.default_g_limit)
    outlier_factor: float = 10.0  # RMS vs the round's median (three or more clients)
    eval_every: int = 1  # rounds between dev evaluations (0: only at the end)
    round_timeout: float | None = None  # seconds to wait for replies (None: all of them)
    seeds: str = "distinct"  # each client its own directions, or one shared set (fl_core)

    def validate(self) -> FedConfig:
        checks = [
            (self.clients >= 1, "clients must be >= 1"),
            (1 <= self.per_round <= self.clients, "per_round must be in 1..clients"),
            (self.rounds >= 1 and self.local_steps >= 1, "rounds and local_steps must be >= 1"),
            (self.alpha > 0, "alpha must be > 0"),
            (self.eval_every >= 0, "eval_every must be >= 0"),
            (self.seeds in SEEDS, f"seeds must be one of {', '.join(SEEDS)}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ZooError(f"bad federation setting: {msg}")
        return self

    @property
    def steps_per_round(self) -> int:
        """Global steps a round adds: ``M·s`` with distinct seeds, ``s`` with shared ones."""
        return self.local_steps * (self.per_round if self.seeds == "distinct" else 1)


def fed_settings(settings: Settings, cfg: FedConfig) -> Settings:
    """The run's settings: ``steps`` is the global step count (the schedule's horizon)."""
    return replace(settings, steps=cfg.rounds * cfg.steps_per_round).validate()


class FedServer:
    """Holds the global state; plans rounds and folds the replies back in."""

    def __init__(
        self,
        settings: Settings,
        cfg: FedConfig,
        run_dir: str | Path,
        prepared: Any,
        *,
        resume: bool = False,
    ) -> None:
        self.s, self.cfg, self.p = settings, cfg.validate(), prepared
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fresh = init_state(prepared.params, prepared.frozen, settings)
        self.fingerprint = federation_fingerprint(
            settings,
            manifest_sha256(prepared.bundle),
            tensors_digest(prepared.params, prepared.frozen),
            cfg.local_steps,
            cfg.seeds,
        )
        fl = {"clients": cfg.clients, "alpha": cfg.alpha, "per_round": cfg.per_round}
        self.identity = run_identity(settings, fresh, {"federation": self.fingerprint, **fl})
        self.log = MetricsLog(self.run_dir / METRICS)
        self.state, self.history, self.round = fresh, History(), 0
        ckpt = load_latest(self.run_dir)
        if ckpt is not None and not resume:
            raise ZooError(f"{self.run_dir} already holds a run; resume it or choose another")
        if ckpt is not None:
            self.state = restore_state(self.run_dir, ckpt, fresh, self.identity)
            self.round = int(ckpt.info["fl_round"])
            self.history = History.from_json(ckpt.info["fl_history"])
            if len(self.history) != self.state.step:
                raise ZooError(f"{self.run_dir}: checkpoint history does not match its step")
        self.resumed_from = None if ckpt is None else self.round
        self.log.truncate_after(self.state.step if ckpt is not None else -1)
        self.known: dict[int, int] = {}  # node -> global step whose state it has cached
        self.blocks: dict[int, int] = {}  # node -> its first step index this round
        self.members: dict[int, dict[str, Any]] = {}  # node -> hello (partition, examples)
        self.refused: dict[int, str] = {}
        self.g_limit = cfg.g_limit or default_g_limit(settings)

    # -- membership ---------------------------------------------------------------------------

    def hello_payload(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint}

    def admit(self, node: int, hello: dict[str, Any] | None, why: str = "no reply") -> None:
        """Record a node's hello; a node of another bundle or settings is refused for good."""
        if hello is None:
            return  # it may answer next round
        if hello.get("fingerprint") != self.fingerprint:
            self.refused[node] = "fingerprint mismatch (another bundle, adapter or settings)"
            log.warning(
                "refused node %s (partition %s): %s",
                node,
                hello.get("partition"),
                self.refused[node],
            )
            self.log.append(
                {
                    "kind": "refused",
                    "step": self.state.step,
                    "node": node,
                    "partition": hello.get("partition"),
                    "reason": self.refused[node],
                }
            )
            return
        taken = {int(h["partition"]): n for n, h in self.members.items()}
        part = hello.get("partition")
        if isinstance(part, int) and taken.get(part, node) != node:
            # Two SuperNodes with one partition-id (a deployment's node config): keep the first.
            self.refused[node] = f"partition {part} is already node {taken[part]}'s"
            log.warning("refused node %s: %s", node, self.refused[node])
            self.log.append(
                {
                    "kind": "refused",
                    "step": self.state.step,
                    "node": node,
                    "partition": part,
                    "reason": self.refused[node],
                }
            )
            return
        self.members[node] = hello

    # -- rounds -------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.round >= self.cfg.rounds

    def sample(self) -> dict[int, int]:
        """This round's clients: partition -> node (a pure function of seed and round)."""
        by_partition = {int(h["partition"]): n for n, h in self.members.items()}
        chosen = sample_clients(by_partition, self.cfg.per_round, self.s.seed, self.round)
        first = blocks(chosen, self.state.step, self.cfg.local_steps, self.cfg.seeds)
        self.blocks = {by_partition[p]: b for p, b in first.items()}
        return {p: by_partition[p] for p in chosen}

    def payload(self, node: int) -> dict[str, Any]:
        """What a sampled node gets: the pairs it lacks, the round's step and global digest."""
        since = self.known.get(node, 0)
        pairs = self.history.since(since)
        out = {
            "fingerprint": self.fingerprint,
            "round": self.round,
            "step": self.state.step,
            "sync_from": since,
            "g": flatten(pairs.g),
            "digest": state_digest(self.state),
            "local_steps": self.cfg.local_steps,
            "block": self.blocks.get(node, self.state.step),
        }
        if self.s.estimator == "hizoo":
            out["curv"] = flatten(pairs.curv)
        return out

    def resync(self, node: int) -> None:
        """The node's cache is not where we thought: next payload carries the whole history."""
        self.known[node] = 0

    def finish_round(
        self,
        sampled: dict[int, int],
        replies: dict[int, dict[str, Any] | None],
        bytes_up: dict[int, int],
        bytes_down: dict[int, int],
    ) -> dict[str, Any]:
        """Screen, aggregate and replay the round; log, evaluate, checkpoint. ``replies`` maps
        node -> reply (None: no reply or an error: the client dropped out)."""
        t, s = self.state.step, self.cfg.local_steps
        rounds: list[ClientRound] = []
        dropped, rejected = [], {}
        partition_of = {n: p for p, n in sampled.items()}
        for node in sorted(sampled.values()):
            rep = replies.get(node)
            part = partition_of[node]
            if rep is None:
                dropped.append(part)
                continue
            status = rep.get("status")
            if status != "ok":
                rejected[part] = f"client said {status}"
                if status == "resync":
                    self.resync(node)
                continue
            q = self.s.queries
            curv = rep.get("curv")
            rounds.append(
                ClientRound(
                    partition=part,
                    fingerprint=str(rep.get("fingerprint")),
                    step=int(rep.get("step", -1)),
                    examples=rep.get("examples"),
                    g=unflatten(list(rep.get("g", [])), q),
                    curv=None if curv is None else unflatten(list(curv), q),
                    digest=str(rep.get("digest")),
                    loss=float(rep.get("loss", float("nan"))),
                    rows=int(rep.get("rows", 0)),
                )
            )
            self.known[node] = t  # it rebuilt the global state at t and cached it
        verdict = screen(
            rounds,
            fingerprint=self.fingerprint,
            step=t,
            digest=state_digest(self.state),
            shape=(s, self.s.queries),
            g_limit=self.g_limit,
            eps=self.s.eps,
            outlier_factor=self.cfg.outlier_factor,
        )
        rejected |= verdict.rejected
        for part, why in sorted(rejected.items()):
            log.warning("round %d: rejected client %d: %s", self.round, part, why)
        if self.cfg.seeds == "distinct":
            pairs = aggregate_blocks(verdict.accepted, t, sorted(sampled), s, self.s.queries)
        else:
            pairs = aggregate(verdict.accepted, t)
        if pairs.g:
            self.state = replay(self.state, pairs, self.s)
            self.history.extend(pairs)
        self.round += 1
        acc = verdict.accepted
        record = {
            "kind": "round",
            "round": self.round,
            "step": self.state.step,
            "loss": finite_mean([r.loss for r in acc], [r.examples for r in acc]),
            "clients": sorted(sampled),
            "accepted": [r.partition for r in acc],
            "rejected": {str(k): v for k, v in sorted(rejected.items())},
            "dropped": dropped,
            "rows": int(sum(r.rows for r in rounds)),
            "bytes_up": {str(partition_of[n]): b for n, b in sorted(bytes_up.items())},
            "bytes_down": {str(partition_of[n]): b for n, b in sorted(bytes_down.items())},
            "bytes_up_mean": _mean(bytes_up.values()),
            "bytes_down_mean": _mean(bytes_down.values()),
            "digest": state_digest(self.state),
            "rebuilt_digests": sorted({r.digest for r in rounds}),
        }
        if record["loss"] is None:
            record.pop("loss")  # the plot reads "loss" as a training loss; none this round
        self.log.append(record)
        every = self.cfg.eval_every
        if self.done or (every and self.round % every == 0):
            record["eval"] = self.evaluate()
        self.checkpoint()
        return record

    def finish_sync(self, replies: dict[int, dict[str, Any] | None]) -> dict[str, Any]:
        """Log the digests the members rebuilt of the final global adapter (node -> reply of a
        ``query.sync``; None: no reply). ``in_sync``: every member answered with the server's
        digest (deployment's end-of-run check that the clients hold the server's adapter)."""
        want = state_digest(self.state)
        got: dict[str, str | None] = {}
        for node, rep in sorted(replies.items()):
            part = self.members.get(node, {}).get("partition", node)
            ok = rep is not None and rep.get("status") == "ok"
            got[str(part)] = str(rep.get("digest")) if ok else None
            if ok and int(rep.get("step", -1)) == self.state.step:
                self.known[node] = self.state.step
        record = {
            "kind": "sync",
            "round": self.round,
            "step": self.state.step,
            "digest": want,
            "client_digests": dict(sorted(got.items())),
            "in_sync": bool(got) and all(d == want for d in got.values()),
        }
        if not record["in_sync"]:
            log.warning("final sync: clients rebuilt %s, the server holds %s", got, want)
        self.log.append(record)
        return record

    # -- outputs ------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        raw = dict(self.p.evaluate({**self.state.frozen, **self.state.params}))
        metrics = jsonable(raw)
        self.log.append({"step": self.state.step, "round": self.round, "eval": metrics})
        name, mode = self.s.best
        value, best = raw.get(name), self.state.best_metric
        if isinstance(value, int | float | np.floating | np.integer) and np.isfinite(value):
            value = float(value)
            if best is None or (value > best if mode == "max" else value < best):
                copy = {k: np.array(v, copy=True) for k, v in self.state.params.items()}
                self.state = replace(
                    self.state, best_params=copy, best_metric=value, best_step=self.state.step
                )
        self.state = replace(self.state, final_eval=metrics if self.done else None)
        return metrics

    def checkpoint(self) -> None:
        info = self.identity | {"fl_round": self.round, "fl_history": self.history.to_json()}
        save_state(self.run_dir, self.state, info, self.s.keep_checkpoints)

    def close(self, save_adapter: Any) -> None:
        """Final adapters, a checkpoint marked finished, the plot."""
        from zoo_ort.loop.metrics import plot
        from zoo_ort.loop.train import BEST_DIR, FINAL_DIR

        self.state = replace(self.state, finished=True)
        self.checkpoint()
        save_adapter(self.state.params, self.state.frozen, self.run_dir / FINAL_DIR)
        if self.state.best_params is not None:
            save_adapter(self.state.best_params, self.state.frozen, self.run_dir / BEST_DIR)
        plot(self.run_dir, title=f"federated: {self.cfg.clients} clients, α={self.cfg.alpha}")


def _mean(values: Any) -> float | None:
    vals = list(values)
    return float(sum(vals) / len(vals)) if vals else None
