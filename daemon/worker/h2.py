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
a peer may reset streams (the "rapid reset" attack: ENHANCE_YOUR_CALM), and a graceful end:
GOAWAY in two steps (with a PING between), then a half-close once the last stream is done.
No server push, no priorities (ignored, as RFC 9113 allows), no h2c upgrade (gRPC clients
start with the preface). A protocol error ends the connection with GOAWAY and the error code.

Frames are written by h2frames.py, header blocks coded by h2headers.py (HPACK, with a
cache), and what we send waits for the peer's windows in h2send.py.
"""

from __future__ import annotations

import asyncio
import os
import struct

from mserve.daemon.worker.h2frames import (ACK, COMPRESSION_ERROR, CONTINUATION, DATA,
                                           END_HEADERS, END_STREAM, ENHANCE_YOUR_CALM,
                                           FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, GOAWAY,
                                           HEADERS, NO_ERROR, PADDED, PING, PREFACE,
                                           PRIORITY_FLAG, PROTOCOL_ERROR, PUSH_PROMISE,
                                           REFUSED_STREAM, RST_STREAM, S_FRAME, S_HEADER_LIST,
                                           S_PUSH, S_STREAMS, S_WINDOW, SETTINGS,
                                           U32, WINDOW_UPDATE, ProtocolError, frame,
                                           unpad)
from mserve.daemon.worker.h2headers import MAX_HEADER_BLOCK, BadHeaderBlock, HeaderDecoder
from mserve.daemon.worker.h2send import Outbox, Stream

__all__ = ["Connection", "Stream", "DATA", "HEADERS", "ProtocolError"]

MAX_FRAME = 1 << 20  # the largest frame we take (advertised)
STREAM_WINDOW = 1 << 20  # each stream's receive window (advertised)
CONNECTION_WINDOW = 1 << 24
PREFACE_TIMEOUT_S = 10.0
RESETS_PER_S, RESET_WINDOW_S = 200, 10.0
GOAWAY_PING, GOAWAY_WAIT_S = b"mserve\x00g", 1.0  # the PING between the two GOAWAYs
END_LINGER_S = 2.0  # how long a half-closed connection waits for the client's close


def preface_timeout(environ=os.environ) -> float:
    """Seconds a new connection has to send the client preface (MSERVE_GRPC_PREFACE_TIMEOUT,
    10 by default; a bad value is ignored)."""
    try:
        value = float(environ.get("MSERVE_GRPC_PREFACE_TIMEOUT", PREFACE_TIMEOUT_S))
    except ValueError:
        return PREFACE_TIMEOUT_S
    return value if value > 0 else PREFACE_TIMEOUT_S


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
        self.headers = HeaderDecoder()
        self.out = Outbox(self._finished)
        # send(stream, [(HEADERS or DATA, bytes, end_stream), ...]): queued on the stream,
        # written as the peer's windows allow (h2send.Outbox); bound here, one call less
        self.send = self.out.send
        self.received = 0  # connection-level bytes not yet given back
        self.continuing: tuple[int, int, bytearray] | None = None  # stream, flags, block
        self.going_away = False  # the last GOAWAY was sent (or the client's received)
        self.goaway_due = None  # the first GOAWAY was sent: the timer of the last one
        self.ended = False  # half-closed, waiting for the client to close (_end)
        self.resets, self.resets_since = 0, 0.0
        self.peername = None

    # ---- transport --------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = self.out.transport = transport
        # a peer that never says it speaks HTTP/2 does not keep its connection
        self.preface_due = asyncio.get_running_loop().call_later(
            preface_timeout(), transport.close)
        self.peername = transport.get_extra_info("peername")
        settings = b"".join(struct.pack(">HI", key, value) for key, value in (
            (S_PUSH, 0), (S_STREAMS, self.max_streams), (S_WINDOW, STREAM_WINDOW),
            (S_FRAME, MAX_FRAME), (S_HEADER_LIST, MAX_HEADER_BLOCK)))
        transport.write(frame(SETTINGS, 0, 0, settings)
                        + frame(WINDOW_UPDATE, 0, 0, U32.pack(CONNECTION_WINDOW - 65535)))

    def connection_lost(self, exc) -> None:
        self.preface_due.cancel()
        if self.goaway_due is not None:
            self.goaway_due.cancel()
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
        if self.ended:  # half-closed: nothing more is answered
            return
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
                stream_id = U32.unpack_from(buf, pos + 5)[0] & 0x7FFFFFFF
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
            elif payload == GOAWAY_PING and self.goaway_due is not None:
                self._last_goaway()  # the client has read the first GOAWAY
        elif kind == RST_STREAM:
            self._count_reset()
            if (stream := self.streams.pop(stream_id, None)) is not None:
                stream.closed = True
                if stream.peer is not None:
                    stream.peer.on_reset()
                if self.going_away and not self.streams:
                    self._end()
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
            payload = unpad(payload)
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
            self._end()

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if flags & PADDED:
            payload = unpad(payload)
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
        try:
            headers = self.headers.decode(block)
        except BadHeaderBlock as exc:
            raise ProtocolError(COMPRESSION_ERROR, f"a bad header block: {exc}") from None
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
            self.transport.write(frame(RST_STREAM, 0, stream_id, U32.pack(REFUSED_STREAM)))
            return
        stream = Stream(stream_id, self.out.initial_window)
        stream.ended_remote = end
        self.streams[stream_id] = stream
        stream.peer = self.accept(self, stream, headers, end)

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
                delta, self.out.initial_window = value - self.out.initial_window, value
                for stream in self.streams.values():
                    stream.window += delta
            elif key == S_FRAME:
                if not 16384 <= value <= 16777215:
                    raise ProtocolError(PROTOCOL_ERROR, "a bad SETTINGS_MAX_FRAME_SIZE")
                self.out.max_frame = value
        self.transport.write(frame(SETTINGS, ACK, 0))
        self.out.flush_all(self.streams.values())

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolError(FRAME_SIZE_ERROR, "a malformed WINDOW_UPDATE")
        increment = U32.unpack(payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            self.out.window += increment
            self.out.flush_all(self.streams.values())
        elif (stream := self.streams.get(stream_id)) is not None:
            stream.window += increment
            self.out.flush(stream)

    def _give_back(self) -> None:
        """Open the receive windows again for what was read (the gRPC layer bounds what it
        holds itself: message size, byte budget)."""
        updates = []
        if self.received >= CONNECTION_WINDOW // 4:
            updates.append(frame(WINDOW_UPDATE, 0, 0, U32.pack(self.received)))
            self.received = 0
        for stream in self.streams.values():
            if stream.unacked >= STREAM_WINDOW // 4 and not stream.ended_remote:
                updates.append(frame(WINDOW_UPDATE, 0, stream.id, U32.pack(stream.unacked)))
                stream.unacked = 0
        if updates:
            self.transport.write(b"".join(updates))

    def _finished(self, stream: Stream) -> None:
        """Our side ended the stream. A client still sending may finish (what it sends is
        dropped, its window given back): grpc-core reads a RST_STREAM sent now, even with
        NO_ERROR, as the call's failure, not the status it was just sent."""
        stream.closed = True
        if stream.ended_remote:
            self.streams.pop(stream.id, None)
        if self.going_away and not self.streams:
            self._end()

    def _reset_local(self, stream: Stream) -> None:
        stream.closed = True
        if stream.peer is not None:
            stream.peer.on_reset()

    def goaway(self) -> None:
        """Take no new stream; close once the open ones end. In two steps (RFC 9113 6.8): a
        GOAWAY naming the largest stream id and a PING, then, once the PING's answer says
        the client has read it (or after GOAWAY_WAIT_S), a GOAWAY naming the last stream it
        opened. A call the client sent meanwhile is served, not refused, and none is lost
        to a close the client had not yet read of (it opens new calls elsewhere)."""
        if self.transport is None or self.transport.is_closing() or self.going_away \
                or self.goaway_due is not None:
            return
        self.transport.write(frame(GOAWAY, 0, 0, U32.pack(0x7FFFFFFF)
                                   + U32.pack(NO_ERROR)) + frame(PING, 0, 0, GOAWAY_PING))
        self.goaway_due = asyncio.get_running_loop().call_later(GOAWAY_WAIT_S, self._last_goaway)

    def _last_goaway(self) -> None:
        if self.goaway_due is not None:
            self.goaway_due.cancel()
        if self.transport is None or self.transport.is_closing() or self.going_away:
            return
        self.going_away = True
        self.transport.write(frame(GOAWAY, 0, 0, U32.pack(self.last_stream)
                                   + U32.pack(NO_ERROR)))
        if not self.streams:
            self._end()

    def _end(self) -> None:
        """Going away with no stream left: end the connection, half-closed first (our FIN
        follows all we wrote) and what the client still sends dropped until it closes, or
        for END_LINGER_S: closing with its bytes unread would make the kernel reset the
        connection, and a reset can destroy answers the client has not read yet."""
        transport = self.transport
        if transport.is_closing() or self.ended:
            return
        if not transport.can_write_eof():  # TLS
            transport.close()
            return
        self.ended = True
        transport.write_eof()
        asyncio.get_running_loop().call_later(END_LINGER_S, transport.close)

    def close(self, code: int = NO_ERROR) -> None:
        if self.transport is not None and self.ended:
            self.transport.close()
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(GOAWAY, 0, 0, U32.pack(self.last_stream)
                                       + U32.pack(code)))
            self.transport.close()


