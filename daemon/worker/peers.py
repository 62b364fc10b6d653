"""The channel between the worker processes of one deployment: each listens on a private
Unix socket and hands its snapshot (its metrics and statistics) to a sibling that presents
the deployment's secret, so whichever process answers a scrape can describe them all.

One request line ``{"op": "snapshot", "secret": ...}``, one answer line, then the server
closes. Anything else gets no answer: the connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson

from mserve.daemon.paths import UnsafePath, check_peer, check_socket, serve_private

log = logging.getLogger("mserve.worker")
REQUEST_TIMEOUT_S = 2.0
REQUEST_LIMIT = 64 * 2**10
ANSWER_TIMEOUT_S = 10.0  # a sibling that stops reading a large answer
ANSWER_LIMIT = 64 * 2**20


class PeerServer:
    """Answers siblings' snapshot requests on the Unix socket at ``path`` (mode 0600)."""

    def __init__(self, path: str, secret: str,
                 snapshot: Callable[[], Awaitable[dict] | dict]):
        self.path = Path(path)
        self.secret = secret.encode()
        self.snapshot = snapshot
        self._server: asyncio.AbstractServer | None = None
        self._answering: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await serve_private(self._client, self.path, REQUEST_LIMIT)

    def close(self) -> None:
        """Stop listening, drop the answers in progress, remove the socket."""
        if self._server is not None:
            self._server.close()
        for task in list(self._answering):
            task.cancel()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._answering.add(task)
        try:
            if await self._authorized(reader):
                answer = self.snapshot()
                if inspect.isawaitable(answer):
                    answer = await answer
                writer.write(orjson.dumps(answer) + b"\n")
                await asyncio.wait_for(writer.drain(), ANSWER_TIMEOUT_S)
        except (asyncio.TimeoutError, ConnectionError, asyncio.CancelledError):
            # The sibling gave up or went away, or this process closes: drop what is queued
            # (a cancellation re-raised here would be logged by asyncio's stream callback).
            writer.transport.abort()
        except Exception:  # never let one request stop the server
            log.exception("could not answer a sibling's snapshot request")
        finally:
            self._answering.discard(task)
            writer.close()

    async def _authorized(self, reader: asyncio.StreamReader) -> bool:
        """Whether the request line asks for a snapshot with the right secret."""
        try:
            line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT_S)
            request = orjson.loads(line)
        except ValueError:  # too long, or not JSON
            return False
        if not isinstance(request, dict) or request.get("op") != "snapshot":
            return False
        secret = request.get("secret")
        return isinstance(secret, str) and hmac.compare_digest(secret.encode(), self.secret)


async def gather(paths: list[str], secret: str, timeout: float) -> list[dict]:
    """The snapshots of the siblings at ``paths`` that answered within ``timeout`` seconds,
    in ``paths`` order. A sibling that is missing, refuses, is too slow or answers garbage
    is left out (one being restarted is normal); so is a socket that is not ours."""
    answers = await asyncio.gather(*(_ask(path, secret, timeout) for path in paths))
    return [answer for answer in answers if answer is not None]


async def _ask(path: str, secret: str, timeout: float) -> dict | None:
    try:
        return await asyncio.wait_for(_snapshot(Path(path), secret), timeout)
    except UnsafePath as exc:
        log.warning("not asking a sibling: %s", exc.message)
    except (OSError, ValueError, asyncio.TimeoutError) as exc:
        log.debug("no snapshot from %s: %r", path, exc)
    return None


async def _snapshot(path: Path, secret: str) -> dict | None:
    if not check_socket(path):
        return None
    reader, writer = await asyncio.open_unix_connection(str(path), limit=ANSWER_LIMIT)
    try:
        check_peer(writer.get_extra_info("socket"), path)
        writer.write(orjson.dumps({"op": "snapshot", "secret": secret}) + b"\n")
        await writer.drain()
        line = await reader.readline()
    finally:
        writer.close()
    answer = orjson.loads(line)  # ValueError when empty (refused) or cut short
    return answer if isinstance(answer, dict) else None
