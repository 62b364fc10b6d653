"""One worker process of a deployment: spawn it (on a listening socket we keep a copy of,
for a group: handoff.py) or adopt it from an earlier daemon, talk to it over its control
link, signal, stop and kill it. The supervisor (supervisor.py) watches and restarts these.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable
from pathlib import Path

from mserve.daemon import handoff, workerrecord
from mserve.daemon.errors import DeployFailed, Unavailable
from mserve.daemon.workergroup import LOADING, READY, STOPPED
from mserve.daemon.workerlink import LINE_LIMIT, WorkerLink

LINK_TIMEOUT_S = 5.0


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
        self.listener = None  # our copy of its listening socket (a group's; handoff.py)
        self.handoff: str | None = None  # where it takes a dead sibling's connections

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
        self.release()
        self.handoff = config.get("handoff_socket")
        if self.handoff and config.get("join"):
            self.listener = handoff.hold(config["host"], config["port"],
                                         f"{self.name} process {self.index}")
            if self.listener is not None:
                config["listen_fd"] = self.listener.fileno()
        try:
            with open(self.log_path, "ab") as log_file:
                proc = await asyncio.create_subprocess_exec(
                    self.python, "-m", "mserve.daemon.worker", self.name,
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    stderr=log_file, limit=LINE_LIMIT, start_new_session=True,
                    pass_fds=(config["listen_fd"],) if self.listener else ())
        except BaseException:
            self.release()
            raise
        try:
            return await self._started(proc, config, timeout)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Close our copy of the listening socket (it leaves the port with the process)."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def take_listener(self):
        """Our copy of the listening socket of a process that died (for handoff.hand_over),
        no longer ours to close."""
        listener, self.listener = self.listener, None
        return listener

    async def _started(self, proc: asyncio.subprocess.Process, config: dict,
                       timeout: float) -> dict:
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
        self.release()
        self.handoff = record.get("handoff")
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
        self.release()  # first: the port stops giving it connections when it stops accepting
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
        self.release()
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
