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
import shutil
import sqlite3
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from mserve.daemon import adoption, faults, validation
from mserve.daemon import state as st
from mserve.daemon.errors import BadRequest, Conflict, DeployFailed, MserveError, NotFound
from mserve.daemon.paths import Paths, check_name
from mserve.daemon.plan import (Plan, canary_percent, check_batching, check_same_place,
                                default_name, hash_token, input_changes, signature_changes)
from mserve.daemon.state import State
from mserve.daemon.store import Store
from mserve.daemon.supervisor import READY, Supervisor
from mserve.daemon.views import size, url_host, user_words, version_view
from mserve.daemon.workerconfig import (drain_timeout, free_port, load_timeout, store_tls,
                                        used_ports, worker_config)

__all__ = ["Deployments", "drain_timeout", "load_timeout"]

log = logging.getLogger("mserve.daemon")
DEFAULT_OPTIONS = {"device": "auto", "max_batch_size": None, "batch_delay_ms": None,
                   "max_queue": None, "instances": 1, "max_body_mb": 64,
                   "sticky_header": None, "keep": 5, "log_payloads": False,
                   "batching": "auto"}
OPTION_KEYS = tuple(DEFAULT_OPTIONS)
RELOAD_KEYS = ("device", "instances", "threads", "batching")  # they act when a version loads
# The deploy in progress reports its phases here (one per task, so parallel deploys of
# different names do not mix their reports).
_progress: contextvars.ContextVar[Callable[[dict], None]] = contextvars.ContextVar(
    "progress", default=lambda step: None)


