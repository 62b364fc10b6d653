"""The worker's HTTP/1.1 server: an asyncio protocol over httptools, with no ASGI layer.

Each connection parses with httptools, buffers a request's body, hands the whole ``Request``
to the app and writes the answer with one ``transport.write``. Requests on one connection are
answered in order (pipelining works; reading pauses while too many requests, or too many body
bytes, wait). Keep-alive follows HTTP/1.1 rules, idle connections close after
``keepalive_s``, ``Expect: 100-continue`` is honoured, and a request that does not parse gets
400 and the connection closes. HEAD is answered with the head the app's answer would have
(Content-Length included) and no body.

What a client may hold is bounded (see ``connlimits``): a body is refused right after the
headers when its Content-Length is over the limit (413) or over what the worker can hold now
(503), a chunked one as soon as its running total is; headers and bodies have deadlines
(408); connections are capped below the open-file limit. After such a refusal the connection
half-closes and drops what still arrives for a moment, so that the client reads the answer.

Bodies may come compressed (``Content-Encoding: gzip|deflate``, see ``encoding``): the limit
then applies to the decompressed size, an unknown coding gets 415 and a corrupt stream 400.
A small body is decoded on the event loop, the rest of a large one in a thread; a body with
no Content-Encoding costs nothing more. Answers of 200 are compressed when the request's
``Accept-Encoding`` asks for gzip or deflate and they are at least ``MIN_COMPRESS`` bytes.

While ``leaving`` (a shutdown's grace, before the drain) every answer carries
``Connection: close``, so keep-alive clients reconnect, to another replica once their load
balancer has dropped this one. ``drain`` stops listening, closes idle connections at once and
gives those with a request in progress up to the drain time to answer it before they are cut.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from urllib.parse import unquote

import httptools

from mserve.daemon.errors import MserveError
from mserve.daemon.fdlimit import raise_fd_limit
from mserve.daemon.worker.connlimits import (BODY, HEAD, IDLE, Crowd, Guarded, Limits,
                                             watch_accept_errors)
from mserve.daemon.worker.encoding import (INLINE_BYTES, MIN_COMPRESS, Inflater,
                                           UnsupportedEncoding, compress, request_coding,
                                           response_coding)
from mserve.daemon.worker.wire import (Handler, Request, Response, answer_bytes, busy, encode,
                                       error, from_exception, too_large)

log = logging.getLogger("mserve.worker")
MAX_HEADER_BYTES = 64 * 1024
DRAIN_QUIET_S = 0.5  # at a drain, how long a connection must have been idle to be closed
MAX_PIPELINED = 32  # requests read ahead on one connection before reading pauses
# Only inference answers are compressed, as Triton does: tritonclient.http.aio turns
# aiohttp's decompression off and reads every other answer as plain JSON.
INFERENCE_PATHS = ("/infer", ":predict")
__all__ = ["HttpServer", "Request", "Response", "encode"]


class HttpServer:
    """Serves ``handler`` on a listening socket, within ``limits``; ``drain`` to stop."""

    def __init__(self, handler: Handler, *, max_body: int, keepalive_s: float = 5.0,
                 ssl=None, after: Callable[[], None] | None = None,
                 limits: Limits | None = None):
        self.handler, self.max_body, self.keepalive_s, self.ssl = (handler, max_body,
                                                                   keepalive_s, ssl)
        self.after = after  # called once an answer is written (deferred accounting)
        self.crowd = Crowd(limits or Limits.from_env())
        self.connections: set[Connection] = set()
        self.pending = 0  # requests read and not answered yet, over all connections
        self.server: asyncio.AbstractServer | None = None
        self._taking: set[asyncio.Task] = set()  # handed-over connections being set up
        self.draining = False
        self.leaving = False  # a shutdown's grace (main.Grace): serve, but close after answers

    async def start(self, sock) -> None:
        loop = asyncio.get_running_loop()
        self.crowd.loop = loop
        self.crowd.fit(raise_fd_limit()[0])
        watch_accept_errors(loop, self.crowd, self.shed)
        extra = {"ssl_handshake_timeout": self.crowd.limits.header_s} if self.ssl else {}
        self.server = await loop.create_server(lambda: Connection(self), sock=sock,
                                               ssl=self.ssl, backlog=2048, **extra)

    def take(self, sock) -> None:
        """Serve a connection accepted elsewhere: one a killed sibling never read from,
        handed over by the daemon (daemon/handoff.py)."""
        if self.draining:
            sock.close()
            return
        loop = asyncio.get_running_loop()
        extra = {"ssl_handshake_timeout": self.crowd.limits.header_s} if self.ssl else {}
        task = loop.create_task(loop.connect_accepted_socket(
            lambda: Connection(self), sock, ssl=self.ssl, **extra))
        self._taking.add(task)
        task.add_done_callback(self._taken)

    def _taken(self, task: asyncio.Task) -> None:
        self._taking.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not serve a handed-over connection: %s", task.exception())

    def make_room(self) -> bool:
        """Close the connection that matters least, for a new one; False if none could go."""
        victim = self.crowd.victim(asyncio.get_running_loop().time())
        self.crowd.note("refused" if victim is None else "closed")
        if victim is not None:
            victim.evict()
        return victim is not None

    def shed(self, count: int = 16) -> None:
        """Free descriptors after the system refused one: close up to ``count`` connections."""
        for _ in range(count):
            if not self.make_room():
                return

    async def drain(self, seconds: float) -> None:
        """Stop accepting, let requests in progress finish (up to ``seconds``), close all."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.close_when_idle()
        deadline = asyncio.get_running_loop().time() + seconds
        while self.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.transport.abort()


