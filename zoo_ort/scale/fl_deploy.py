"""The federation on Flower's deployment engine: one SuperLink, SuperNodes, ``flwr run``.

The same ServerApp and ClientApp as the simulation (:mod:`zoo_ort.scale.fl_apps`), built from
Flower's run and node configs (:mod:`zoo_ort.scale.fl_context`) instead of Python arguments.
:func:`run_local` starts 1 SuperLink and N SuperNodes on 127.0.0.1 (free ports), submits a run
with ``flwr run``, waits for it, checks that every client rebuilt the server's final adapter,
and stops every process it started (also on failure).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo_ort.errors import ZooError

APP_DIR = Path(__file__).with_name("flower_app")
CONNECTION = "zoo-local"  # the [superlink.NAME] run_local writes into its FLWR_HOME
QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def app_dir() -> Path:
    """The Flower app folder shipped in the package (``flwr run`` takes this path)."""
    if not (APP_DIR / "pyproject.toml").is_file():
        raise ZooError(f"{APP_DIR}/pyproject.toml is missing (a broken zoo-ort install)")
    return APP_DIR


# -- a local deployment: SuperLink + SuperNodes on 127.0.0.1 ----------------------------------


class DeployError(ZooError):
    """The local deployment failed; the message ends with the processes' log tails."""


