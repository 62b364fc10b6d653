"""HTTP/2 (RFC 9113) as gRPC uses it, for the worker's own gRPC front end (grpc_native.py).

One ``Connection`` per TCP (or TLS) connection, an asyncio protocol on the worker's event loop
beside the HTTP server: it reads frames, keeps the streams' states and both directions' flow
control windows, and hands a stream's headers, data and end to its ``Peer`` (the gRPC layer).
Nothing leaves the loop and no thread is woken per call: that is what makes it cheaper than
grpcio's asyncio server, whose every call crosses from its poller thread to the loop several
times (docs/benchmarks.md has the figures).

What is implemented is what a gRPC server needs: the preface and SETTINGS exchange, PING
answers, HEADERS with CONTINUATION, padding and priority fields, DATA with flow control both
ways (sends wait for the peer's WINDOW_UPDATE and are split at its frame size; received
bytes are given back as they are consumed), RST_STREAM both ways, GOAWAY both ways, a cap on
concurrent streams (REFUSED_STREAM past it), back-pressure (reading pauses while the
transport's write buffer is full), a deadline for the client preface, and a bound on how fast
a peer may reset streams (the "rapid reset" attack: ENHANCE_YOUR_CALM). No server push, no priorities (ignored, as RFC 9113
allows), no h2c upgrade (gRPC clients start with the preface). A protocol error ends the
connection with GOAWAY and the error code.

Header blocks are decoded with the ``hpack`` package behind a cache keyed by the block's
bytes: gRPC clients send the same request headers on every call, as references into the
table once they were seen, so the cache answers nearly every call. An entry is used only while
the decoder's dynamic table is the one it was decoded with. Answers are encoded without the
dynamic table (static references and plain literals), so the encoder keeps no state.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections import deque

from hpack import Decoder
from hpack.exceptions import HPACKError
from hpack.table import HeaderTable

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x3
FRAME_SIZE_ERROR, REFUSED_STREAM, COMPRESSION_ERROR = 0x6, 0x7, 0x9
ENHANCE_YOUR_CALM = 0xB
S_TABLE, S_PUSH, S_STREAMS, S_WINDOW, S_FRAME, S_HEADER_LIST = 1, 2, 3, 4, 5, 6

MAX_FRAME = 1 << 20  # the largest frame we take (advertised)
STREAM_WINDOW = 1 << 20  # each stream's receive window (advertised)
CONNECTION_WINDOW = 1 << 24
MAX_HEADER_BLOCK = 64 * 1024
CACHE_ENTRIES = 256
PREFACE_TIMEOUT_S = 10.0
RESETS_PER_S, RESET_WINDOW_S = 200, 10.0
_HEADER = struct.Struct(">I")


def preface_timeout(environ=os.environ) -> float:
    """Seconds a new connection has to send the client preface (MSERVE_GRPC_PREFACE_TIMEOUT,
    10 by default; a bad value is ignored)."""
    try:
        value = float(environ.get("MSERVE_GRPC_PREFACE_TIMEOUT", PREFACE_TIMEOUT_S))
    except ValueError:
        return PREFACE_TIMEOUT_S
    return value if value > 0 else PREFACE_TIMEOUT_S


class ProtocolError(Exception):
    def __init__(self, code: int, why: str):
        super().__init__(why)
        self.code = code


def frame(kind: int, flags: int, stream: int, payload=b"") -> bytes:
    return (len(payload).to_bytes(3, "big") + bytes((kind, flags))
            + _HEADER.pack(stream) + bytes(payload))


class CountedTable(HeaderTable):
    """hpack's dynamic table, counting its changes (entries added, size changed), so that a
    cached header block is used only with the table it was decoded with."""

    def __init__(self):
        self.version = 0
        super().__init__()

    def add(self, name: bytes, value: bytes) -> None:
        self.version += 1
        super().add(name, value)

    def _set_maxsize(self, value: int) -> None:
        self.version += 1
        HeaderTable.maxsize.fset(self, value)

    maxsize = property(HeaderTable.maxsize.fget, _set_maxsize)


class Stream:
    """One stream's state: its peer object, send window and what waits for it."""

    __slots__ = ("id", "peer", "window", "pending", "ended_remote", "closed", "unacked")

    def __init__(self, stream_id: int, window: int):
        self.id = stream_id
        self.peer = None  # set by the gRPC layer: on_data(bytes, end), on_reset()
        self.window = window  # what we may still send
        self.pending: deque = deque()  # (kind, bytes, end_stream) waiting for window
        self.ended_remote = False
        self.closed = False
        self.unacked = 0  # bytes received and not yet given back to the peer's window