class Deployments:
    def __init__(self, paths: Paths, state: State, store: Store, python: str = sys.executable):
        self.paths, self.state, self.store, self.python = paths, state, store, python
        self.supervisor = Supervisor(paths.worker_log, self._on_exit, self._restart, python,
                                     on_hung=self._on_hung)
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
            "url": f"{scheme}://{url_host(shown_host)}:{d['port']}", "port": d["port"],
            "grpc_port": d["options"].get("grpc_port"),
            "grpc_url": (f"{url_host(shown_host)}:{d['options']['grpc_port']}"
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
                "versions_detail": [version_view(v) for v in self.state.versions(d["name"])],
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
        return [{**version_view(v), "loaded": v["number"] in loaded,
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
        options = {**(existing or {}).get("options", DEFAULT_OPTIONS),
                   **{k: req[k] for k in OPTION_KEYS if req.get(k) is not None}}
        token_hash = hash_token(req.get("token")) or (existing or {}).get("token_hash")
        if existing:
            active = self.state.version(name, existing["active_version"])
            if active and active["sha256"] == artifact.sha256:
                changed = await self._reconfigure(existing, options, token_hash)
                log.info("deploy of %s from %s: identical to active version %s, %s", name,
                         artifact.source, active["number"],
                         f"options changed: {', '.join(changed)}" if changed
                         else "nothing changed")
                return {"changed": bool(changed), "name": name, "version": active["number"],
                        "sha256": artifact.sha256, "signature_changed": [],
                        "options_changed": changed,
                        "deployment": self.describe(self.get(name))}
        number = self.state.next_version(name)
        version = {"number": number, "sha256": artifact.sha256, "size": artifact.size,
                   "source": artifact.source}
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
            message = user_words(exc.message, artifact, self.store.path_of(artifact.sha256))
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
                 artifact.sha256[:12], size(artifact.size), artifact.source,
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

    async def _reconfigure(self, d: dict, options: dict, token_hash: str | None) -> list[str]:
        """A redeploy of the active version's bytes with other options or another token:
        apply them to the serving worker now, then record them; what changed."""
        changed = sorted(k for k in OPTION_KEYS if d["options"].get(k) != options.get(k))
        if token_hash != d["token_hash"]:
            changed.append("token")
        if not changed:
            return []
        name = d["name"]
        if reload := [k for k in changed if k in RELOAD_KEYS]:
            raise Conflict(f"--{', --'.join(k.replace('_', '-') for k in reload)} change how a "
                           f"version is loaded; the bytes of '{name}' are those of its active "
                           f"version {d['active_version']}, so nothing would load them again",
                           hint="deploy a new version to use them, or undeploy and deploy")
        worker = self.supervisor.get(name)
        serving = worker is not None and worker.status == READY
        new = {**d, "options": options, "token_hash": token_hash}
        if serving:
            await worker.request("options", 10, options=options)
            await self.apply(new, self.current_plan(new))  # token and sticky header
        try:
            self.state.record_settings(name, options, token_hash, ", ".join(changed))
        except sqlite3.Error as exc:
            if serving:
                with contextlib.suppress(MserveError):
                    await worker.request("options", 10, options=d["options"])
                    await self.apply(d, self.current_plan(d))
            raise MserveError(f"could not record the new settings ({exc}); '{name}' keeps its "
                              "previous ones") from None
        return changed

    async def _first_deploy(self, name, version, options, token_hash, req) -> None:
        host = req.get("host") or "127.0.0.1"
        tls = store_tls(self.paths, name, req)
        if tls:
            options = {**options, "tls": tls}
        port = req.get("port") or free_port(host, used_ports(self.state) | self._reserved_ports)
        grpc_port = req.get("grpc_port") or free_port(host, used_ports(self.state) | self._reserved_ports | {port})
        for p in {port, grpc_port}:
            if p in used_ports(self.state) or p in self._reserved_ports:
                raise Conflict(f"port {p} is already used by another deployment")
        if port == grpc_port:
            raise Conflict(f"--port and --grpc-port must differ (both {port})")
        options = {**options, "grpc_port": grpc_port}
        self._reserved_ports |= {port, grpc_port}
        try:
            d = {"name": name, "host": host, "port": port, "options": options,
                 "token_hash": token_hash}
            config = worker_config(self.paths, self.store, d, [(version, True)],
                                   bind_retry_s=0)
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
            config = worker_config(self.paths, self.store, d, versions, bind_retry_s=5,
                                   route=plan.route(d))
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
        """Bring every deployment back on its port with its active version: adopt the
        workers that kept serving while no daemon ran, start the others."""
        await adoption.restore_all(self)

    async def _restart(self, name: str, restored: bool = False) -> None:
        async with self._locks[name]:
            d = self.state.deployment(name)
            if d is None:
                return
            plan = self.current_plan(d)
            rows = {v["number"]: v for v in self.state.versions(name)}
            versions = [(rows[plan.active], True)] + [(rows[n], False) for n in plan.keep
                                                       if rows[n]["state"] != st.PRUNED]
            config = worker_config(self.paths, self.store, d, versions, bind_retry_s=5,
                                   route=plan.route(d))
            worker = self.supervisor.get(name)
            why = "daemon start" if restored else (worker.error if worker else None)
            try:
                await self.supervisor.start(name, config, load_timeout())
            except DeployFailed as exc:
                log.warning("%s of %s failed: %s", "restore" if restored else "restart", name,
                            exc.message)
                self.supervisor.note_failed_start(name, exc.message)
                self.event(name, "restart-failed", d["active_version"], exc.message)
                return
            worker = self.supervisor.get(name)
            log.info("%s %s: version %s, pid %s (%s)", "restored" if restored else "restarted",
                     name, d["active_version"], worker.pid if worker else None,
                     why or "restart")
            self.event(name, "restore" if restored else "restart", d["active_version"])

    async def _on_exit(self, name: str, reason: str) -> None:
        self.state.add_event(name, "worker-exit", None, reason)

    async def _on_hung(self, name: str, reason: str) -> None:
        log.warning("worker of %s stopped answering (%s): killing it to restart it", name,
                    reason)
        self.state.add_event(name, "worker-hung", None, reason)

    def event(self, name: str, action: str, version: int | None, detail: str = "") -> None:
        """Record an event that must not stop what it reports (a restart, an adoption):
        when SQLite cannot take it, the daemon log keeps it."""
        try:
            self.state.add_event(name, action, version, detail)
        except sqlite3.Error as exc:
            log.error("could not record event %s of %s (version %s, %s): %s", action, name,
                      version, detail or "no detail", exc)

    async def record_or_revert(self, name: str, record: Callable[[], None]) -> None:
        """Run ``record`` (the SQLite half of a change the worker already made); if SQLite
        cannot take it, put the worker back on what the state still says, so the worker
        and the state agree whatever happens."""
        try:
            record()
        except sqlite3.Error as exc:
            log.error("could not record a change of %s (%s): switching the worker back", name,
                      exc)
            d = self.state.deployment(name)
            if d is not None:
                with contextlib.suppress(MserveError):
                    await self.apply(d, self.current_plan(d))
            raise MserveError(f"could not record the change ({exc}); '{name}' serves what it "
                              "served before") from None

    # ---- helpers -----------------------------------------------------------------------
    def current_plan(self, d: dict) -> Plan:
        """What the state says the worker should serve."""
        return Plan(d["active_version"], d["traffic"], d["labels"], self._standby(d))