@dataclass
class LocalDeployment:
    """The processes :func:`run_local` started (each in its own session) and their logs."""

    home: Path  # FLWR_HOME: config.toml, the SuperLink's apps, logs/
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    def start(self, name: str, argv: Sequence[str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.home,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise DeployError(f"{name} exited with code {proc.returncode}" + self.tails())

    def flwr(self, *args: str, timeout: float = 120.0) -> str:
        """``flwr ARGS`` against this deployment (its FLWR_HOME); stdout, or DeployError."""
        argv = [_exe("flwr"), *args]
        try:
            res = subprocess.run(
                argv,
                env=self.env,
                cwd=self.home,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            msg = f"{' '.join(argv)}: no answer in {timeout:g}s"
            raise DeployError(msg + self.tails()) from None
        if res.returncode:
            raise DeployError(
                f"{' '.join(argv)} failed ({res.returncode}):\n{res.stdout[-2000:]}"
                f"{res.stderr[-2000:]}" + self.tails()
            )
        return res.stdout

    def tails(self, chars: int = 3000) -> str:
        out = []
        for name in self.procs:
            path = self.logs / f"{name}.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            out.append(f"\n--- {name} ({path}) ---\n{text[-chars:]}")
        return "".join(out)

    def stop(self, grace: float = 10.0) -> list[int]:
        """SIGTERM every started process and its descendants (SuperExec, app processes),
        SIGKILL what is left after ``grace`` seconds; returns the pids it stopped. Safe to
        call twice."""
        pids: list[int] = []
        for proc in reversed(list(self.procs.values())):  # SuperNodes before the SuperLink
            if proc.poll() is None:
                pids += [*_descendants(proc.pid), proc.pid]
        stopped = list(pids)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                _signal(pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                for proc in self.procs.values():
                    proc.poll()  # reap ours
                pids = [p for p in pids if _alive(p)]
                if not pids:
                    break
                time.sleep(0.2)
            if not pids:
                break
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
        return stopped


def run_local(
    bundle: str | Path,
    data: str,
    out: str | Path,
    *,
    nodes: int = 2,
    rounds: int = 2,
    local_steps: int = 1,
    seeds: str = "distinct",
    settings: Mapping[str, Any] | None = None,
    task: str | None = None,
    alpha: float = 0.5,
    node_data: Sequence[str] | None = None,
    timeout: float = 600.0,
    home: str | Path | None = None,
    keep_home: bool = False,
) -> dict[str, Any]:
    """Run a federation under SuperLink + ``nodes`` SuperNodes on 127.0.0.1 and check it.

    ``settings``: ``zoo-ort train`` settings (``lr``, ``batch_size``, ...). ``node_data``: each
    SuperNode's own data (default: ``data`` split over the nodes, partition-id k of
    num-partitions ``nodes``). Every process is stopped before this returns or raises;
    ``timeout`` bounds the whole run (plus about 20 s to stop). Returns :func:`check_run`'s
    result, the run id and status, FLWR_HOME (logs/; removed unless ``keep_home``) and the
    pids stopped; raises :class:`DeployError` when the run fails or
    a client's rebuilt adapter is not the server's.
    """
    from zoo_ort.scale.federated import require_flwr

    require_flwr()
    started = time.monotonic()
    out = Path(out).resolve()
    if home is None:
        home = Path(tempfile.mkdtemp(prefix="zoo-flwr-"))
    dep = LocalDeployment(Path(home).resolve(), _env(Path(home).resolve()))
    dep.home.mkdir(parents=True, exist_ok=True)
    ok = False
    try:
        link_port, *node_ports = _free_ports(1 + nodes)
        address = f"127.0.0.1:{link_port}"
        dep.start(
            "superlink",
            [
                _exe("flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(link_port),
                "--disable-runtime-dependency-installation",
            ],
        )
        _wait_for_port(dep, link_port, deadline=started + min(timeout, 120.0))
        for k, port in enumerate(node_ports):
            own = node_data[k] if node_data else None
            node_config = {
                "partition-id": k,
                "num-partitions": 1 if own else nodes,
                "bundle": str(Path(bundle).resolve()),
                "data": own or data,
                "threads": 1,
            }
            dep.start(
                f"supernode-{k}",
                [
                    _exe("flower-supernode"),
                    "--insecure",
                    "--superlink",
                    address,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--node-config",
                    node_config_arg(node_config),
                ],
            )
        _write_connection(dep.home, address)
        run_config = {
            "bundle": str(Path(bundle).resolve()),
            "data": data,
            "task": task or "",
            "out": str(out),
            "settings": json.dumps(dict(settings or {})),
            "clients": nodes,
            "per-round": nodes,
            "rounds": rounds,
            "local-steps": local_steps,
            "seeds": seeds,
            "alpha": alpha,
            "final-sync": True,
            "wait-for-nodes": max(30.0, timeout / 2),
        }
        rc_file = dep.home / "run_config.toml"
        rc_file.write_text(_toml(run_config))
        submitted = dep.flwr(
            "run", str(app_dir()), CONNECTION, "--run-config", str(rc_file), "--format", "json"
        )
        run_id = str(_json_tail(submitted).get("run-id"))
        status = _wait_for_run(dep, run_id, deadline=started + timeout)
        if status != "finished:completed":
            raise DeployError(f"run {run_id} ended {status}" + dep.tails())
        result = check_run(out) | {"run_id": run_id, "status": status, "home": dep.home}
        ok = True
    finally:
        stopped = dep.stop()
        if ok and not keep_home:
            shutil.rmtree(dep.home, ignore_errors=True)
    return result | {"stopped_pids": stopped, "seconds": time.monotonic() - started}


def check_run(out: str | Path) -> dict[str, Any]:
    """A finished deployed run folder's check: the final checkpoint is marked finished, each
    round's clients rebuilt the adapter of the round before, and every client's rebuilt final
    adapter (the ``sync`` record) has the digest of the server's final adapter."""
    from zoo_ort.loop.checkpoint import load_latest, tensors_digest
    from zoo_ort.loop.metrics import read_metrics

    out = Path(out)
    ckpt = load_latest(out)
    if ckpt is None or not ckpt.info.get("finished"):
        raise DeployError(f"{out}: no finished checkpoint")
    final = tensors_digest(ckpt.params)[:32]
    records = read_metrics(out)
    rounds = [r for r in records if r.get("kind") == "round"]
    syncs = [r for r in records if r.get("kind") == "sync"]
    before = [None] + [r["digest"] for r in rounds[:-1]]
    for prev, r in zip(before, rounds, strict=True):
        if prev is not None and r.get("rebuilt_digests") != [prev]:
            raise DeployError(f"round {r['round']}: clients rebuilt {r.get('rebuilt_digests')}")
    if not syncs:
        raise DeployError(f"{out}: no sync record (final-sync off?)")
    sync = syncs[-1]
    if sync["digest"] != final or not sync["in_sync"]:
        raise DeployError(
            f"clients rebuilt {sync['client_digests']}, the server's final adapter is {final}"
        )
    return {"rounds": rounds, "sync": sync, "digest": final, "step": ckpt.step, "out": out}


# -- helpers ----------------------------------------------------------------------------------


def node_config_arg(values: Mapping[str, Any]) -> str:
    """``--node-config`` text: ``key=value`` pairs, strings as TOML literal strings."""
    parts = []
    for k, v in values.items():
        if isinstance(v, str):
            if "'" in v or "\n" in v:
                raise ZooError(f"node config value {v!r} holds a quote or a newline")
            v = f"'{v}'"
        elif isinstance(v, bool):
            v = "true" if v else "false"
        parts.append(f"{k}={v}")
    return " ".join(parts)


def _toml(values: Mapping[str, Any]) -> str:
    # Flat keys of str/int/float/bool; JSON's string escapes are valid TOML basic strings.
    lines = []
    for k, v in values.items():
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, int | float):
            lines.append(f"{k} = {v!r}")
        else:
            lines.append(f"{k} = {json.dumps(str(v))}")
    return "\n".join(lines) + "\n"


def _write_connection(home: Path, address: str) -> None:
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\ninsecure = true\n'
    )


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ) | QUIET_ENV
    env["FLWR_HOME"] = str(home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    # SuperLink and SuperNode start flower-superexec, flwr-serverapp and flwr-clientapp by name.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _exe(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise DeployError(f"{name} not found: pip install 'zoo-ort[fl]'")
    return found


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_for_port(dep: LocalDeployment, port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        dep.check_alive()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise DeployError(f"the SuperLink did not open 127.0.0.1:{port}" + dep.tails())


def _wait_for_run(dep: LocalDeployment, run_id: str, deadline: float) -> str:
    status = "unknown"
    while time.monotonic() < deadline:
        dep.check_alive()
        left = max(5.0, deadline - time.monotonic())
        listed = dep.flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json", timeout=left)
        runs = _json_tail(listed).get("runs") or [{}]
        status = str(runs[0].get("status", "unknown"))
        if status.startswith("finished"):
            return status
        time.sleep(3.0)
    raise DeployError(f"run {run_id} not finished in time (last status {status})" + dep.tails())


def _json_tail(text: str) -> dict[str, Any]:
    """The JSON object a ``flwr ... --format json`` printed (after any other output)."""
    start = text.find("{")
    while start != -1:
        try:
            value = json.loads(text[start:])
            if isinstance(value, dict):
                return value
        except json.JSONDecodeError:
            pass
        start = text.find("{", start + 1)
    raise DeployError(f"no JSON in flwr's output:\n{text[-2000:]}")


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, deepest first (Linux /proc; else none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = entry.read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.parent.name))
    out: list[int] = []

    def walk(p: int) -> None:
        for c in children.get(p, []):
            walk(c)
            out.append(c)

    walk(pid)
    return out


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"  # a zombie has exited
    except (OSError, ValueError, IndexError):
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
