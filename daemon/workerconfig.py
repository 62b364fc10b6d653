"""What a worker is started with: its config (versions, route, options, control socket and
secret, where to report), its ports, its TLS files, and the daemon's time limits."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from pathlib import Path

from mserve.daemon import ports, workerrecord
from mserve.daemon.envnumbers import drain_timeout, load_timeout
from mserve.daemon.errors import BadRequest, DeployFailed, MserveError
from mserve.daemon.paths import Paths, ensure_private_dir
from mserve.daemon.state import State
from mserve.daemon.store import Store
from mserve.daemon.workergroup import worker_count


def respawn_daemon() -> bool:
    """Whether a worker that lost its daemon starts a new one: not under a service manager
    (which restarts the daemon itself) and not where autostart is off."""
    return not os.environ.get("MSERVE_SUPERVISED") \
        and os.environ.get("MSERVE_NO_AUTOSTART") != "1"


def worker_config(paths: Paths, store: Store, d: dict, versions: list[tuple[dict | None, bool]],
                  bind_retry_s: float, route: dict | None = None, replica: int = 0,
                  join: bool = False, peer_secret: str | None = None) -> dict:
    """The config of process ``replica`` of deployment ``d``, serving ``versions`` ((row,
    active) pairs). ``join``: its siblings hold the ports already. It travels on the worker's
    stdin: it holds the token's hash and the secrets."""
    name = d["name"]
    control = workerrecord.socket_path(paths, name, replica)
    ensure_private_dir(control.parent)  # ours and 0700, even when it exists already
    return {
        "route": route or {"traffic": None, "labels": {},
                           "sticky": d["options"].get("sticky_header")},
        "name": name, "host": d["host"], "port": d["port"],
        "token_hash": d.get("token_hash"),
        "options": {**d["options"], "request_log": str(paths.request_log(name))},
        "bind_retry_s": bind_retry_s, "drain_s": drain_timeout(),
        "control_socket": str(control), "secret": secrets.token_hex(16),
        "record": str(workerrecord.record_path(paths, name, replica)),
        "replica": replica, "join": join, "peers": peer_sockets(paths, d),
        "peer_secret": peer_secret, "handoff_socket": handoff_socket(paths, d, replica),
        "log_path": str(paths.worker_log(name)), "daemon_socket": str(paths.socket),
        "daemon_log": str(paths.daemon_log), "respawn_daemon": respawn_daemon(),
        "start_timeout_s": load_timeout() * 1.25 + 2,
        "versions": [{"number": v["number"], "path": str(store.path_of(v["sha256"])),
                      "transformer": store.script_of(v), "active": active}
                     for v, active in versions if v],
    }


def group_configs(paths: Paths, store: Store, d: dict, versions: list[tuple[dict | None, bool]],
                  bind_retry_s: float, route: dict | None = None) -> list[dict]:
    """The configs of all of ``d``'s processes, started together (one secret between them)."""
    peer_secret = secrets.token_hex(16)
    return [worker_config(paths, store, d, versions, bind_retry_s, route, replica, False,
                          peer_secret)
            for replica in range(worker_count(d["options"].get("workers")))]


async def claim_ports(configs: list[dict]) -> list[dict]:
    """Processes started together: prove the ports free here, as a lone worker does itself
    before it binds (retrying while a previous worker still holds them), then let every
    process join the ports. DeployFailed when something else holds one."""
    if len(configs) < 2:
        return configs
    first = configs[0]
    for port, option in ((first["port"], "--port"), (first["options"].get("grpc_port"),
                                                     "--grpc-port")):
        if port and (problem := await asyncio.to_thread(
                ports.prove_free, first["host"], port, first["bind_retry_s"], option)):
            raise DeployFailed(problem)
    return [{**config, "join": True} for config in configs]


def peer_sockets(paths: Paths, d: dict) -> list[str]:
    """Where each process of ``d`` answers its siblings (none for a single process)."""
    count = worker_count(d["options"].get("workers"))
    return [str(workerrecord.socket_path(paths, d["name"], i, "p")) for i in range(count)] \
        if count > 1 else []


def handoff_socket(paths: Paths, d: dict, replica: int) -> str | None:
    """Where process ``replica`` of ``d`` takes a dead sibling's connections (handoff.py);
    None for a single process."""
    if worker_count(d["options"].get("workers")) < 2:
        return None
    return str(workerrecord.socket_path(paths, d["name"], replica, "h"))


def used_ports(state: State) -> set[int]:
    """HTTP and gRPC ports of every deployment."""
    return {p for d in state.deployments()
            for p in (d["port"], d["options"].get("grpc_port")) if p}


def free_port(host: str, taken: set[int]) -> int:
    """A port the OS says is free on ``host`` and no deployment has."""
    for _ in range(50):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, 0))
            except OSError as exc:  # a name that does not resolve, an address not ours
                raise BadRequest(f"cannot serve on --host {host!r}: "
                                 f"{exc.strerror or exc}") from None
            port = s.getsockname()[1]
        if port not in taken:
            return port
    raise MserveError("could not find a free port")


def store_tls(paths: Paths, name: str, req: dict) -> dict | None:
    """Copy --tls-cert/--tls-key into MSERVE_HOME/tls/NAME/ (0600), so the deployment
    does not depend on files the user may move; None without TLS."""
    if not req.get("tls_cert"):
        return None
    folder = paths.home / "tls" / name
    ensure_private_dir(folder)
    stored = {}
    for key, target in (("tls_cert", "cert.pem"), ("tls_key", "key.pem")):
        try:
            data = Path(req[key]).read_bytes()
        except OSError as exc:
            raise BadRequest(f"cannot read {key.replace('_', '-')} '{req[key]}': "
                             f"{exc.strerror}") from None
        path = folder / target
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        stored[target.split(".")[0]] = str(path)
    return stored