class Refused(Exception):
    """Raised in a parser callback once the request is answered: parse no further."""


class Connection(Guarded, asyncio.Protocol):
    """One client connection: parse, queue, answer in order. Its ``phase`` says what it
    reads (nothing yet, headers, a body), its ``bucket`` what the worker may close first."""

    def __init__(self, server: HttpServer):
        self.server, self.crowd = server, server.crowd
        self.loop = asyncio.get_running_loop()
        self.parser: httptools.HttpRequestParser | None = None
        self.transport: asyncio.Transport | None = None
        self.client: str | None = None
        self.waiting: deque[tuple[Request | Response, bool]] = deque()
        self.buffered = 0  # body bytes of the requests in ``waiting``
        self.held = 0  # body bytes held (read, queued, being answered): the worker's budget
        self.busy = self.closing = self.paused = self.lingering = False
        self.phase, self.bucket = IDLE, None
        self.timer: asyncio.TimerHandle | None = None
        self.since = self.started = self.last_seen = self.loop.time()
        self._reset()

    def _reset(self) -> None:
        self.url, self.headers, self.body = b"", {}, b""
        self.header_bytes = 0
        self.coding: str | None = None

    @property
    def received(self) -> int:
        return len(self.body)

    # ---- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.client = f"{peer[0]}:{peer[1]}"
        if len(self.server.connections) >= self.crowd.cap and not self.server.make_room():
            self.closing = True
            transport.write(answer_bytes(busy("too many connections")))
            transport.close()
            return
        self.parser = httptools.HttpRequestParser(self)
        self.server.connections.add(self)
        self._place()
        self._arm()

    def connection_lost(self, exc) -> None:
        self.closing = True
        self.server.connections.discard(self)
        self.crowd.put(self, None)
        self.server.pending -= sum(isinstance(item, Request) for item, _ in self.waiting)
        self.waiting.clear()
        self._release(self.held)
        self.body, self.parser = b"", None  # the parser refers back to us: no cycle for the GC
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def data_received(self, data: bytes) -> None:
        if self.closing:  # refused, or lingering after the answer: what follows is dropped
            return
        self.last_seen = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.closing:  # a callback answered and stopped the parser
                return
            if isinstance(exc, httptools.HttpParserUpgrade):
                self._fail(400, "protocol upgrades are not supported")
            elif self.header_bytes > MAX_HEADER_BYTES:
                self._fail(400, f"request line and headers exceed {MAX_HEADER_BYTES // 1024} KiB")
            else:
                self._fail(400, "malformed HTTP request")

    # ---- httptools callbacks -----------------------------------------------------------
    def on_message_begin(self) -> None:
        self.phase, self.started = HEAD, self.loop.time()
        if not self.busy:  # else placed and timed once the answers before it are written
            self._place()
            self._arm()

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        self._count(len(name) + len(value))

    def _count(self, size: int) -> None:
        self.header_bytes += size
        if self.header_bytes > MAX_HEADER_BYTES:
            raise httptools.HttpParserError("headers too large")

    def on_headers_complete(self) -> None:
        """Refuse what can be refused before the body: a coding not spoken (415), a size
        over the limit (413) or over what the worker can hold now (503)."""
        headers, limit = self.headers, self.server.max_body
        if (coding := headers.get("content-encoding")) is not None:
            try:
                self.coding = request_coding(coding)
            except UnsupportedEncoding as exc:
                self._refuse(from_exception(exc))
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > limit:
                self._refuse(too_large(limit))
            if not self.crowd.room(int(declared), limit):
                self._refuse(busy("the worker holds too many request bodies"))
        elif declared is None and "transfer-encoding" not in headers:
            return  # no body: the message is complete
        if headers.get("expect", "").lower() == "100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.phase, self.started = BODY, self.loop.time()
        if not self.busy:
            self._place()
            self._arm()

    def on_body(self, body: bytes) -> None:
        limit = self.server.max_body
        if len(self.body) + len(body) > limit:
            self._refuse(too_large(limit))
        if not self.crowd.take(len(body), limit):
            self._refuse(busy("the worker holds too many request bodies"))
        self.held += len(body)
        if not self.body:
            self.body = body
        else:  # one buffer that grows in place and goes at once, not a list of chunks
            if type(self.body) is bytes:
                self.body = bytearray(self.body)
            self.body += body

    def on_message_complete(self) -> None:
        keep = self.parser.should_keep_alive()
        body = self.body  # bytes or a bytearray: copying 64 MiB would stall the loop
        self.body = b""
        path = self.url.split(b"?", 1)[0].decode("latin-1")
        if "%" in path:
            path = unquote(path, encoding="latin-1")
        request = Request(self.parser.get_method().decode("latin-1"), path,
                          self.headers, body, self.client, self.coding)
        self.waiting.append((request, keep))
        self.buffered += len(body)
        self.server.pending += 1
        self._reset()
        self.phase = IDLE
        if not self.paused and (len(self.waiting) >= MAX_PIPELINED
                                or self.buffered > self.server.max_body):
            self.paused = True  # a client far ahead of its answers waits in TCP, not here
            self.transport.pause_reading()
        self._start_answering()

    # ---- answering ---------------------------------------------------------------------
    def _start_answering(self) -> None:
        self._place()
        if not self.busy:
            self.busy = True
            self.loop.create_task(self._answer_all())

    async def _answer_all(self) -> None:
        try:
            while self.waiting and not self.transport.is_closing():
                if not await self._answer_next():
                    return
        finally:
            if self.server.after is not None:  # answers that were never written count too
                self.server.after()
            self.busy = False
            self.since = self.last_seen = self.loop.time()
            if self.server.draining and not self.transport.is_closing():
                self.transport.close()
            self._place()
            self._arm()

    async def _answer_next(self) -> bool:
        """Answer the first request waiting; False once the connection is to close. The
        request (and its body) goes when this returns."""
        item, keep = self.waiting.popleft()
        head = False
        if isinstance(item, Request):
            head, size = item.method == "HEAD", len(item.body)
            self.buffered -= size
            try:
                refused = None if item.coding is None else await self._decode(item)
                status, headers, body = refused or await self.server.handler(item)
                if (accept := item.headers.get("accept-encoding")) is not None \
                        and status == 200 and len(body) >= MIN_COMPRESS \
                        and item.path.endswith(INFERENCE_PATHS):
                    headers, body = await self._compress(accept, headers, body)
            finally:
                self.server.pending -= 1
                if size:
                    self._release(size)
        else:
            (status, headers, body), keep = item, False
        keep = keep and not (self.server.draining or self.server.leaving)
        if self.transport.is_closing():
            return False
        for chunk in encode(status, headers, body, close=not keep, head=head):
            self.transport.write(chunk)
        if self.server.after is not None:
            self.server.after()
        if not keep:
            self._close_after_answer()
            return False
        if self.paused:
            self._resume()
        return True

    def _close_after_answer(self) -> None:
        """Close; after a refusal, linger: half-close, then read and drop what the client
        still sends for a while, so that it reads the answer instead of a reset."""
        if not self.closing or not self.transport.can_write_eof():
            self._close()
            return
        self.transport.write_eof()
        self.lingering, self.since = True, self.loop.time()
        self.transport.resume_reading()

    def _release(self, size: int) -> None:
        size = min(size, self.held)
        self.held -= size
        self.crowd.give(size)

    def _resume(self) -> None:
        """Read again once the requests waiting have come down to half the limits."""
        if len(self.waiting) < MAX_PIPELINED // 2 and self.buffered <= self.server.max_body // 2:
            self.paused = False
            self.transport.resume_reading()
            self.started = self.loop.time()  # a request cut short by the pause starts over

    async def _decode(self, request: Request) -> Response | None:
        """Replace a compressed body by the bytes it stands for; None, or the error answer
        (400 corrupt, 413 past the limit once inflated). Past the first INLINE_BYTES of
        output, inflating goes on in a thread."""
        coding, request.coding = request.coding, None
        if not request.body:
            return None
        inflater = Inflater(coding, request.body, self.server.max_body)
        try:
            body = inflater.step(INLINE_BYTES)
            if body is None:
                body = await self.loop.run_in_executor(None, inflater.finish)
        except MserveError as exc:
            return from_exception(exc)
        request.body = body
        return None

    async def _compress(self, accept: str, headers: list[tuple[bytes, bytes]], body: bytes):
        """(headers, body) of an answer in the coding ``accept`` asks for, if any."""
        coding = response_coding(accept)
        if coding is None or any(name == b"content-encoding" for name, _ in headers):
            return headers, body
        if len(body) <= INLINE_BYTES:
            body = compress(coding, body)
        else:
            body = await self.loop.run_in_executor(None, compress, coding, body)
        return [*headers, (b"content-encoding", coding.encode()),
                (b"vary", b"accept-encoding")], body

    # ---- refusing and closing ----------------------------------------------------------
    def _refuse(self, response: Response) -> None:
        """In a parser callback: answer the request being read with ``response`` and stop."""
        self._reject(response)
        raise Refused

    def _fail(self, status: int, message: str) -> None:
        """A request that cannot be parsed: answer it (after those before it) and close."""
        self._reject(error(status, message))

    def _reject(self, response: Response) -> None:
        """Answer with ``response`` after the requests before it, drop the body being read,
        read no more; the connection then closes."""
        self.closing = True
        self._release(len(self.body))
        self.body = b""
        self.transport.pause_reading()
        self.waiting.append((response, False))
        self._start_answering()

    def close_when_idle(self) -> None:
        """At a drain: close once no request is on its way. One being read or answered
        closes after its answer (``Connection: close``); one idle for less than
        ``DRAIN_QUIET_S`` is given that long, since a client sending back to back may have
        its next request on the wire (it is answered, then closed)."""
        if self.busy or self.waiting or self.phase != IDLE or self.transport.is_closing():
            return
        idle_for = self.loop.time() - self.since
        if idle_for >= DRAIN_QUIET_S:
            self._close()
        else:
            self.loop.call_later(DRAIN_QUIET_S - idle_for, self.close_when_idle)
