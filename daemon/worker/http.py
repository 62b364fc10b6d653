"""The worker's HTTP/1.1 server: an asyncio protocol over httptools, with no ASGI layer.

Each connection parses with httptools, buffers a request's body (refusing it with 413 as soon
as it is known to exceed the limit), hands the whole ``Request`` to the app and writes the
answer with one ``transport.write``. Requests on one connection are answered in order
(pipelining works; reading pauses while too many requests, or too many body bytes, wait). Keep-alive follows HTTP/1.1 rules,
idle connections close after ``keepalive_s``, ``Expect: 100-continue`` is honoured, and a
request that does not parse gets 400 and the connection closes. HEAD is answered with the
head the app's answer would have (Content-Length included) and no body.

Bodies may come compressed (``Content-Encoding: gzip|deflate``, see ``encoding``): the limit
then applies to the decompressed size, an unknown coding gets 415 and a corrupt stream 400.
A small body is decoded on the event loop, the rest of a large one in a thread; a body with
no Content-Encoding costs nothing more. Answers of 200 are compressed when the request's
``Accept-Encoding`` asks for gzip or deflate and they are at least ``MIN_COMPRESS`` bytes.

``drain`` stops listening, closes idle connections at once and gives those with a request in
progress up to the drain time to answer it before they are cut.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import unquote

import httptools

from mserve.daemon.errors import MserveError
from mserve.daemon.worker.codecs import encode_error
from mserve.daemon.worker.encoding import (INLINE_BYTES, MIN_COMPRESS, Inflater,
                                           UnsupportedEncoding, compress, request_coding,
                                           response_coding)

log = logging.getLogger("mserve.worker")
MAX_HEADER_BYTES = 64 * 1024
MAX_PIPELINED = 32  # requests read ahead on one connection before reading pauses
REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found",
           405: b"Method Not Allowed", 413: b"Content Too Large", 415: b"Unsupported Media Type",
           500: b"Internal Server Error", 503: b"Service Unavailable"}
JSON_TYPE = b"application/json"


@dataclass(slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes
    client: str | None
    coding: str | None = None  # the body's Content-Encoding until it is decoded


# Only inference answers are compressed, as Triton does: tritonclient.http.aio turns
# aiohttp's decompression off and reads every other answer as plain JSON.
INFERENCE_PATHS = ("/infer", ":predict")

# (status, extra header lines as (name, value) bytes pairs, body)
Response = tuple[int, list[tuple[bytes, bytes]], bytes]
Handler = Callable[[Request], Awaitable[Response]]


def encode(status: int, headers: list[tuple[bytes, bytes]], body: bytes,
           close: bool = False, head: bool = False) -> list[bytes]:
    """The answer as the byte strings to write (head and body together when small).
    ``head``: the answer to HEAD, its Content-Length that of ``body``, which is not sent."""
    lines = [b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\n"
             % (status, REASONS.get(status, b"Unknown"), len(body))]
    lines += [b"%s: %s\r\n" % pair for pair in headers]
    if close:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    if head:
        return [b"".join(lines)]
    if len(body) <= 65536:
        lines.append(body)
        return [b"".join(lines)]
    return [b"".join(lines), body]


class HttpServer:
    """Serves ``handler`` on a listening socket; ``drain`` to stop."""

    def __init__(self, handler: Handler, *, max_body: int, keepalive_s: float = 5.0,
                 ssl=None, after: Callable[[], None] | None = None):
        self.handler, self.max_body, self.keepalive_s, self.ssl = (handler, max_body,
                                                                   keepalive_s, ssl)
        self.after = after  # called once an answer is written (deferred accounting)
        self.connections: set[Connection] = set()
        self.pending = 0  # requests read and not answered yet, over all connections
        self.server: asyncio.AbstractServer | None = None
        self.draining = False

    async def start(self, sock) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: Connection(self), sock=sock,
                                               ssl=self.ssl, backlog=2048)

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


class Connection(asyncio.Protocol):
    """One client connection: parse, queue, answer in order."""

    def __init__(self, server: HttpServer):
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: str | None = None
        self.waiting: deque[tuple[Request | Response, bool]] = deque()
        self.buffered = 0  # body bytes of the requests in ``waiting``
        self.busy = self.closing = self.paused = False
        self.idle_timer: asyncio.TimerHandle | None = None
        self.last_seen = self.loop.time()
        self._reset()

    def _reset(self) -> None:
        self.url, self.headers, self.chunks = b"", {}, []
        self.size = self.header_bytes = 0
        self.refused: Response | None = None
        self.coding: str | None = None

    # ---- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.client = f"{peer[0]}:{peer[1]}"
        self.server.connections.add(self)
        self.idle_timer = self.loop.call_later(self.server.keepalive_s, self._idle)

    def connection_lost(self, exc) -> None:
        self.closing = True
        self.server.connections.discard(self)
        self.server.pending -= sum(isinstance(item, Request) for item, _ in self.waiting)
        self.waiting.clear()
        if self.idle_timer is not None:
            self.idle_timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_seen = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError:
            if self.header_bytes > MAX_HEADER_BYTES:
                self._fail(400, f"request line and headers exceed {MAX_HEADER_BYTES // 1024} KiB")
            else:
                self._fail(400, "malformed HTTP request")

    # ---- httptools callbacks -----------------------------------------------------------
    def on_message_begin(self) -> None:
        self._reset()

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
        declared = self.headers.get("content-length")
        expects = self.headers.get("expect", "").lower() == "100-continue"
        coding = self.headers.get("content-encoding")
        if coding is not None:
            try:
                self.coding = request_coding(coding)
            except UnsupportedEncoding as exc:
                self._refuse_body(exc)
        if self.refused is None and declared is not None and declared.isdigit() \
                and int(declared) > self.server.max_body:
            self._refuse_body()
        if self.refused is not None:
            if expects:  # the client waits before sending the body: refuse it now
                self.closing = True
                self._answer_then_close(self.refused)
        elif expects:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self.refused is not None:
            return
        self.size += len(body)
        if self.size > self.server.max_body:
            self._refuse_body()
        else:
            self.chunks.append(body)

    def _refuse_body(self, exc: MserveError | None = None) -> None:
        """Answer this request with ``exc`` (default: 413) and drop its body."""
        if exc is None:
            message = f"request body exceeds the limit of {self.server.max_body / 2**20:g} MiB"
            self.refused = (413, [(b"content-type", JSON_TYPE)], encode_error(message))
        else:
            self.refused = _error(exc)
        self.chunks = []

    def on_message_complete(self) -> None:
        keep = self.parser.should_keep_alive()
        if self.refused is not None:
            # The rest of an oversized body would still arrive: answer, then close.
            self.waiting.append((self.refused, False))
        else:
            chunks = self.chunks
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            url = self.url
            path = url.split(b"?", 1)[0].decode("latin-1")
            if "%" in path:
                path = unquote(path, encoding="latin-1")
            request = Request(self.parser.get_method().decode("latin-1"), path,
                              self.headers, body, self.client, self.coding)
            self.waiting.append((request, keep))
            self.buffered += len(body)
            self.server.pending += 1
        self._reset()
        if not self.paused and (len(self.waiting) >= MAX_PIPELINED
                                or self.buffered > self.server.max_body):
            self.paused = True  # a client far ahead of its answers waits in TCP, not here
            self.transport.pause_reading()
        if not self.busy:
            self.busy = True
            self.loop.create_task(self._answer_all())

    # ---- answering ---------------------------------------------------------------------
    async def _answer_all(self) -> None:
        try:
            while self.waiting and not self.transport.is_closing():
                item, keep = self.waiting.popleft()
                if isinstance(item, Request):
                    head = item.method == "HEAD"
                    self.buffered -= len(item.body)
                    try:
                        refused = None if item.coding is None else await self._decode(item)
                        status, headers, body = refused or await self.server.handler(item)
                        if (accept := item.headers.get("accept-encoding")) is not None \
                                and status == 200 and len(body) >= MIN_COMPRESS \
                                and item.path.endswith(INFERENCE_PATHS):
                            headers, body = await self._compress(accept, headers, body)
                    finally:
                        self.server.pending -= 1
                else:
                    (status, headers, body), keep, head = item, False, False
                keep = keep and not self.server.draining
                if self.transport.is_closing():
                    return
                for chunk in encode(status, headers, body, close=not keep, head=head):
                    self.transport.write(chunk)
                if self.server.after is not None:
                    self.server.after()
                if not keep:
                    self.transport.close()
                    return
                if self.paused:
                    self._resume()
        finally:
            if self.server.after is not None:  # answers that were never written count too
                self.server.after()
            self.busy = False
            self.last_seen = self.loop.time()
            if self.server.draining and not self.transport.is_closing():
                self.transport.close()

    def _resume(self) -> None:
        """Read again once the requests waiting have come down to half the limits."""
        if len(self.waiting) < MAX_PIPELINED // 2 and self.buffered <= self.server.max_body // 2:
            self.paused = False
            self.transport.resume_reading()

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
            return _error(exc)
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

    def _fail(self, status: int, message: str) -> None:
        """A request that cannot be parsed: answer it (after those before it) and close."""
        self.closing = True
        self._answer_then_close((status, [(b"content-type", JSON_TYPE)], encode_error(message)))

    def _answer_then_close(self, response: Response) -> None:
        """Queue ``response`` after the requests before it; the connection then closes."""
        self.transport.pause_reading()
        self.waiting.append((response, False))
        if not self.busy:
            self.busy = True
            self.loop.create_task(self._answer_all())

    def close_when_idle(self) -> None:
        if not self.busy and not self.waiting:
            self.transport.close()

    def _idle(self) -> None:
        """Close a connection that sent nothing for ``keepalive_s`` while nothing of its was
        in progress (an idle keep-alive, or a request that stopped arriving); else look
        again later. One timer per connection, not one per request."""
        quiet = self.loop.time() - self.last_seen
        if self.transport.is_closing():
            return
        if self.busy or self.waiting or quiet < self.server.keepalive_s:
            wait = max(self.server.keepalive_s - quiet, 0.1)
            self.idle_timer = self.loop.call_later(wait, self._idle)
        else:
            self.transport.close()


def _error(exc: MserveError) -> Response:
    return exc.status, [(b"content-type", JSON_TYPE)], encode_error(exc.message)
