"""The daemon's deployments: what they are (reads for list and status), how a worker is
made to serve a plan, undeploy, and restore, restart and supervision callbacks. Deploying
itself is deploy.py; rollback, splits, promotion and labels are rollout.py.

Every operation that changes a deployment takes its lock (one change per name at a time,
names in parallel); the worker switches first and SQLite records after, and when SQLite
cannot record, the worker is switched back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import sqlite3
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from mserve.daemon import adoption, validation
from mserve.daemon import state as st
from mserve.daemon.deploy import Deployer
from mserve.daemon.envnumbers import drain_timeout, load_timeout
from mserve.daemon.errors import BadRequest, Conflict, DeployFailed, MserveError, NotFound
from mserve.daemon.paths import Paths
from mserve.daemon.plan import Plan
from mserve.daemon.state import State
from mserve.daemon.store import Store
from mserve.daemon.supervisor import READY, Supervisor
from mserve.daemon.views import url_host, version_view
from mserve.daemon.workerconfig import claim_ports, group_configs, peer_sockets, worker_config
from mserve.daemon.workergroup import worker_count

__all__ = ["Deployments"]

log = logging.getLogger("mserve.daemon")


class Deployments:
    def __init__(self, paths: Paths, state: State, store: Store, python: str = sys.executable):
        self.paths, self.state, self.store, self.python = paths, state, store, python
        self.deployer = Deployer(self)
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
            "card": active.get("meta", {}).get("card"),  # the CUDA card, or None
            "providers": active.get("meta", {}).get("providers"),  # the session's real ones
            "device_note": next((n for n in active.get("meta", {}).get("notes") or []
                                 if n.startswith("CUDA not used")), None),
            "batching": active.get("meta", {}).get("batching"),
            "transformer": active.get("transformer"),  # the active version's, or None
            "threads": d["options"].get("threads"),  # None: ONNX Runtime's default
            "versions": len(self.state.versions(d["name"])),
            "workers": d["options"].get("workers") or 1,  # as given: a number or "auto"
            "pid": worker.pid if worker else None,
            "pids": worker.pids if worker else [],
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
        """Deploy ``req`` (deploy.py); ``progress`` (called on the event loop) hears each
        phase: copy (with bytes), validate, load, switch."""
        return await self.deployer.deploy(req, progress)

    async def copy_artifact(self, name: str, number: int, target: str) -> dict:
        """Copy a version's stored files into the folder ``target`` (for ``export``)."""
        v = self.state.version(self.get(name)["name"], number)
        if v is None or v["state"] == st.PRUNED or not self.store.has(v["sha256"]):
            raise NotFound(f"version {number} of '{name}' is not in the model store")
        if v.get("transformer"):  # the exported runtime would serve the model without it
            raise Conflict(f"version {number} of '{name}' runs transformer "
                           f"{v['transformer']['script']}; exporting a pipeline is not "
                           "supported yet (export a version without --transformer)")
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

    async def _start_or_fail(self, name: str, configs: list[dict]) -> dict:
        """Start the worker processes on ``configs``. If that fails, a new deployment leaves
        no worker behind; an existing one is restarted later on what the state says."""
        try:
            configs = await claim_ports(configs)
            return await self.supervisor.start(name, configs, load_timeout())
        except DeployFailed as exc:
            if self.state.deployment(name) is None:
                self.supervisor.workers.pop(name, None)
            else:
                self.supervisor.note_failed_start(name, exc.message)
            raise

    def _standby(self, d: dict) -> int | None:
        return next((v["number"] for v in self.state.versions(d["name"])
                     if v["state"] == st.STANDBY), None)

    async def apply(self, d: dict, plan: Plan, extra: list[dict] = ()) -> dict | None:
        """Make the worker processes serve ``plan``: load what any lacks in all, start or
        stop processes to the deployment's count, then swap all in one step each. A worker
        that is not running is started on the plan (its 'ready' event returned)."""
        name = d["name"]
        rows = {v["number"]: v for v in self.state.versions(name)}
        rows.update({v["number"]: v for v in extra})
        versions = [(rows[plan.active], True)] + [(rows[n], False) for n in plan.keep]
        worker = self.supervisor.get(name)
        if worker is None or worker.status != READY:
            await self.supervisor.stop(name, timeout=5)
            configs = group_configs(self.paths, self.store, d, versions, bind_retry_s=5,
                                    route=plan.route(d))
            return await self._start_or_fail(name, configs)
        await self._load(worker, d, plan, rows)
        await self._resize(d, plan, versions)
        await self._activate(worker, d, plan, worker.peer_secret)
        return None

    async def apply_one(self, process, d: dict, plan: Plan) -> None:
        """``apply`` to one process of the group (one being adopted), its count unchanged."""
        rows = {v["number"]: v for v in self.state.versions(d["name"])}
        await self._load(process, d, plan, rows)
        await self._activate(process, d, plan, self.supervisor.worker(d["name"]).peer_secret)

    async def _load(self, target, d: dict, plan: Plan, rows: dict) -> None:
        """Load in ``target`` (the group, or one process) the plan's versions it lacks."""
        loaded = set((await target.request("ping", 10))["loaded"])
        for n in [plan.active, *plan.keep]:
            if n not in loaded:
                v = rows[n]
                if v["state"] == st.PRUNED:
                    raise Conflict(f"version {n} of '{d['name']}' was pruned from disk")
                await target.request("load", load_timeout(), number=n, options=d["options"],
                                     path=str(self.store.path_of(v["sha256"])),
                                     transformer=self.store.script_of(v))

    async def _activate(self, target, d: dict, plan: Plan, peer_secret: str | None) -> None:
        await target.request("activate", 10, number=plan.active, keep=plan.keep,
                             route=plan.route(d), token_hash=d["token_hash"],
                             options=d["options"],  # so the worker's options are the state's
                             peers=peer_sockets(self.paths, d), peer_secret=peer_secret)

    async def _resize(self, d: dict, plan: Plan, versions: list[tuple[dict, bool]]) -> None:
        """Start the processes ``d``'s count lacks (on ``plan``, beside the serving ones), or
        stop (drain) the ones past it."""
        name, group = d["name"], self.supervisor.get(d["name"])
        wanted, have = worker_count(d["options"].get("workers")), len(group.replicas)
        if have > wanted:
            log.info("%s: %d worker processes -> %d", name, have, wanted)
            await self.supervisor.stop_one(name, wanted, drain_timeout())
        if have < wanted:
            log.info("%s: %d worker processes -> %d", name, have, wanted)
            group.peer_secret = group.peer_secret or secrets.token_hex(16)
            for index in range(have, wanted):
                config = worker_config(self.paths, self.store, d, versions, 5, plan.route(d),
                                       index, join=True, peer_secret=group.peer_secret)
                try:
                    await self.supervisor.start_one(name, config, load_timeout())
                except DeployFailed:
                    await self.supervisor.stop_one(name, have, timeout=5)  # back to as it was
                    raise

    async def probe(self, path: str, device: str, batching: str = "auto",
                    transformer: str | None = None) -> dict:
        """Load, warm and check ``path`` (with its transformer script, run once on the
        warm-up sample) in a short-lived process (validation.py)."""
        return await validation.probe(self.python, path, device, batching, load_timeout(),
                                      transformer)

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

    async def _restart(self, name: str, index: int = 0, restored: bool = False) -> None:
        """Start process ``index`` of ``name`` again from the state: alone while a sibling
        serves, else the whole group (on a daemon's start, ``restored``)."""
        async with self._locks[name]:
            d = self.state.deployment(name)
            if d is None:
                return
            plan = self.current_plan(d)
            rows = {v["number"]: v for v in self.state.versions(name)}
            versions = [(rows[plan.active], True)] + [(rows[n], False) for n in plan.keep
                                                       if rows[n]["state"] != st.PRUNED]
            group = self.supervisor.get(name)
            worker = group.replicas[index] if group and index < len(group.replicas) else None
            if not restored and (worker is None or worker.pid is not None):
                return  # it left the group, or is back already (a whole-group start)
            if not restored and any(w is not worker for w in group.serving()):
                await self._restart_alone(d, versions, plan, index)
                return
            why = "daemon start" if restored else (group.error if group else None)
            for other in group.replicas if group else []:
                if other.pid is not None:  # alive but not serving: the group starts anew
                    await other.stop(5)
            configs = group_configs(self.paths, self.store, d, versions, bind_retry_s=5,
                                    route=plan.route(d))
            try:
                configs = await claim_ports(configs)
                await self.supervisor.start(name, configs, load_timeout())
            except DeployFailed as exc:
                log.warning("%s of %s failed: %s", "restore" if restored else "restart", name,
                            exc.message)
                self.supervisor.note_failed_start(name, exc.message)
                self.event(name, "restart-failed", d["active_version"], exc.message)
                return
            group = self.supervisor.get(name)
            log.info("%s %s: version %s, pid %s (%s)", "restored" if restored else "restarted",
                     name, d["active_version"], ", ".join(map(str, group.pids)),
                     why or "restart")
            self.event(name, "restore" if restored else "restart", d["active_version"])

    async def _restart_alone(self, d: dict, versions: list, plan: Plan, index: int) -> None:
        name, group = d["name"], self.supervisor.get(d["name"])
        worker = group.replicas[index]
        why = worker.error
        config = worker_config(self.paths, self.store, d, versions, 5, plan.route(d), index,
                               join=True, peer_secret=group.peer_secret)
        try:
            await self.supervisor.start_one(name, config, load_timeout())
        except DeployFailed as exc:
            log.warning("restart of %s process %d failed: %s", name, index, exc.message)
            self.supervisor.note_failed_start(name, exc.message, index)
            self.event(name, "restart-failed", d["active_version"],
                       f"process {index}: {exc.message}")
            return
        log.info("restarted %s process %d: version %s, pid %s (%s)", name, index,
                 d["active_version"], worker.pid, why or "restart")
        self.event(name, "restart", d["active_version"], f"process {index}")

    async def _on_exit(self, name: str, reason: str) -> None:
        self.event(name, "worker-exit", None, reason)

    async def _on_hung(self, name: str, reason: str) -> None:
        log.warning("worker of %s stopped answering (%s): killed to restart it", name, reason)
        self.event(name, "worker-hung", None, reason)

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



