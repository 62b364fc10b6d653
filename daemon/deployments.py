"""Deploy, roll back, undeploy and restore: the daemon's operations on deployments.

Each operation takes the deployment's lock (one change per name at a time, names in
parallel), does the slow work (copy, probe, load) first, and records the outcome in one
SQLite transaction only after the worker confirmed it. On any failure the state and the
serving version are what they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import shutil
import socket
import sqlite3
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from mserve.daemon import faults, validation
from mserve.daemon import state as st
from mserve.daemon.errors import BadRequest, Conflict, DeployFailed, MserveError, NotFound
from mserve.daemon.paths import Paths, check_name, ensure_private_dir
from mserve.daemon.plan import (Plan, canary_percent, check_batching, check_same_place,
                                default_name, hash_token, input_changes, signature_changes)
from mserve.daemon.state import State
from mserve.daemon.store import Store
from mserve.daemon.supervisor import READY, Supervisor

log = logging.getLogger("mserve.daemon")
DEFAULT_OPTIONS = {"device": "auto", "max_batch_size": None, "batch_delay_ms": None,
                   "max_queue": None, "instances": 1, "max_body_mb": 64,
                   "sticky_header": None, "keep": 5, "log_payloads": False,
                   "batching": "auto"}
OPTION_KEYS = tuple(DEFAULT_OPTIONS)
# The deploy in progress reports its phases here (one per task, so parallel deploys of
# different names do not mix their reports).
_progress: contextvars.ContextVar[Callable[[dict], None]] = contextvars.ContextVar(
    "progress", default=lambda step: None)


def load_timeout() -> float:
    return float(os.environ.get("MSERVE_LOAD_TIMEOUT", "120"))


class Deployments:
    def __init__(self, paths: Paths, state: State, store: Store, python: str = sys.executable):
        self.paths, self.state, self.store, self.python = paths, state, store, python
        self.supervisor = Supervisor(paths.worker_log, self._on_exit, self._restart, python)
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._reserved_ports: set[int] = set()
        self.ingesting: set[str] = set()  # stored blobs whose deploy has not finished

    # ---- reads -------------------------------------------------------------------------
    def describe(self, d: dict) -> dict:
        """One deployment as ``list`` shows it: state from SQLite, status from the worker."""
        worker = self.supervisor.get(d["name"])
        active = self.state.version(d["name"], d["active_version"]) or {}
        shown_host = "127.0.0.1" if d["host"] in ("0.0.0.0", "::", "") else d["host"]
        scheme = "https" if d["options"].get("tls") else "http"
        return {
            "name": d["name"], "version": d["active_version"],
            "status": worker.status if worker else "loading",
            "url": f"{scheme}://{_url_host(shown_host)}:{d['port']}", "port": d["port"],
            "grpc_port": d["options"].get("grpc_port"),
            "grpc_url": (f"{_url_host(shown_host)}:{d['options']['grpc_port']}"
                         if d["options"].get("grpc_port") else None),
            "host": d["host"], "device": active.get("meta", {}).get("device"),
            "batching": active.get("meta", {}).get("batching"),
            "versions": len(self.state.versions(d["name"])),
            "pid": worker.pid if worker else None,
            "restarts": worker.restarts if worker else 0,
            "error": worker.error if worker else None,
            "options": d["options"], "auth": d["token_hash"] is not None,
            "tls_cert": (d["options"].get("tls") or {}).get("cert"),
            "created": d["created"], "updated": d["updated"],
        }

    async def live(self, name: str) -> dict | None:
        """The worker's own figures (last minute, memory), or None if it cannot say now."""
        worker = self.supervisor.get(name)
        if worker is None or worker.status != READY:
            return None
        try:
            reply = await worker.request("stats", 1.0)
        except MserveError:
            return None
        return {k: v for k, v in reply.items() if k not in ("id", "ok")}

    async def describe_live(self, d: dict) -> dict:
        return {**self.describe(d), "live": await self.live(d["name"])}

    async def list_live(self) -> list[dict]:
        return list(await asyncio.gather(*(self.describe_live(d)
                                           for d in self.state.deployments())))

    def detail(self, d: dict, live: dict | None) -> dict:
        """Everything about one deployment, for ``mserve status NAME``."""
        return {**self.describe(d), "live": live,
                "loaded": (live or {}).get("loaded", []),
                "versions_detail": [_version_view(v) for v in self.state.versions(d["name"])],
                "events": self.state.events(d["name"], limit=10)}

    def get(self, name: str) -> dict:
        d = self.state.deployment(name)
        if d is None:
            raise NotFound(f"deployment '{name}' not found")
        return d

    # ---- deploy ------------------------------------------------------------------------
    async def deploy(self, req: dict, progress: Callable[[dict], None] | None = None) -> dict:
        """Deploy ``req``; ``progress`` (called on the event loop) hears each phase:
        copy (with bytes), validate, load, switch."""
        _progress.set(progress or (lambda step: None))
        return await self._deploy_locked(req)

    async def _deploy_locked(self, req: dict) -> dict:
        source = Path(req.get("path") or "")
        if not source.is_absolute():
            raise BadRequest("path must be absolute")
        name = req.get("name") or default_name(source)
        if problem := check_name(name):
            raise BadRequest(problem)
        check_batching(req)
        async with self._locks[name]:
            return await self._deploy(name, source, req)

    async def copy_artifact(self, name: str, number: int, target: str) -> dict:
        """Copy a version's stored files into the folder ``target`` (for ``export``)."""
        v = self.state.version(self.get(name)["name"], number)
        if v is None or v["state"] == st.PRUNED or not self.store.has(v["sha256"]):
            raise NotFound(f"version {number} of '{name}' is not in the model store")
        destination = Path(target)
        if not destination.is_absolute():
            raise BadRequest("'to' must be an absolute path")
        try:
            await asyncio.to_thread(shutil.copytree, self.store.root / v["sha256"],
                                    destination, dirs_exist_ok=True)
        except OSError as exc:
            raise BadRequest(f"cannot write '{destination}': {exc.strerror or exc}") from None
        return {"name": name, "version": number, "to": str(destination)}

    def version_rows(self, name: str, loaded: set[int]) -> list[dict]:
        """``versions`` with whether each is loaded in the worker and on disk."""
        return [{**_version_view(v), "loaded": v["number"] in loaded,
                 "on_disk": self.store.has(v["sha256"]) and v["state"] != st.PRUNED}
                for v in self.state.versions(self.get(name)["name"])]

    async def _deploy(self, name: str, source: Path, req: dict) -> dict:
        existing = self.state.deployment(name)
        if existing:
            check_same_place(existing, req)
        report, loop = _progress.get(), asyncio.get_running_loop()

        def copied(done: int, total: int) -> None:
            loop.call_soon_threadsafe(report, {"step": "copy", "done": done, "total": total})

        artifact = await asyncio.to_thread(self.store.ingest, source, copied)
        self.ingesting.add(artifact.sha256)
        try:
            await asyncio.to_thread(faults.pause, "after-copy")
            return await self._deploy_stored(name, artifact, existing, req)
        finally:
            self.ingesting.discard(artifact.sha256)

    async def _deploy_stored(self, name: str, artifact, existing: dict | None, req: dict) -> dict:
        if existing:
            active = self.state.version(name, existing["active_version"])
            if active and active["sha256"] == artifact.sha256:
                log.info("deploy of %s from %s: identical to active version %s, nothing "
                         "changed", name, artifact.source, active["number"])
                return {"changed": False, "name": name, "version": active["number"],
                        "sha256": artifact.sha256, "signature_changed": [],
                        "deployment": self.describe(existing)}
        number = self.state.next_version(name)
        version = {"number": number, "sha256": artifact.sha256, "size": artifact.size,
                   "source": artifact.source}
        options = {**(existing or {}).get("options", DEFAULT_OPTIONS),
                   **{k: req[k] for k in OPTION_KEYS if req.get(k) is not None}}
        token_hash = hash_token(req.get("token")) or (existing or {}).get("token_hash")
        canary = canary_percent(req, existing)
        changes: list[str] = []
        try:
            if existing:
                version["meta"], changes = await self._switch_to_new(
                    existing, version, options, token_hash, canary,
                    bool(req.get("allow_signature_change")))
                await self._record_or_undo(existing, version, {
                    **existing, "options": options, "token_hash": token_hash}, canary)
            else:
                await self._first_deploy(name, version, options, token_hash, req)
        except DeployFailed as exc:
            message = _user_words(exc.message, artifact, self.store.path_of(artifact.sha256))
            log.info("deploy of %s failed (version %s from %s): %s", name, number,
                     artifact.source, message)
            with contextlib.suppress(sqlite3.Error):
                self.state.record_failed(name, version, message)
            if message == exc.message:
                raise
            raise DeployFailed(message, hint=exc.hint) from None
        except MserveError as exc:
            log.info("deploy of %s refused (version %s from %s): %s", name, number,
                     artifact.source, exc.message)
            raise
        log.info("deployed %s version %s (sha256 %s, %s, from %s)%s", name, number,
                 artifact.sha256[:12], _size(artifact.size), artifact.source,
                 f" as a {canary}% canary" if canary else "")
        d = self.state.deployment(name)
        return {"changed": True, "name": name, "version": number, "sha256": artifact.sha256,
                "previous": existing["active_version"] if existing else None,
                "signature_changed": changes, "deployment": self.describe(d)}

    async def _record_or_undo(self, d: dict | None, version: dict, row: dict,
                              canary: int | None = None) -> None:
        """Record the switch; if SQLite cannot (disk full), switch the worker back so what
        serves is what the state says."""
        try:
            self.state.record_deploy(row["name"], version, row, canary)
        except sqlite3.Error as exc:
            if d is None:
                await self.supervisor.stop(row["name"], timeout=5)
            else:
                with contextlib.suppress(MserveError):
                    await self.apply(d, self.current_plan(d))
            raise MserveError(f"could not record the new version ({exc}); the previous "
                              "state is unchanged") from None

    def _store_tls(self, name: str, req: dict) -> dict | None:
        """Copy --tls-cert/--tls-key into MSERVE_HOME/tls/NAME/ (0600), so the deployment
        does not depend on files the user may move; None without TLS."""
        if not req.get("tls_cert"):
            return None
        folder = self.paths.home / "tls" / name
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

    async def _first_deploy(self, name, version, options, token_hash, req) -> None:
        host = req.get("host") or "127.0.0.1"
        tls = self._store_tls(name, req)
        if tls:
            options = {**options, "tls": tls}
        port = req.get("port") or self._free_port(host)
        grpc_port = req.get("grpc_port") or self._free_port(host, also_taken={port})
        for p in {port, grpc_port}:
            if p in self._used_ports() or p in self._reserved_ports:
                raise Conflict(f"port {p} is already used by another deployment")
        if port == grpc_port:
            raise Conflict(f"--port and --grpc-port must differ (both {port})")
        options = {**options, "grpc_port": grpc_port}
        self._reserved_ports |= {port, grpc_port}
        try:
            d = {"name": name, "host": host, "port": port, "options": options,
                 "token_hash": token_hash}
            config = self._config(d, [(version, True)], bind_retry_s=0)
            _progress.get()({"step": "load"})
            event = await self._start_or_fail(name, config)
            version["meta"] = event["versions"][str(version["number"])]
            await self._record_or_undo(None, version, d)
        finally:
            self._reserved_ports -= {port, grpc_port}

    async def _start_or_fail(self, name: str, config: dict) -> dict:
        """Start the worker on ``config``. If that fails, a new deployment leaves no worker
        behind; an existing one is restarted later on what the state says."""
        try:
            return await self.supervisor.start(name, config, load_timeout())
        except DeployFailed as exc:
            if self.state.deployment(name) is None:
                self.supervisor.workers.pop(name, None)
            else:
                self.supervisor.note_failed_start(name, exc.message)
            raise

    async def _switch_to_new(self, d: dict, version: dict, options: dict, token_hash,
                             canary: int | None = None, allow_change: bool = False
                             ) -> tuple[dict, list[str]]:
        """Probe the new version in a child, load it next to the serving one, then switch
        (or, as a canary, give it a share of the traffic). Its metadata, and how its
        signature differs from the active version's."""
        name, path = d["name"], str(self.store.path_of(version["sha256"]))
        old = d["active_version"]
        d = {**d, "options": options, "token_hash": token_hash}
        if canary:
            plan = Plan(old, {old: 100 - canary, version["number"]: canary}, d["labels"],
                        self._standby(d))
        else:
            plan = Plan(version["number"], None, d["labels"], old)
        _progress.get()({"step": "validate"})
        probed = await self.probe(path, options["device"], options.get("batching"))
        changes = signature_changes((self.state.version(name, old) or {}).get("meta"), probed)
        if canary and input_changes(changes) and not allow_change:
            self._refuse(name, f"the canary's inputs differ from version {old}'s "
                               f"({'; '.join(input_changes(changes))}): clients of version "
                               f"{old} would fail on its share of traffic. Deploy it without "
                               "--canary, or pass --allow-signature-change")
        worker = self.supervisor.get(name)
        if worker is None or worker.status != READY:  # nothing serves: start on the plan
            event = await self.apply(d, plan, extra=[version])
            return event["versions"][str(version["number"])], changes
        _progress.get()({"step": "load"})
        reply = await worker.request("load", load_timeout(), number=version["number"],
                                     path=path, options=options)
        _progress.get()({"step": "switch"})
        await self.apply(d, plan, extra=[version])
        return reply["meta"], changes

    def _refuse(self, name: str, message: str) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.state.add_event(name, "deploy-refused", None, message)
        raise Conflict(message)

    def _standby(self, d: dict) -> int | None:
        return next((v["number"] for v in self.state.versions(d["name"])
                     if v["state"] == st.STANDBY), None)

    async def apply(self, d: dict, plan: Plan, extra: list[dict] = ()) -> dict | None:
        """Make the worker serve ``plan``: load what it lacks, then swap in one step. A
        worker that is not running is started on the plan (its 'ready' event returned)."""
        name = d["name"]
        rows = {v["number"]: v for v in self.state.versions(name)}
        rows.update({v["number"]: v for v in extra})
        worker = self.supervisor.get(name)
        if worker is None or worker.status != READY:
            await self.supervisor.stop(name, timeout=5)
            versions = [(rows[plan.active], True)] + [(rows[n], False) for n in plan.keep]
            config = self._config(d, versions, bind_retry_s=5, route=plan.route(d))
            return await self._start_or_fail(name, config)
        loaded = set((await worker.request("ping", 10))["loaded"])
        for n in [plan.active, *plan.keep]:
            if n not in loaded:
                v = rows[n]
                if v["state"] == st.PRUNED:
                    raise Conflict(f"version {n} of '{name}' was pruned from disk")
                await worker.request("load", load_timeout(), number=n, options=d["options"],
                                     path=str(self.store.path_of(v["sha256"])))
        await worker.request("activate", 10, number=plan.active, keep=plan.keep,
                             route=plan.route(d), token_hash=d["token_hash"])
        return None

    async def probe(self, path: str, device: str, batching: str = "auto") -> dict:
        """Load, warm and check ``path`` in a short-lived process (validation.py)."""
        return await validation.probe(self.python, path, device, batching, load_timeout())

    # ---- rollback, undeploy ------------------------------------------------------------
    async def rollback(self, name: str, to: int | None) -> dict:
        async with self._locks[name]:
            d = self.get(name)
            current = d["active_version"]
            if d["traffic"] and to is None:  # during a canary: all traffic back to stable
                await self.apply(d, Plan(current, None, d["labels"], self._standby(d)))
                self.state.record_traffic(name, None, "rollback",
                                          f"canary stopped; all traffic to version {current}")
                log.info("rollback %s: canary stopped, all traffic to version %s", name,
                         current)
                return {"changed": True, "name": name, "version": current, "previous": current,
                        "canary_stopped": True, "deployment": self.describe(self.get(name))}
            target = self._rollback_target(d, to)
            if target["number"] == current and not d["traffic"]:
                return {"changed": False, "name": name, "version": current,
                        "deployment": self.describe(d)}
            await self.apply(d, Plan(target["number"], None, d["labels"], current))
            self.state.record_activate(name, target["number"])
            log.info("rollback %s: version %s active (was %s)", name, target["number"], current)
            return {"changed": True, "name": name, "version": target["number"],
                    "previous": current, "deployment": self.describe(self.get(name))}

    def _rollback_target(self, d: dict, to: int | None) -> dict:
        name, current = d["name"], d["active_version"]
        if to is not None:
            target = self.state.version(name, to)
            if target is None:
                raise NotFound(f"version {to} of '{name}' not found")
            if target["state"] in (st.FAILED, st.PRUNED):
                raise Conflict(f"version {to} of '{name}' is {target['state']}; it cannot be "
                               "made active")
            return target
        older = [v for v in self.state.versions(name)
                 if v["number"] < current and v["state"] not in (st.FAILED, st.PRUNED)]
        if not older:
            raise Conflict(f"'{name}' has no version before {current} to roll back to")
        return older[-1]

    async def undeploy(self, name: str) -> dict:
        async with self._locks[name]:
            d = self.get(name)
            await self.supervisor.stop(name, timeout=drain_timeout())
            self.state.delete_deployment(name)
            log.info("undeployed %s (port %s freed)", name, d["port"])
            shutil.rmtree(self.paths.home / "tls" / name, ignore_errors=True)
            return {"name": name, "port": d["port"], "removed": True}

    # ---- restore and restart -----------------------------------------------------------
    async def restore_all(self) -> None:
        """Bring every deployment back on its port with its active version."""
        await asyncio.gather(*(self._restart(d["name"], restored=True)
                               for d in self.state.deployments()))

    async def _restart(self, name: str, restored: bool = False) -> None:
        async with self._locks[name]:
            d = self.state.deployment(name)
            if d is None:
                return
            plan = self.current_plan(d)
            rows = {v["number"]: v for v in self.state.versions(name)}
            versions = [(rows[plan.active], True)] + [(rows[n], False) for n in plan.keep
                                                       if rows[n]["state"] != st.PRUNED]
            config = self._config(d, versions, bind_retry_s=5, route=plan.route(d))
            worker = self.supervisor.get(name)
            why = "daemon start" if restored else (worker.error if worker else None)
            try:
                await self.supervisor.start(name, config, load_timeout())
            except DeployFailed as exc:
                log.warning("%s of %s failed: %s", "restore" if restored else "restart", name,
                            exc.message)
                self.state.add_event(name, "restart-failed", d["active_version"], exc.message)
                self.supervisor.note_failed_start(name, exc.message)
                return
            worker = self.supervisor.get(name)
            log.info("%s %s: version %s, pid %s (%s)", "restored" if restored else "restarted",
                     name, d["active_version"], worker.pid if worker else None,
                     why or "restart")
            self.state.add_event(name, "restore" if restored else "restart", d["active_version"])

    async def _on_exit(self, name: str, reason: str) -> None:
        self.state.add_event(name, "worker-exit", None, reason)

    # ---- helpers -----------------------------------------------------------------------
    def current_plan(self, d: dict) -> Plan:
        """What the state says the worker should serve."""
        return Plan(d["active_version"], d["traffic"], d["labels"], self._standby(d))

    def _config(self, d: dict, versions: list[tuple[dict | None, bool]],
                bind_retry_s: float, route: dict | None = None) -> dict:
        log = self.paths.request_log(d["name"])
        return {
            "route": route or {"traffic": None, "labels": {},
                               "sticky": d["options"].get("sticky_header")},
            "name": d["name"], "host": d["host"], "port": d["port"],
            "token_hash": d.get("token_hash"),
            "options": {**d["options"], "request_log": str(log)},
            "bind_retry_s": bind_retry_s, "drain_s": drain_timeout(),
            "versions": [{"number": v["number"], "path": str(self.store.path_of(v["sha256"])),
                          "active": active} for v, active in versions if v],
        }

    def _used_ports(self) -> set[int]:
        """HTTP and gRPC ports of every deployment."""
        return {p for d in self.state.deployments()
                for p in (d["port"], d["options"].get("grpc_port")) if p}

    def _free_port(self, host: str, also_taken: set[int] = frozenset()) -> int:
        taken = self._used_ports() | self._reserved_ports | set(also_taken)
        for _ in range(50):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if port not in taken:
                return port
        raise MserveError("could not find a free port")


def _user_words(message: str, artifact, stored: Path) -> str:
    """A load error as the user should read it: the child names the store's copy
    (``models/<sha256>/model.onnx``); name the user's file instead."""
    source = Path(artifact.source)
    user_file, folder = source, source.parent
    if source.is_dir():
        folder = source
        with contextlib.suppress(MserveError, OSError):
            from mserve.daemon.store import model_in
            user_file = model_in(source) or source / stored.name
    message = message.replace(str(stored), str(user_file))
    message = message.replace(str(stored.parent), str(folder))
    return message.replace(f"'{stored.name}'", f"'{user_file.name}'")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def drain_timeout() -> float:
    return float(os.environ.get("MSERVE_DRAIN_TIMEOUT", "30"))


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _version_view(v: dict) -> dict:
    meta = v.get("meta") or {}
    return {"version": v["number"], "number": v["number"], "sha256": v["sha256"],
            "size": v["size"],
            "created": v["created"], "source": v["source"], "state": v["state"],
            "device": meta.get("device"), "batchable": meta.get("batchable"),
            "batching": meta.get("batching"),
            "error": v.get("error")}