class Connection(asyncio.Protocol):
    """The server side of one HTTP/2 connection. ``accept(conn, stream, headers, end)`` is
    called for each new stream; it returns the stream's peer or raises to refuse it."""

    def __init__(self, accept, max_streams: int, on_close=None):
        self.accept, self.max_streams, self.on_close = accept, max_streams, on_close
        self.transport = None
        self.buffer = bytearray()
        self.preface = False
        self.streams: dict[int, Stream] = {}
        self.last_stream = 0
        self.decoder = Decoder()
        self.decoder.header_table = self.table = CountedTable()
        self.decoder.max_header_list_size = MAX_HEADER_BLOCK
        self.cache: dict[bytes, tuple[int, list]] = {}
        self.send_window = 65535  # the connection's, for our DATA
        self.initial_window = 65535  # each new stream's, the peer's SETTINGS
        self.max_send_frame = 16384
        self.received = 0  # connection-level bytes not yet given back
        self.continuing: tuple[int, int, bytearray] | None = None  # stream, flags, block
        self.going_away = False
        self.resets, self.resets_since = 0, 0.0
        self.peername = None

    # ---- transport --------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        # a peer that never says it speaks HTTP/2 does not keep its connection
        self.preface_due = asyncio.get_running_loop().call_later(
            preface_timeout(), transport.close)
        self.peername = transport.get_extra_info("peername")
        settings = b"".join(struct.pack(">HI", key, value) for key, value in (
            (S_PUSH, 0), (S_STREAMS, self.max_streams), (S_WINDOW, STREAM_WINDOW),
            (S_FRAME, MAX_FRAME), (S_HEADER_LIST, MAX_HEADER_BLOCK)))
        transport.write(frame(SETTINGS, 0, 0, settings)
                        + frame(WINDOW_UPDATE, 0, 0, _HEADER.pack(CONNECTION_WINDOW - 65535)))

    def connection_lost(self, exc) -> None:
        self.preface_due.cancel()
        for stream in list(self.streams.values()):
            self._reset_local(stream)
        self.streams.clear()
        if self.on_close is not None:
            self.on_close(self)

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()

    # ---- reading ----------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        try:
            if not self.preface:
                if len(buf) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buf)):
                        raise ProtocolError(PROTOCOL_ERROR, "not an HTTP/2 client preface")
                    return
                if bytes(buf[:len(PREFACE)]) != PREFACE:
                    raise ProtocolError(PROTOCOL_ERROR, "not an HTTP/2 client preface")
                del buf[:len(PREFACE)]
                self.preface = True
                self.preface_due.cancel()
            pos, end = 0, len(buf)
            while end - pos >= 9:
                length = int.from_bytes(buf[pos:pos + 3], "big")
                if length > MAX_FRAME:
                    raise ProtocolError(FRAME_SIZE_ERROR, f"a frame of {length} bytes")
                if end - pos - 9 < length:
                    break
                kind, flags = buf[pos + 3], buf[pos + 4]
                stream_id = _HEADER.unpack_from(buf, pos + 5)[0] & 0x7FFFFFFF
                payload = bytes(buf[pos + 9:pos + 9 + length])
                pos += 9 + length
                self._frame(kind, flags, stream_id, payload)
                if self.transport is None or self.transport.is_closing():
                    return
            del buf[:pos]
            self._give_back()
        except ProtocolError as exc:
            self.close(exc.code)

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.continuing is not None and kind != CONTINUATION:
            raise ProtocolError(PROTOCOL_ERROR, "a header block was interrupted")
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind == HEADERS:
            self._headers(flags, stream_id, payload)
        elif kind == CONTINUATION:
            self._continuation(flags, stream_id, payload)
        elif kind == SETTINGS:
            self._settings(flags, stream_id, payload)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == PING:
            if len(payload) != 8 or stream_id:
                raise ProtocolError(FRAME_SIZE_ERROR, "a malformed PING")
            if not flags & ACK:
                self.transport.write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            self._count_reset()
            if (stream := self.streams.pop(stream_id, None)) is not None:
                stream.closed = True
                if stream.peer is not None:
                    stream.peer.on_reset()
                if self.going_away and not self.streams:
                    self.transport.close()
        elif kind == GOAWAY:
            self.going_away = True
            if not self.streams:
                self.transport.close()
        elif kind == PUSH_PROMISE:
            raise ProtocolError(PROTOCOL_ERROR, "a client may not push")
        # PRIORITY and unknown frame types are ignored

    def _count_reset(self) -> None:
        """A peer that cancels streams faster than RESETS_PER_S on average (over a window of
        RESET_WINDOW_S) makes the server start calls it never lets finish (the "rapid
        reset" attack): it is sent away."""
        now = asyncio.get_running_loop().time()
        if now - self.resets_since > RESET_WINDOW_S:
            self.resets_since, self.resets = now, 0
        self.resets += 1
        if self.resets > RESETS_PER_S * RESET_WINDOW_S:
            raise ProtocolError(ENHANCE_YOUR_CALM, "too many streams reset")

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        self.received += len(payload)
        if flags & PADDED:
            payload = _unpad(payload)
        stream = self.streams.get(stream_id)
        if stream is None or stream.ended_remote:
            if stream_id > self.last_stream or stream_id == 0:
                raise ProtocolError(PROTOCOL_ERROR, "DATA on a stream that was not opened")
            return  # a stream we reset or finished: its bytes were counted above
        end = bool(flags & END_STREAM)
        if end:
            stream.ended_remote = True
        stream.unacked += len(payload)
        if stream.closed:  # we answered already: drop it, forget the stream at its end
            if end:
                self._forget(stream)
            return
        stream.peer.on_data(payload, end)

    def _forget(self, stream: Stream) -> None:
        self.streams.pop(stream.id, None)
        if self.going_away and not self.streams:
            self.transport.close()

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if flags & PADDED:
            payload = _unpad(payload)
        if flags & PRIORITY_FLAG:
            payload = payload[5:]
        if not stream_id % 2:
            raise ProtocolError(PROTOCOL_ERROR, "a client stream id must be odd")
        if flags & END_HEADERS:
            self._block(stream_id, flags, payload)
        else:
            self.continuing = (stream_id, flags, bytearray(payload))

    def _continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self.continuing is None or self.continuing[0] != stream_id:
            raise ProtocolError(PROTOCOL_ERROR, "an unexpected CONTINUATION")
        block = self.continuing[2]
        block += payload
        if len(block) > MAX_HEADER_BLOCK:
            raise ProtocolError(PROTOCOL_ERROR, "a header block past 64 KiB")
        if flags & END_HEADERS:
            first_flags = self.continuing[1]
            self.continuing = None
            self._block(stream_id, first_flags, bytes(block))

    def _block(self, stream_id: int, flags: int, block: bytes) -> None:
        headers = self._decode(block)
        end = bool(flags & END_STREAM)
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers from the client: only the end matters
            if end and not stream.ended_remote:
                stream.ended_remote = True
                if stream.closed:
                    self._forget(stream)
                else:
                    stream.peer.on_data(b"", True)
            return
        if stream_id <= self.last_stream:
            return  # a stream already closed
        self.last_stream = stream_id
        if self.going_away or len(self.streams) >= self.max_streams:
            self.transport.write(frame(RST_STREAM, 0, stream_id, _HEADER.pack(REFUSED_STREAM)))
            return
        stream = Stream(stream_id, self.initial_window)
        stream.ended_remote = end
        self.streams[stream_id] = stream
        stream.peer = self.accept(self, stream, headers, end)

    def _decode(self, block: bytes) -> list:
        cached = self.cache.get(block)
        if cached is not None and cached[0] == self.table.version:
            return cached[1]
        version = self.table.version
        try:
            headers = self.decoder.decode(block, raw=True)
        except HPACKError as exc:
            raise ProtocolError(COMPRESSION_ERROR, f"a bad header block: {exc}") from None
        if self.table.version == version:  # the block left the table as it was
            if len(self.cache) >= CACHE_ENTRIES:
                self.cache.clear()
            self.cache[block] = (version, headers)
        return headers

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            raise ProtocolError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            return
        if len(payload) % 6:
            raise ProtocolError(FRAME_SIZE_ERROR, "a malformed SETTINGS frame")
        for offset in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, offset)
            if key == S_WINDOW:
                if value > 0x7FFFFFFF:
                    raise ProtocolError(FLOW_CONTROL_ERROR, "a window past 2^31-1")
                delta, self.initial_window = value - self.initial_window, value
                for stream in self.streams.values():
                    stream.window += delta
            elif key == S_FRAME:
                if not 16384 <= value <= 16777215:
                    raise ProtocolError(PROTOCOL_ERROR, "a bad SETTINGS_MAX_FRAME_SIZE")
                self.max_send_frame = value
        self.transport.write(frame(SETTINGS, ACK, 0))
        self._flush_all()

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolError(FRAME_SIZE_ERROR, "a malformed WINDOW_UPDATE")
        increment = _HEADER.unpack(payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            self.send_window += increment
            self._flush_all()
        elif (stream := self.streams.get(stream_id)) is not None:
            stream.window += increment
            self._flush(stream)

    def _give_back(self) -> None:
        """Open the receive windows again for what was read (the gRPC layer bounds what it
        holds itself: message size, byte budget)."""
        updates = []
        if self.received >= CONNECTION_WINDOW // 4:
            updates.append(frame(WINDOW_UPDATE, 0, 0, _HEADER.pack(self.received)))
            self.received = 0
        for stream in self.streams.values():
            if stream.unacked >= STREAM_WINDOW // 4 and not stream.ended_remote:
                updates.append(frame(WINDOW_UPDATE, 0, stream.id, _HEADER.pack(stream.unacked)))
                stream.unacked = 0
        if updates:
            self.transport.write(b"".join(updates))

    # ---- writing ----------------------------------------------------------------------
    def send(self, stream: Stream, parts: list[tuple[int, bytes, bool]]) -> None:
        """Queue (HEADERS or DATA, bytes, end_stream) parts on ``stream`` and send what the
        windows allow now; the rest follows the peer's WINDOW_UPDATEs. A HEADERS part is an
        encoded block (headers_block)."""
        if stream.closed:
            return
        stream.pending.extend(parts)
        self._flush(stream)

    def _flush(self, stream: Stream) -> None:
        out = []
        pending = stream.pending
        while pending:
            kind, data, end = pending[0]
            if kind == HEADERS:
                out.append(frame(HEADERS, END_HEADERS | (END_STREAM if end else 0),
                                 stream.id, data))
                pending.popleft()
            else:
                room = min(self.send_window, stream.window)
                if data and room <= 0:
                    break
                size = min(len(data), room, self.max_send_frame)
                last = size == len(data)
                out.append(frame(DATA, END_STREAM if end and last else 0, stream.id,
                                 data[:size] if not last else data))
                self.send_window -= size
                stream.window -= size
                if last:
                    pending.popleft()
                else:
                    pending[0] = (kind, memoryview(data)[size:], end)
            if end and not pending:
                self._finished(stream)
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def _flush_all(self) -> None:
        for stream in list(self.streams.values()):
            if stream.pending:
                self._flush(stream)

    def _finished(self, stream: Stream) -> None:
        """Our side ended the stream. A client still sending may finish (what it sends is
        dropped, its window given back): grpc-core reads a RST_STREAM sent now, even with
        NO_ERROR, as the call's failure, not the status it was just sent."""
        stream.closed = True
        if stream.ended_remote:
            self.streams.pop(stream.id, None)
        if self.going_away and not self.streams:
            self.transport.close()

    def _reset_local(self, stream: Stream) -> None:
        stream.closed = True
        if stream.peer is not None:
            stream.peer.on_reset()

    def goaway(self) -> None:
        """Take no new stream; close once the open ones end."""
        if self.transport is None or self.transport.is_closing():
            return
        self.going_away = True
        self.transport.write(frame(GOAWAY, 0, 0, _HEADER.pack(self.last_stream)
                                   + _HEADER.pack(NO_ERROR)))
        if not self.streams:
            self.transport.close()

    def close(self, code: int = NO_ERROR) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(GOAWAY, 0, 0, _HEADER.pack(self.last_stream)
                                       + _HEADER.pack(code)))
            self.transport.close()


def _unpad(payload: bytes) -> bytes:
    if not payload or payload[0] >= len(payload):
        raise ProtocolError(PROTOCOL_ERROR, "padding past the frame")
    return payload[1:len(payload) - payload[0]]


# ---------------------------------------------------------------- header blocks


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer with a ``prefix_bits`` prefix, ``first`` holding the high bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out, value = bytearray((first | limit,)), value - limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """A header field as a literal without indexing, with a literal name (no table use)."""
    return b"\x00" + _integer(len(name), 7, 0) + name + _integer(len(value), 7, 0) + value


def headers_block(status: int, fields: list[tuple[bytes, bytes]]) -> bytes:
    """``:status`` (a static table reference for 200) and ``fields`` as literals."""
    head = b"\x88" if status == 200 else b"\x08" + _integer(3, 7, 0) + str(status).encode()
    return head + b"".join(literal(name, value) for name, value in fields)
