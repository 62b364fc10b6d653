"""Worker processes: spawn or adopt, talk to, watch, health-check, restart, stop.

One ``WorkerGroup`` per deployment (workergroup.py), of one ``WorkerProcess`` per process
(``--workers N``). A process is either started by this daemon or adopted from an earlier one
(it outlived that daemon; see workerrecord.py); both are reached over the process's control
socket and watched until they exit. A process that crashes is restarted alone while its
siblings serve. The supervisor knows nothing about SQLite: the deployment layer hands it
worker configs and callbacks that record what happened. A restart never waits on those
records: a database that cannot be written must not keep a crashed deployment down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from mserve.daemon import healthcheck, workerrecord
from mserve.daemon.errors import DeployFailed, Unavailable
from mserve.daemon.workergroup import FAILED, LOADING, READY, STOPPED, WorkerGroup
from mserve.daemon.workerlink import LINE_LIMIT, WorkerLink

__all__ = ["FAILED", "LOADING", "READY", "STOPPED", "Supervisor", "WorkerProcess", "backoff"]
log = logging.getLogger("mserve.daemon")
BACKOFF_MAX_S = 30.0
FAILED_AFTER = 3  # consecutive crashes before a deployment is shown as failed
HEALTHY_AFTER_S = 30.0  # a worker that lived this long resets the crash count
LINK_TIMEOUT_S = 5.0


def backoff(crashes: int) -> float:
    """Seconds to wait before restart number ``crashes``: 0.25, 0.5, 1, 2 ... up to 30."""
    return min(BACKOFF_MAX_S, 0.25 * 2 ** min(max(0, crashes - 1), 16))


class WorkerProcess:
    """One worker process of a deployment (started here or adopted) and its control link;
    ``index`` is its place in the deployment's group."""

    def __init__(self, name: str, log_path: Path, python: str = sys.executable,
                 index: int = 0):
        self.name, self.log_path, self.python, self.index = name, log_path, python, index
        self.proc: asyncio.subprocess.Process | None = None  # None when adopted
        self.link: WorkerLink | None = None
        self.record: dict = {}  # pid and start time: who to signal, and to wait for
        self.endpoint: tuple[str, int, bool] | None = None  # for the HTTP health probe
        self.status, self.error = LOADING, None
        self.restarts = self.crashes = 0
        self.started_at = 0.0
        self.stopping = False
        self.adopted = False
        self.generation = 0  # bumped by every start or adoption
        self.hung: str | None = None  # why the health check killed it

    @property
    def pid(self) -> int | None:
        if self.proc is not None:
            return self.proc.pid if self.proc.returncode is None else None
        return self.record.get("pid") if self.record and workerrecord.alive(self.record) \
            else None

    async def start(self, config: dict, timeout: float) -> dict:
        """Spawn the worker (its config on stdin, never in argv) and wait for its 'ready'
        event, then open its control link; DeployFailed with the reason."""
        self.stopping, self.adopted, self.hung = False, False, None
        config = {**config, "restarts": self.restarts}  # in its record: a later daemon shows it
        with open(self.log_path, "ab") as log_file:
            proc = await asyncio.create_subprocess_exec(
                self.python, "-m", "mserve.daemon.worker", self.name,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=log_file, limit=LINE_LIMIT, start_new_session=True)
        self.proc, self.generation = proc, self.generation + 1
        self.record = {"pid": proc.pid, "started": workerrecord.start_time(proc.pid)}
        proc.stdin.write((json.dumps(config) + "\n").encode())
        with contextlib.suppress(OSError):
            await proc.stdin.drain()
        proc.stdin.close()
        try:
            event = await asyncio.wait_for(self._first_event(proc), timeout)
        except asyncio.TimeoutError:
            await self.kill()
            raise DeployFailed(f"the worker did not become ready within {timeout:.0f} s") from None
        if event.get("event") != "ready":
            await proc.wait()
            raise DeployFailed(event.get("error") or "the worker failed to start")
        await self._link(config["control_socket"], config["secret"])
        self.endpoint = (config["host"], config["port"], bool(config["options"].get("tls")))
        self.started_at = time.monotonic()
        self.status, self.error = READY, None
        return event

    async def _first_event(self, proc: asyncio.subprocess.Process) -> dict:
        async for line in proc.stdout:
            with contextlib.suppress(ValueError):
                msg = json.loads(line)
                if isinstance(msg, dict) and "event" in msg:
                    return msg
        code = await proc.wait()
        return {"event": "failed", "error": f"the worker exited during start-up ({_exit(code)})"
                                            f"{_log_hint(self.log_path)}"}

    async def _link(self, path: str, secret: str) -> dict:
        link = WorkerLink(self.name)
        try:
            described = await link.open(path, secret, LINK_TIMEOUT_S)
        except Unavailable as exc:
            await self.kill()
            raise DeployFailed(exc.message) from None
        self.link = link
        return described

    async def adopt(self, record: dict) -> dict:
        """Take over a worker an earlier daemon started; its ``describe`` answer.
        Unavailable when it is not that process any more or does not answer."""
        if not workerrecord.alive(record):
            raise Unavailable(f"the worker of '{self.name}' (pid {record.get('pid')}) is gone")
        link = WorkerLink(self.name)
        described = await link.open(record["socket"], record["secret"], LINK_TIMEOUT_S)
        if described.get("pid") != record["pid"] or described.get("name") != self.name:
            link.close()
            raise Unavailable(f"the control socket of '{self.name}' answers for another process")
        self.proc, self.link, self.record = None, link, record
        self.stopping, self.adopted, self.hung = False, True, None
        self.restarts = max(self.restarts, int(record.get("restarts") or 0))
        self.generation += 1
        self.endpoint = (described["host"], described["port"],
                         bool((described.get("options") or {}).get("tls")))
        self.started_at = time.monotonic()
        self.status, self.error = READY, None
        return described

    async def request(self, op: str, timeout: float, **fields) -> dict:
        """Send one command and wait for its reply; a refused command raises DeployFailed."""
        if self.pid is None or self.link is None:
            raise Unavailable(f"the worker of '{self.name}' is not running")
        return await self.link.request(op, timeout, **fields)

    def exited(self) -> Awaitable[int | None]:
        """Resolves when the current process exits: its exit code (None if adopted)."""
        if self.proc is not None:
            return self.proc.wait()
        return wait_gone(dict(self.record))

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            if self.proc.returncode is None:
                self.proc.send_signal(sig)
        elif self.record:
            workerrecord.signal_worker(self.record, sig)

    async def stop(self, timeout: float) -> None:
        """SIGTERM (the worker drains in-flight requests), then SIGKILL after ``timeout``."""
        self.stopping = True
        self.status = STOPPED
        if self.pid is None:
            self.close_link()
            return
        waiter = self.exited()
        self.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            await self.kill()
        self.close_link()

    async def kill(self) -> None:
        if self.pid is not None:
            waiter = self.exited()
            self.signal(signal.SIGKILL)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(waiter, 10)
        self.close_link()

    def close_link(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None


OnExit = Callable[[str, str], Awaitable[None]]  # (deployment, reason)
OnRestart = Callable[[str, int], Awaitable[None]]  # (deployment, process): start it again


class Supervisor:
    """Keeps every process of every deployment alive: restarts crashed and hung ones with
    backoff, each alone."""

    def __init__(self, log_path: Callable[[str], Path], on_exit: OnExit, restart: OnRestart,
                 python: str = sys.executable, on_hung: OnExit | None = None):
        self.log_path, self.on_exit, self.restart = log_path, on_exit, restart
        self.on_hung = on_hung
        self.python = python
        self.workers: dict[str, WorkerGroup] = {}
        self._tasks: set[asyncio.Task] = set()

    def get(self, name: str) -> WorkerGroup | None:
        return self.workers.get(name)

    def worker(self, name: str) -> WorkerGroup:
        if name not in self.workers:
            self.workers[name] = WorkerGroup(name)
        return self.workers[name]

    def process(self, name: str, index: int) -> WorkerProcess:
        """Process ``index`` of ``name`` (made, not started, when the group has no such)."""
        group = self.worker(name)
        while len(group.replicas) <= index:
            group.replicas.append(WorkerProcess(name, self.log_path(name), self.python,
                                                len(group.replicas)))
        return group.replicas[index]

    async def start(self, name: str, configs: list[dict], timeout: float) -> dict:
        """Start all of ``name``'s processes (one config each) at once and watch them; the
        first one's 'ready' event. If any fails, none is left running."""
        group = self.worker(name)
        del group.replicas[len(configs):]
        group.peer_secret = configs[0].get("peer_secret")
        workers = [self.process(name, c.get("replica", 0)) for c in configs]
        for worker in workers:
            worker.status = LOADING
        events = await asyncio.gather(*(w.start(c, timeout) for w, c in zip(workers, configs)),
                                      return_exceptions=True)
        failed = next((e for e in events if isinstance(e, BaseException)), None)
        if failed is not None:
            await asyncio.gather(*(w.kill() for w, e in zip(workers, events)
                                   if not isinstance(e, BaseException)))
            for worker in workers:
                worker.status = LOADING
            raise failed
        for worker in workers:
            self.watch(worker)
        return events[0]

    async def start_one(self, name: str, config: dict, timeout: float) -> dict:
        """Start one process of ``name`` beside its serving siblings, and watch it."""
        worker = self.process(name, config.get("replica", 0))
        worker.status = LOADING
        event = await worker.start(config, timeout)
        self.watch(worker)
        return event

    async def stop_one(self, name: str, index: int, timeout: float) -> None:
        """Stop (drain) process ``index`` and every one after it: the group shrinks."""
        group = self.get(name)
        if group is not None:
            leaving = group.replicas[index:]
            del group.replicas[index:]
            await asyncio.gather(*(w.stop(timeout) for w in leaving), return_exceptions=True)

    async def adopt(self, name: str, index: int, record: dict) -> dict:
        """Attach to a running process (not watched until ``watch``); its account of itself."""
        described = await self.process(name, index).adopt(record)
        group = self.worker(name)
        group.peer_secret = record.get("peer_secret") or group.peer_secret
        return described

    def watch(self, worker: WorkerProcess) -> None:
        self._spawn(self._watch(worker, worker.generation, worker.exited()))
        self._spawn(self._check_health(worker, worker.generation))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, worker: WorkerProcess, generation: int, exited) -> None:
        code = await exited
        if worker.stopping or worker.generation != generation:
            return
        worker.close_link()
        lived = time.monotonic() - worker.started_at
        worker.crashes = 1 if lived > HEALTHY_AFTER_S and not worker.hung else worker.crashes + 1
        how = _exit(code) if code is not None else "an adopted worker; exit status unknown"
        hint = _log_hint(worker.log_path) if code and code > 0 else ""
        worker.error = (f"worker stopped answering ({worker.hung}) and was killed"
                        if worker.hung else f"worker exited ({how}){hint}")
        worker.status = FAILED if worker.crashes >= FAILED_AFTER else LOADING
        pid = worker.record.get("pid")
        log.warning("worker of %s (pid %s) exited: %s; restart in %.2f s", worker.name,
                    pid, worker.error, backoff(worker.crashes))
        self.schedule_restart(worker)  # first: it must not depend on the record below
        await _noted(self.on_exit(worker.name, worker.error), "the exit of", worker.name)

    async def _check_health(self, worker: WorkerProcess, generation: int) -> None:
        failures = 0
        while True:
            await asyncio.sleep(healthcheck.interval_s())
            if worker.stopping or worker.generation != generation or worker.pid is None:
                return
            if worker.status != READY:
                continue
            group = self.get(worker.name)
            alone = group is None or len(group.replicas) <= 1
            # The shared port answers from any process: its probe speaks for one alone.
            problem = await healthcheck.problem(worker, healthcheck.timeout_s(), http=alone)
            if worker.stopping or worker.generation != generation:
                return
            if problem is None:
                if failures:
                    worker.error, failures = None, 0
                continue
            failures += 1
            worker.error = f"not answering health checks: {problem}"
            log.warning("worker of %s (pid %s) failed a health check (%d of %d): %s",
                        worker.name, worker.pid, failures, healthcheck.failures_allowed(),
                        problem)
            if failures >= healthcheck.failures_allowed():
                worker.hung = problem
                worker.signal(signal.SIGKILL)  # first: the exit watcher restarts it
                if self.on_hung is not None:
                    await _noted(self.on_hung(worker.name, problem), "the hang of", worker.name)
                return

    def schedule_restart(self, worker: WorkerProcess) -> None:
        async def later():
            await asyncio.sleep(backoff(worker.crashes))
            if worker.stopping or worker.pid is not None:
                return
            worker.restarts += 1
            await self.restart(worker.name, worker.index)

        self._spawn(later())

    def note_failed_start(self, name: str, error: str, index: int | None = None) -> None:
        """A (re)start of process ``index`` (None: of all) failed: show it, and try again
        later with a longer wait."""
        group = self.worker(name)
        if not group.replicas:
            self.process(name, 0)
        for worker in group.replicas if index is None else [self.process(name, index)]:
            if worker.pid is not None:
                continue
            worker.crashes += 1
            worker.error = error
            worker.status = FAILED if worker.crashes >= FAILED_AFTER else LOADING
            self.schedule_restart(worker)

    async def stop(self, name: str, timeout: float) -> None:
        worker = self.workers.pop(name, None)
        if worker:
            await worker.stop(timeout)

    def _all(self) -> list[WorkerProcess]:
        return [w for group in self.workers.values() for w in group.replicas]

    async def stop_all(self, timeout: float) -> None:
        workers = self._all()
        for w in workers:
            w.stopping = True
        await asyncio.gather(*(w.stop(timeout) for w in workers), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()

    async def leave_all(self) -> None:
        """Leave every worker serving (``daemon stop --keep-serving``): tell each this daemon
        leaves on purpose, so none starts a replacement daemon; the next one adopts them."""
        workers = self._all()
        for w in workers:
            w.stopping = True
        await asyncio.gather(*(w.request("bye", 2) for w in workers if w.link),
                             return_exceptions=True)
        for w in workers:
            w.close_link()
        for task in list(self._tasks):
            task.cancel()


async def _noted(record: Awaitable[None], what: str, name: str) -> None:
    """Run a bookkeeping callback; its failure (SQLite locked, disk full) is logged, never
    raised: the daemon's log keeps what the database could not."""
    try:
        await record
    except Exception as exc:  # noqa: BLE001 - bookkeeping must not stop supervision
        log.error("could not record %s %s: %s", what, name, exc)


async def wait_gone(record: dict) -> None:
    """Wait until the process the record names has exited (it is not our child)."""
    pid = record.get("pid")
    if not pid:
        return
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        loop.add_reader(fd, lambda: done.done() or done.set_result(None))
        try:
            if workerrecord.alive(record):  # not recycled between the record and the open
                await done
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        return
    while workerrecord.alive(record):
        await asyncio.sleep(0.2)


def _exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _log_hint(path: Path) -> str:
    """The last line the worker logged, to say why it died."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            lines = [l for l in f.read().decode("utf-8", "replace").splitlines() if l.strip()]
    except OSError:
        return ""
    return f": {lines[-1].strip()[:300]}" if lines else ""
