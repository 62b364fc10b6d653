"""Worker processes: spawn, talk to, watch, restart with backoff, stop.

One ``WorkerProcess`` per deployment. The supervisor knows nothing about SQLite: the
deployment layer hands it a worker config and a callback that records what happened.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from mserve.daemon.errors import DeployFailed, Unavailable

log = logging.getLogger("mserve.daemon")
READY, LOADING, FAILED, STOPPED = "ready", "loading", "failed", "stopped"
LINE_LIMIT = 16 * 2**20
BACKOFF_MAX_S = 30.0
FAILED_AFTER = 3  # consecutive crashes before a deployment is shown as failed
HEALTHY_AFTER_S = 30.0  # a worker that lived this long resets the crash count


def backoff(crashes: int) -> float:
    """Seconds to wait before restart number ``crashes``: 0.25, 0.5, 1, 2 ... up to 30."""
    return min(BACKOFF_MAX_S, 0.25 * 2 ** min(max(0, crashes - 1), 16))


class WorkerProcess:
    """One deployment's worker process and the JSON-lines pipe to it."""

    def __init__(self, name: str, log_path: Path, python: str = sys.executable):
        self.name, self.log_path, self.python = name, log_path, python
        self.proc: asyncio.subprocess.Process | None = None
        self.status, self.error = LOADING, None
        self.restarts = self.crashes = 0
        self.started_at = 0.0
        self.stopping = False
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._ready: asyncio.Future | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.returncode is None else None

    async def start(self, config: dict, timeout: float) -> dict:
        """Spawn the worker and wait for its 'ready' event; DeployFailed with its reason."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self.stopping = False
        with open(self.log_path, "ab") as log_file:
            self.proc = await asyncio.create_subprocess_exec(
                self.python, "-m", "mserve.daemon.worker", json.dumps(config),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=log_file, limit=LINE_LIMIT)
        asyncio.create_task(self._read(self.proc))
        try:
            event = await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except asyncio.TimeoutError:
            await self.kill()
            raise DeployFailed(f"the worker did not become ready within {timeout:.0f} s") from None
        if event.get("event") != "ready":
            await self.proc.wait()
            raise DeployFailed(event.get("error") or "the worker failed to start")
        self.started_at = time.monotonic()
        self.status, self.error = READY, None
        return event

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        async for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "event" in msg:
                if self._ready and not self._ready.done():
                    self._ready.set_result(msg)
            elif (fut := self._pending.pop(msg.get("id"), None)) and not fut.done():
                fut.set_result(msg)
        code = await proc.wait()
        reason = {"event": "failed", "error": f"the worker exited during start-up ({_exit(code)})"
                  f"{_log_hint(self.log_path)}"}
        if self._ready and not self._ready.done():
            self._ready.set_result(reason)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(Unavailable(f"the worker of '{self.name}' exited ({_exit(code)})"))
        self._pending.clear()

    async def request(self, op: str, timeout: float, **fields) -> dict:
        """Send one command and wait for its reply; a refused command raises DeployFailed."""
        if self.pid is None:
            raise Unavailable(f"the worker of '{self.name}' is not running")
        ident = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[ident] = fut
        self.proc.stdin.write((json.dumps({"id": ident, "op": op, **fields}) + "\n").encode())
        try:
            await self.proc.stdin.drain()
            reply = await asyncio.wait_for(fut, timeout)
        except (BrokenPipeError, ConnectionResetError):
            raise Unavailable(f"the worker of '{self.name}' is not running") from None
        except asyncio.TimeoutError:
            raise DeployFailed(f"the worker did not answer '{op}' within {timeout:.0f} s") from None
        finally:
            self._pending.pop(ident, None)
        if not reply.get("ok"):
            raise DeployFailed(reply.get("error") or f"'{op}' failed")
        return reply

    async def stop(self, timeout: float) -> None:
        """SIGTERM (the worker drains in-flight requests), then SIGKILL after ``timeout``."""
        self.stopping = True
        self.status = STOPPED
        if self.pid is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            await self.kill()

    async def kill(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


OnExit = Callable[[str, str], Awaitable[None]]  # (deployment, reason)
OnRestart = Callable[[str], Awaitable[None]]  # (deployment): start it again


class Supervisor:
    """Keeps one worker per deployment alive; restarts crashed ones with backoff."""

    def __init__(self, log_path: Callable[[str], Path], on_exit: OnExit, restart: OnRestart,
                 python: str = sys.executable):
        self.log_path, self.on_exit, self.restart = log_path, on_exit, restart
        self.python = python
        self.workers: dict[str, WorkerProcess] = {}
        self._tasks: set[asyncio.Task] = set()

    def get(self, name: str) -> WorkerProcess | None:
        return self.workers.get(name)

    def worker(self, name: str) -> WorkerProcess:
        if name not in self.workers:
            self.workers[name] = WorkerProcess(name, self.log_path(name), self.python)
        return self.workers[name]

    async def start(self, name: str, config: dict, timeout: float) -> dict:
        """Start ``name``'s worker and watch it; on failure the worker is left not running."""
        worker = self.worker(name)
        worker.status = LOADING
        event = await worker.start(config, timeout)
        self._spawn(self._watch(worker, worker.proc))
        return event

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, worker: WorkerProcess, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if worker.stopping or worker.proc is not proc:
            return
        lived = time.monotonic() - worker.started_at
        worker.crashes = 1 if lived > HEALTHY_AFTER_S else worker.crashes + 1
        hint = _log_hint(worker.log_path) if code and code > 0 else ""
        worker.error = f"worker exited ({_exit(code)}){hint}"
        worker.status = FAILED if worker.crashes >= FAILED_AFTER else LOADING
        log.warning("worker of %s (pid %s) exited: %s; restart in %.2f s", worker.name,
                    proc.pid, worker.error, backoff(worker.crashes))
        await self.on_exit(worker.name, worker.error)
        self.schedule_restart(worker)

    def schedule_restart(self, worker: WorkerProcess) -> None:
        async def later():
            await asyncio.sleep(backoff(worker.crashes))
            if worker.stopping or worker.pid is not None:
                return
            worker.restarts += 1
            await self.restart(worker.name)

        self._spawn(later())

    def note_failed_start(self, name: str, error: str) -> None:
        """A (re)start failed: show it, and try again later with a longer wait."""
        worker = self.worker(name)
        worker.crashes += 1
        worker.error = error
        worker.status = FAILED if worker.crashes >= FAILED_AFTER else LOADING
        self.schedule_restart(worker)

    async def stop(self, name: str, timeout: float) -> None:
        worker = self.workers.pop(name, None)
        if worker:
            await worker.stop(timeout)

    async def stop_all(self, timeout: float) -> None:
        workers = list(self.workers.values())
        for w in workers:
            w.stopping = True
        await asyncio.gather(*(w.stop(timeout) for w in workers), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()


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

