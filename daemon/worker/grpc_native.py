"""gRPC over the worker's own HTTP/2 (h2.py): the calls, their messages and their status.

It runs the same grpcio method handlers as grpcio's server would (grpc_server.Servicer's and
grpc_health.Health's ``GenericRpcHandler``s), each call as a task on the worker's event loop,
with a context that offers what those handlers use of grpcio's: ``read``, ``abort``,
``set_trailing_metadata``, ``invocation_metadata`` and ``peer``. So both front ends share one
implementation of every RPC, and grpc_serve.py picks the front end (this one unless
``MSERVE_GRPC_FRONTEND=grpcio``).

Per call: a request is framed as gRPC's length-prefixed messages in DATA frames; a message
past the deployment's size limit is refused (RESOURCE_EXHAUSTED) from its length prefix,
before it is buffered, and so is an inference message the byte budget cannot take (the
handler then counts and accounts what it holds, grpc_limits.py). ``gzip`` and ``deflate``
messages are taken (``grpc-encoding``), with the size limit applied to the inflated size;
answers are sent uncompressed. ``grpc-timeout`` ends a call with DEADLINE_EXCEEDED, a client's
RST_STREAM cancels its task (recorded as 499, as with grpcio). A unary answer (headers,
message, trailers) leaves in one write.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import ssl
import struct
import zlib
from collections import deque
from typing import NamedTuple
from urllib.parse import quote

import grpc
from grpc import aio

from mserve.daemon.worker import h2, h2headers

log = logging.getLogger("mserve.worker")
INFERENCE = "/inference.GRPCInferenceService/"
HIDDEN = frozenset({b"te", b"content-type", b"grpc-timeout", b"grpc-encoding",
                    b"grpc-accept-encoding"})
UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
TIMEOUT = re.compile(r"(\d{1,8})([HMSmun])")
RESPONSE = h2headers.headers_block(200, [(b"content-type", b"application/grpc"),
                                         (b"grpc-accept-encoding", b"identity,deflate,gzip")])
_LENGTH = struct.Struct(">I")


class Metadatum(NamedTuple):
    key: str
    value: str | bytes


class Call:
    """One RPC: the h2 stream's peer, the handler's context, and its task."""

    def __init__(self, front: NativeServer, conn: h2.Connection, stream: h2.Stream,
                 handler, headers: dict[bytes, bytes], metadata: tuple):
        self.front, self.conn, self.stream = front, conn, stream
        self.handler, self.headers, self.metadata = handler, headers, metadata
        self.buffer = bytearray()
        self.prefix_checked = False
        self.messages: deque = deque()
        self.ended = False
        self.waiter: asyncio.Future | None = None
        self.sent_headers = False
        self.trailing: tuple = ()
        self.code, self.details = grpc.StatusCode.OK, ""
        self.expired, self.over = False, False
        self.timer = None
        self.inference = front.path_of(headers).startswith(INFERENCE)
        # counted until its task ends: the calls read in one go see each other (a batch)
        front.limits.accepted += 1
        loop = front.loop
        self.task = loop.create_task(self.run())
        self.task.add_done_callback(self._done)
        if (timeout := _timeout(headers.get(b"grpc-timeout"))) is not None:
            self.timer = loop.call_later(timeout, self._expire)

    # ---- from the connection ----------------------------------------------------------
    def on_data(self, data: bytes, end: bool) -> None:
        if self.over:
            return
        buf = self.buffer
        buf += data
        while len(buf) >= 5:
            size = _LENGTH.unpack_from(buf, 1)[0]
            if not self.prefix_checked:  # once per message, from its length prefix
                if problem := self.front.refuse(size, self.inference):
                    self._fail(grpc.StatusCode.RESOURCE_EXHAUSTED, problem)
                    return
                self.prefix_checked = True
            if len(buf) < 5 + size:
                break
            flag, message = buf[0], bytes(buf[5:5 + size])
            del buf[:5 + size]
            self.prefix_checked = False
            if flag & 1:
                try:
                    message = self._inflate(message)
                except ValueError as exc:
                    self._fail(grpc.StatusCode.RESOURCE_EXHAUSTED if "larger" in str(exc)
                               else grpc.StatusCode.INTERNAL, str(exc))
                    return
            self.messages.append(message)
        if end:
            self.ended = True
            if buf:
                self._fail(grpc.StatusCode.INTERNAL, "the stream ended inside a message")
                return
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _done(self, task) -> None:
        self.front.limits.accepted -= 1

    def on_reset(self) -> None:
        self.over = True
        if not self.task.done():
            self.task.cancel()

    def _expire(self) -> None:
        self.expired = True
        if not self.task.done():
            self.task.cancel()

    def _fail(self, code: grpc.StatusCode, details: str) -> None:
        """End the call now from the transport's side (its handler is cancelled)."""
        self.code, self.details = code, details
        self.over = True
        self.task.cancel()
        self._finish()

    def _inflate(self, message: bytes) -> bytes:
        encoding = self.headers.get(b"grpc-encoding", b"identity")
        if encoding not in (b"gzip", b"deflate"):
            raise ValueError(f"a compressed message with grpc-encoding {encoding.decode()!r}")
        limit = self.front.max_message()
        inflater = zlib.decompressobj(31 if encoding == b"gzip" else 15)
        try:
            out = inflater.decompress(message, limit + 1)
        except zlib.error as exc:
            raise ValueError(f"a message that does not inflate: {exc}") from None
        if len(out) > limit:
            raise ValueError(f"received message larger than max (more than {limit} bytes "
                             "inflated); see --max-body-mb")
        return out

    # ---- the context the handlers see -------------------------------------------------
    async def read(self):
        while not self.messages:
            if self.ended:
                return aio.EOF
            self.waiter = self.front.loop.create_future()
            await self.waiter
        return self.messages.popleft()

    async def _requests(self):
        while (message := await self.read()) is not aio.EOF:
            yield message

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()):
        self.code, self.details = code, details
        if trailing_metadata:
            self.trailing = tuple(trailing_metadata)
        raise aio.AbortError()

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing = tuple(metadata)

    def invocation_metadata(self) -> tuple:
        return self.metadata

    def peer(self) -> str:
        address = self.conn.peername
        if not address:
            return ""
        host, port = address[0], address[1]
        return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"

    # ---- running ----------------------------------------------------------------------
    async def run(self) -> None:
        handler = self.handler
        serialize = handler.response_serializer
        try:
            if handler.request_streaming:
                requests = self._requests()
                if handler.response_streaming:
                    async for answer in handler.stream_stream(requests, self):
                        self._message(answer, serialize)
                else:
                    self._message(await handler.stream_unary(requests, self), serialize)
            else:
                raw = await self.read()
                if raw is aio.EOF:
                    raise _Status(grpc.StatusCode.INTERNAL, "the call carried no request message")
                request = handler.request_deserializer(raw) if handler.request_deserializer \
                    else raw
                if handler.response_streaming:
                    async for answer in handler.unary_stream(request, self):
                        self._message(answer, serialize)
                else:
                    self._message(await handler.unary_unary(request, self), serialize)
        except aio.AbortError:
            pass
        except _Status as status:
            self.code, self.details = status.code, status.details
        except asyncio.CancelledError:
            if not self.expired:
                return  # the client is gone (or _fail answered already)
            self.code, self.details = grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"
        except Exception as exc:
            log.exception("unexpected error in a gRPC call")
            self.code, self.details = grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc)}"
        self._finish()

    def _message(self, answer, serialize) -> None:
        if self.over:
            return
        data = serialize(answer) if serialize is not None else answer
        parts = [] if self.sent_headers else [(h2.HEADERS, RESPONSE, False)]
        self.sent_headers = True
        prefix = b"\x00" + _LENGTH.pack(len(data))
        if len(data) < 65536:
            parts.append((h2.DATA, prefix + bytes(data), False))
        else:  # no copy of a large answer
            parts += [(h2.DATA, prefix, False), (h2.DATA, data, False)]
        self.conn.send(self.stream, parts)

    def _finish(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.stream.closed:
            return
        self.over = True
        fields = [(b"grpc-status", str(self.code.value[0]).encode())]
        if self.details:
            fields.append((b"grpc-message", _percent(self.details)))
        for key, value in self.trailing:
            value = base64.b64encode(value).rstrip(b"=") if isinstance(value, bytes) \
                else value.encode()
            fields.append((key.lower().encode(), value))
        if self.sent_headers:
            block = b"".join(h2headers.literal(k, v) for k, v in fields)
        else:  # trailers-only
            block = h2headers.headers_block(200, [(b"content-type", b"application/grpc"),
                                                  *fields])
        self.conn.send(self.stream, [(h2.HEADERS, block, True)])


class _Status(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class _Details(NamedTuple):
    method: str
    invocation_metadata: tuple


class NativeServer:
    """The listening sockets and connections of one worker's native gRPC front end."""

    def __init__(self, handlers, limits, max_streams: int = 4096):
        self.handlers, self.limits, self.max_streams = handlers, limits, max_streams
        self.methods: dict[bytes, object] = {}
        self.connections: set[h2.Connection] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.loop: asyncio.AbstractEventLoop | None = None  # set by start (looked up once)

    def max_message(self) -> int:
        return self.limits.max_message

    def refuse(self, size: int, inference: bool) -> str | None:
        """Why a message of ``size`` bytes is refused before it is read (None: taken)."""
        limits = self.limits
        if size > limits.max_message:
            return (f"received message larger than max ({size} vs. {limits.max_message}); "
                    "see --max-body-mb")
        if inference and limits.held and limits.held + size > limits.budget:
            limits.refused("bytes", inference)
            return limits._full()
        return None

    @staticmethod
    def path_of(headers: dict[bytes, bytes]) -> str:
        return headers.get(b":path", b"").decode("latin-1")

    def _handler(self, path: bytes):
        if path not in self.methods:
            details = _Details(path.decode("latin-1"), ())
            found = None
            for generic in self.handlers:
                if (found := generic.service(details)) is not None:
                    break
            if len(self.methods) < 1024:
                self.methods[path] = found
            return found
        return self.methods[path]

    def accept(self, conn: h2.Connection, stream: h2.Stream, fields: list, end: bool):
        headers = {}
        metadata = []
        for name, value in fields:
            headers[name] = value
            if name[:1] != b":" and name not in HIDDEN:
                key = name.decode("latin-1")
                metadata.append(Metadatum(key, _b64(value) if key.endswith("-bin")
                                          else value.decode("latin-1")))
        if headers.get(b":method") != b"POST" \
                or not headers.get(b"content-type", b"").startswith(b"application/grpc"):
            status = 405 if headers.get(b":method") != b"POST" else 415
            conn.send(stream, [(h2.HEADERS, h2headers.headers_block(status, []), True)])
            return _Gone()
        handler = self._handler(headers.get(b":path", b""))
        if handler is None:
            block = h2headers.headers_block(200, [(b"content-type", b"application/grpc"),
                                                  (b"grpc-status", b"12"),
                                                  (b"grpc-message", b"Method not found!")])
            conn.send(stream, [(h2.HEADERS, block, True)])
            return _Gone()
        call = Call(self, conn, stream, handler, headers, tuple(metadata))
        if end:
            call.on_data(b"", True)
        return call

    async def start(self, host: str, port: int, tls: dict | None) -> int:
        """Listen on ``host:port`` (0: any free port); the port bound."""
        context = _tls_context(tls) if tls else None
        loop = self.loop = asyncio.get_running_loop()

        def factory():
            conn = h2.Connection(self.accept, self.max_streams, self.connections.discard)
            self.connections.add(conn)
            return conn

        server = await loop.create_server(factory, host or None, port, ssl=context,
                                          backlog=1024, reuse_port=True)  # --workers
        self.servers.append(server)
        return server.sockets[0].getsockname()[1]

    async def stop(self, grace: float) -> None:
        """Stop listening, tell every connection to go away, and close what is left after
        ``grace`` seconds."""
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn.goaway()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.close()
            if conn.transport is not None:
                conn.transport.abort()


class _Gone:
    """The peer of a stream answered at once: what arrives on it is dropped."""

    def on_data(self, data: bytes, end: bool) -> None:
        pass

    def on_reset(self) -> None:
        pass


def _timeout(value: bytes | None) -> float | None:
    if not value:
        return None
    match = TIMEOUT.fullmatch(value.decode("latin-1"))
    return int(match[1]) * UNITS[match[2]] if match else None


def _percent(text: str) -> bytes:
    """grpc-message's encoding: UTF-8, percent-encoded outside printable ASCII and '%'."""
    return quote(text, safe="".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%"),
                 encoding="utf-8").encode("ascii")


def _b64(value: bytes) -> bytes:
    try:
        return base64.b64decode(value + b"=" * (-len(value) % 4))
    except ValueError:
        return value


def _tls_context(tls: dict) -> ssl.SSLContext:
    """A server TLS context offering h2 by ALPN, from the deployment's PEM files."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    context.load_cert_chain(tls["cert"], tls["key"])
    return context
