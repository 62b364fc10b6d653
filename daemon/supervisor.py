"""Worker processes: spawn or adopt, talk to, watch, health-check, restart, stop.

One ``WorkerGroup`` per deployment (workergroup.py), of one ``WorkerProcess`` per process
(``--workers N``, workerprocess.py). A process is either started by this daemon or adopted from an earlier one
(it outlived that daemon; see workerrecord.py); both are reached over the process's control
socket and watched until they exit. A process that crashes is restarted alone while its
siblings serve. The supervisor knows nothing about SQLite: the deployment layer hands it
worker configs and callbacks that record what happened. A restart never waits on those
records: a database that cannot be written must not keep a crashed deployment down.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from mserve.daemon import handoff, healthcheck
from mserve.daemon.workergroup import FAILED, LOADING, READY, STOPPED, WorkerGroup
from mserve.daemon.workerprocess import WorkerProcess, _exit, _log_hint

__all__ = ["FAILED", "LOADING", "READY", "STOPPED", "Supervisor", "WorkerProcess", "backoff"]
log = logging.getLogger("mserve.daemon")
BACKOFF_MAX_S = 30.0
FAILED_AFTER = 3  # consecutive crashes before a deployment is shown as failed
HEALTHY_AFTER_S = 30.0  # a worker that lived this long resets the crash count


def backoff(crashes: int) -> float:
    """Seconds to wait before restart number ``crashes``: 0.25, 0.5, 1, 2 ... up to 30."""
    return min(BACKOFF_MAX_S, 0.25 * 2 ** min(max(0, crashes - 1), 16))


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
        group = self.get(worker.name)
        siblings = [w.handoff for w in group.serving()
                    if w is not worker and w.handoff] if group else []
        if (listener := worker.take_listener()) is not None:
            # off the loop: a sibling slow to take its datagrams must not stall the daemon
            if taken := await asyncio.to_thread(handoff.hand_over, listener, siblings):
                log.info("%s: %d connection(s) process %d had not read went to its "
                         "siblings", worker.name, taken, worker.index)
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
