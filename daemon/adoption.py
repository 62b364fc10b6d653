"""A starting daemon takes over the workers that outlived its predecessor.

For each deployment in SQLite: a worker whose record says it serves, that answers on its
control socket with the right secret, and serves what SQLite says (same port and gRPC port,
same options, the active version's stored file loaded) is adopted as it is: its split,
labels and token are set again from SQLite (a change the old daemon made in the worker but
could not record is undone), its pid does not change and no request fails. Every other
worker is stopped and the deployment started again, as after a crash. Workers of
deployments SQLite does not know (a first deploy that was never recorded) are stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from mserve.daemon import workerrecord
from mserve.daemon.errors import MserveError
from mserve.daemon.workergroup import worker_count
from mserve.daemon.workerprocess import wait_gone

if TYPE_CHECKING:
    from mserve.daemon.deployments import Deployments

log = logging.getLogger("mserve.daemon")
IGNORED_OPTIONS = ("request_log",)


async def restore_all(deployments: Deployments) -> None:
    """Adopt or restart every deployment; stop workers that belong to none."""
    records = workerrecord.read_all(deployments.paths)
    rows = deployments.state.deployments()
    known = {d["name"] for d in rows}
    await asyncio.gather(*(end_stray(name, record, "it has no deployment")
                           for name, by_index in records.items() if name not in known
                           for record in by_index.values()))
    await asyncio.gather(*(_restore(deployments, d, records.get(d["name"]) or {})
                           for d in rows))


async def _restore(deployments: Deployments, d: dict, records: dict[int, dict]) -> None:
    """Adopt the processes that match the state; start the missing ones beside them, or
    the whole group when none could be adopted."""
    name = d["name"]
    wanted = worker_count(d["options"].get("workers"))
    async with deployments._locks[name]:
        for index in sorted(i for i in records if i >= wanted):
            await end_stray(name, records.pop(index), "the deployment runs fewer processes")
        adopted = [index for index, record in sorted(records.items())
                   if await _adopt(deployments, d, index, record)]
    if not adopted:
        deployments.supervisor.workers.pop(name, None)
        await deployments._restart(name, restored=True)
        return
    for index in range(wanted):
        if index not in adopted:
            deployments.supervisor.note_failed_start(name, "not running when the daemon "
                                                           "started", index)


async def _adopt(deployments: Deployments, d: dict, index: int, record: dict) -> bool:
    name = d["name"]
    if not workerrecord.alive(record):
        _forget(record)
        return False
    if not record.get("ready"):
        await end_stray(name, record, "it was still starting when its daemon died")
        return False
    supervisor = deployments.supervisor
    try:
        described = await supervisor.adopt(name, index, record)
    except (MserveError, KeyError, TypeError, ValueError) as exc:  # a record or answer amiss
        supervisor.process(name, index).close_link()
        await end_stray(name, record, getattr(exc, "message", None) or f"bad record ({exc!r})")
        return False
    worker = supervisor.process(name, index)
    why = mismatch(deployments, d, described)
    if why is None:
        try:  # split, labels, token and standby as SQLite has them
            await deployments.apply_one(worker, d, deployments.current_plan(d))
        except MserveError as exc:
            why = f"it could not be brought in line with the state: {exc.message}"
    if why is not None:
        log.info("worker of %s (pid %s) does not match the state (%s): replacing it", name,
                 record["pid"], why)
        await worker.stop(5)  # it serves: let its requests in flight finish
        _forget(record)
        return False
    supervisor.watch(worker)
    process = f" process {index}" if index else ""
    log.info("adopted %s%s: version %s, pid %s (it kept serving while no daemon ran)", name,
             process, d["active_version"], record["pid"])
    deployments.event(name, "adopt", d["active_version"], f"pid {record['pid']}")
    return True


def mismatch(deployments: Deployments, d: dict, described: dict) -> str | None:
    """Why the worker's account differs from what SQLite says it should serve, or None."""
    if (described.get("host"), described.get("port")) != (d["host"], d["port"]):
        return f"it serves {described.get('host')}:{described.get('port')}"
    if described.get("grpc_port") != d["options"].get("grpc_port"):
        return f"its gRPC port is {described.get('grpc_port')}"
    active = deployments.state.version(d["name"], d["active_version"])
    wanted = str(deployments.store.path_of(active["sha256"])) if active else None
    if (described.get("loaded") or {}).get(str(d["active_version"])) != wanted:
        return f"version {d['active_version']} is not loaded"
    theirs = {k: v for k, v in (described.get("options") or {}).items()
              if k not in IGNORED_OPTIONS}
    if theirs != d["options"]:
        changed = sorted(k for k in set(theirs) | set(d["options"])
                         if theirs.get(k) != d["options"].get(k))
        return f"its options differ ({', '.join(changed)})"
    return None


async def end_stray(name: str, record: dict, why: str) -> None:
    """Stop a worker nobody should adopt (SIGTERM, then SIGKILL), so its ports are free."""
    if workerrecord.alive(record):
        log.info("stopping the worker of %s (pid %s): %s", name, record["pid"], why)
        workerrecord.signal_worker(record, signal.SIGTERM)
        try:
            await asyncio.wait_for(wait_gone(record), 5)
        except asyncio.TimeoutError:
            workerrecord.signal_worker(record, signal.SIGKILL)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wait_gone(record), 10)
    _forget(record)


def _forget(record: dict) -> None:
    if record.get("path"):
        workerrecord.remove(Path(record["path"]), record["pid"])
