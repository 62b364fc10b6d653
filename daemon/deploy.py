"""Deploy: copy the model into the store, validate it in a child process, load it next to
the serving version, switch, and record the outcome, or on any failure change nothing.

Each deploy takes the deployment's lock (one change per name at a time, names in parallel),
does the slow work (copy, probe, load) first, and records the outcome in one SQLite
transaction only after the worker confirmed it. On any failure the state and the serving
version are what they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mserve.daemon import faults
from mserve.daemon.envnumbers import load_timeout
from mserve.daemon.errors import BadRequest, Conflict, DeployFailed, MserveError
from mserve.daemon.paths import check_name
from mserve.daemon.plan import (Plan, canary_percent, check_batching, check_same_place,
                                check_threads, check_workers, default_name, hash_token,
                                input_changes, signature_changes)
from mserve.daemon.supervisor import READY
from mserve.daemon.views import size, user_words
from mserve.daemon.workerconfig import free_port, group_configs, store_tls, used_ports

if TYPE_CHECKING:
    from mserve.daemon.deployments import Deployments

log = logging.getLogger("mserve.daemon")
DEFAULT_OPTIONS = {"device": "auto", "max_batch_size": None, "batch_delay_ms": None,
                   "max_queue": None, "instances": 1, "threads": None, "max_body_mb": 64,
                   "sticky_header": None, "keep": 5, "log_payloads": False,
                   "batching": "auto", "workers": 1}
OPTION_KEYS = tuple(DEFAULT_OPTIONS)
RELOAD_KEYS = ("device", "instances", "threads", "batching")  # they act when a version loads
# The deploy in progress reports its phases here (one per task, so parallel deploys of
# different names do not mix their reports).
_progress: contextvars.ContextVar[Callable[[dict], None]] = contextvars.ContextVar(
    "progress", default=lambda step: None)


class Deployer:
    def __init__(self, deployments: Deployments):
        self.d = deployments

    async def deploy(self, req: dict, progress: Callable[[dict], None] | None = None) -> dict:
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
        check_threads(req)
        check_workers(req)
        async with self.d._locks[name]:
            return await self._deploy(name, source, req)

    async def _deploy(self, name: str, source: Path, req: dict) -> dict:
        existing = self.d.state.deployment(name)
        if existing:
            check_same_place(existing, req)
        report, loop = _progress.get(), asyncio.get_running_loop()

        def copied(done: int, total: int) -> None:
            loop.call_soon_threadsafe(report, {"step": "copy", "done": done, "total": total})

        script = _script(req)
        artifact = await asyncio.to_thread(self.d.store.ingest, source, copied, script)
        self.d.ingesting.add(artifact.sha256)
        try:
            await asyncio.to_thread(faults.pause, "after-copy")
            return await self._deploy_stored(name, artifact, existing, req)
        finally:
            self.d.ingesting.discard(artifact.sha256)

    async def _deploy_stored(self, name: str, artifact, existing: dict | None, req: dict) -> dict:
        options = {**(existing or {}).get("options", DEFAULT_OPTIONS),
                   **{k: req[k] for k in OPTION_KEYS if req.get(k) is not None}}
        token_hash = hash_token(req.get("token")) or (existing or {}).get("token_hash")
        if existing:
            active = self.d.state.version(name, existing["active_version"])
            if active and active["sha256"] == artifact.sha256:
                changed = await self._reconfigure(existing, options, token_hash)
                log.info("deploy of %s from %s: identical to active version %s, %s", name,
                         artifact.source, active["number"],
                         f"options changed: {', '.join(changed)}" if changed
                         else "nothing changed")
                return {"changed": bool(changed), "name": name, "version": active["number"],
                        "sha256": artifact.sha256, "signature_changed": [],
                        "options_changed": changed,
                        "deployment": self.d.describe(self.d.get(name))}
            if options == existing["options"] and token_hash == existing["token_hash"] \
                    and (again := await self._same_canary(existing, artifact.sha256, req)):
                return again
        number = self.d.state.next_version(name)
        version = {"number": number, "sha256": artifact.sha256, "size": artifact.size,
                   "source": artifact.source,
                   "transformer": artifact.transformer.to_json() if artifact.transformer else None}
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
            message = user_words(exc.message, artifact, self.d.store.path_of(artifact.sha256))
            log.info("deploy of %s failed (version %s from %s): %s", name, number,
                     artifact.source, message)
            with contextlib.suppress(sqlite3.Error):
                self.d.state.record_failed(name, version, message)
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
        if artifact.transformer:
            log.info("version %s of %s runs transformer %s (sha256 %s), trusted code",
                     number, name, artifact.transformer.script, artifact.transformer.sha256[:12])
        d = self.d.state.deployment(name)
        return {"changed": True, "name": name, "version": number, "sha256": artifact.sha256,
                "transformer": version["transformer"],
                "previous": existing["active_version"] if existing else None,
                "signature_changed": changes, "deployment": self.d.describe(d)}

    async def _same_canary(self, d: dict, sha256: str, req: dict) -> dict | None:
        """``deploy --canary P`` of the bytes of the version that is the canary already (a
        CI job run again): no new version; its share becomes P if it was another. None when
        it is not such a deploy."""
        canary = canary_percent(req, d)
        active, split = d["active_version"], d["traffic"] or {}
        if canary is None or len(split) != 2:  # not a canary deploy, or no canary now
            return None
        same = next((n for n in split if n != active
                     and (self.d.state.version(d["name"], n) or {}).get("sha256") == sha256),
                    None)
        if same is None:
            return None
        name, changed = d["name"], split[same] != canary
        if changed:
            new_split = {active: 100 - canary, same: canary}
            await self.d.apply(d, Plan(active, new_split, d["labels"], self.d._standby(d)))
            await self.d.record_or_revert(name, lambda: self.d.state.record_traffic(
                name, new_split, "deploy", f"canary version {same} at {canary}%"))
        log.info("deploy of %s: identical to canary version %s, %s", name, same,
                 f"its share now {canary}%" if changed else "nothing changed")
        return {"changed": changed, "name": name, "version": same, "sha256": sha256,
                "signature_changed": [], "options_changed": ["canary"] if changed else [],
                "deployment": self.d.describe(self.d.get(name))}

    async def _record_or_undo(self, d: dict | None, version: dict, row: dict,
                              canary: int | None = None) -> None:
        """Record the switch; if SQLite cannot (disk full), switch the worker back so what
        serves is what the state says."""
        try:
            self.d.state.record_deploy(row["name"], version, row, canary)
        except sqlite3.Error as exc:
            if d is None:
                await self.d.supervisor.stop(row["name"], timeout=5)
            else:
                with contextlib.suppress(MserveError):
                    await self.d.apply(d, self.d.current_plan(d))
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
            verb = "changes" if len(reload) == 1 else "change"
            raise Conflict(f"--{', --'.join(k.replace('_', '-') for k in reload)} {verb} how a "
                           f"version is loaded; the bytes of '{name}' are those of its active "
                           f"version {d['active_version']}, so nothing would load them again",
                           hint="deploy a new version to use them, or undeploy and deploy")
        worker = self.d.supervisor.get(name)
        serving = worker is not None and worker.status == READY
        new = {**d, "options": options, "token_hash": token_hash}
        try:
            if serving:  # options, token and sticky header, all with the activate
                await self.d.apply(new, self.d.current_plan(new))
            self.d.state.record_settings(name, options, token_hash, ", ".join(changed))
        except (MserveError, sqlite3.Error) as exc:
            if serving:
                with contextlib.suppress(MserveError):
                    await self.d.apply(d, self.d.current_plan(d))
            why = exc.message if isinstance(exc, MserveError) else f"could not record them: {exc}"
            raise MserveError(f"the new settings of '{name}' were not applied ({why}); it keeps "
                              "its previous ones") from None
        return changed

    async def _first_deploy(self, name, version, options, token_hash, req) -> None:
        host = req.get("host") or "127.0.0.1"
        tls = store_tls(self.d.paths, name, req)
        if tls:
            options = {**options, "tls": tls}
        port = req.get("port") or free_port(host, used_ports(self.d.state) | self.d._reserved_ports)
        grpc_port = req.get("grpc_port") or free_port(host, used_ports(self.d.state) | self.d._reserved_ports | {port})
        for p in {port, grpc_port}:
            if p in used_ports(self.d.state) or p in self.d._reserved_ports:
                raise Conflict(f"port {p} is already used by another deployment")
        if port == grpc_port:
            raise Conflict(f"--port and --grpc-port must differ (both {port})")
        options = {**options, "grpc_port": grpc_port}
        self.d._reserved_ports |= {port, grpc_port}
        try:
            d = {"name": name, "host": host, "port": port, "options": options,
                 "token_hash": token_hash}
            configs = group_configs(self.d.paths, self.d.store, d, [(version, True)],
                                    bind_retry_s=0)
            _progress.get()({"step": "load"})
            event = await self.d._start_or_fail(name, configs)
            version["meta"] = event["versions"][str(version["number"])]
            await self._record_or_undo(None, version, d)
        finally:
            self.d._reserved_ports -= {port, grpc_port}

    async def _switch_to_new(self, d: dict, version: dict, options: dict, token_hash,
                             canary: int | None = None, allow_change: bool = False
                             ) -> tuple[dict, list[str]]:
        """Probe the new version in a child, load it next to the serving one, then switch
        (or, as a canary, give it a share of the traffic). Its metadata, and how its
        signature differs from the active version's."""
        name, path = d["name"], str(self.d.store.path_of(version["sha256"]))
        old = d["active_version"]
        d = {**d, "options": options, "token_hash": token_hash}
        if canary:
            plan = Plan(old, {old: 100 - canary, version["number"]: canary}, d["labels"],
                        self.d._standby(d))
        else:
            plan = Plan(version["number"], None, d["labels"], old)
        _progress.get()({"step": "validate"})
        script = self.d.store.script_of(version)
        probed = await self.d.probe(path, options["device"], options.get("batching"), script)
        changes = signature_changes((self.d.state.version(name, old) or {}).get("meta"), probed)
        if canary and input_changes(changes) and not allow_change:
            self._refuse(name, f"the canary's inputs differ from version {old}'s "
                               f"({'; '.join(input_changes(changes))}): clients of version "
                               f"{old} would fail on its share of traffic. Deploy it without "
                               "--canary, or pass --allow-signature-change")
        worker = self.d.supervisor.get(name)
        if worker is None or worker.status != READY:  # nothing serves: start on the plan
            event = await self.d.apply(d, plan, extra=[version])
            return event["versions"][str(version["number"])], changes
        _progress.get()({"step": "load"})
        reply = await worker.request("load", load_timeout(), number=version["number"],
                                     path=path, transformer=script, options=options)
        _progress.get()({"step": "switch"})
        await self.d.apply(d, plan, extra=[version])
        return reply["meta"], changes

    def _refuse(self, name: str, message: str) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.d.state.add_event(name, "deploy-refused", None, message)
        raise Conflict(message)


def _script(req: dict) -> Path | None:
    """The request's transformer script (``--transformer``): an absolute path, or None."""
    if not req.get("transformer"):
        return None
    script = Path(req["transformer"])
    if not script.is_absolute():
        raise BadRequest("transformer must be an absolute path")
    return script
