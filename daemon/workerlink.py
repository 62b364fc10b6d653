"""The daemon's end of a worker's control socket: one JSON line per command and per reply,
matched by id. A link is opened with the worker's secret; the worker answers with its own
account of what it serves (see worker/control.py)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
from pathlib import Path

from mserve.daemon import paths
from mserve.daemon.errors import DeployFailed, MserveError, Unavailable

LINE_LIMIT = 16 * 2**20


class WorkerLink:
    def __init__(self, name: str):
        self.name = name
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self.closed = asyncio.Event()

    async def open(self, path: str, secret: str, timeout: float) -> dict:
        """Connect, present the secret and return the worker's ``describe`` answer;
        Unavailable when the worker cannot be reached or does not know the secret."""
        try:
            paths.check_socket(Path(path))  # ours, not a link, in a folder of ours
            reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(path, limit=LINE_LIMIT), timeout)
            paths.check_peer(self._writer.get_extra_info("socket"), path)
            self._writer.write((json.dumps({"op": "hello", "secret": secret, "id": 0,
                                            "daemon_pid": os.getpid()}) + "\n").encode())
            line = await asyncio.wait_for(reader.readline(), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            self.close()
            raise Unavailable(f"the worker of '{self.name}' cannot be reached on its control "
                              f"socket ({type(exc).__name__})") from None
        except MserveError as exc:  # someone else's socket: send nothing, not even the secret
            self.close()
            raise Unavailable(exc.message) from None
        try:
            hello = json.loads(line)
        except ValueError:
            hello = None
        if not isinstance(hello, dict) or not hello.get("ok"):
            self.close()
            raise Unavailable(f"the worker of '{self.name}' refused its control link")
        self._reader_task = asyncio.create_task(self._read(reader))
        return hello

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                with contextlib.suppress(ValueError, AttributeError):
                    msg = json.loads(line)
                    fut = self._pending.pop(msg.get("id"), None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
        except (OSError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            self._lost()

    def _lost(self) -> None:
        self.closed.set()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(Unavailable(f"the worker of '{self.name}' is not running"))
        self._pending.clear()

    async def request(self, op: str, timeout: float, **fields) -> dict:
        """Send one command and wait for its reply; a refused command raises DeployFailed."""
        if self._writer is None or self.closed.is_set():
            raise Unavailable(f"the worker of '{self.name}' is not running")
        ident = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[ident] = fut
        try:
            self._writer.write((json.dumps({"id": ident, "op": op, **fields}) + "\n").encode())
            await self._writer.drain()
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

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is None:
            self.closed.set()
