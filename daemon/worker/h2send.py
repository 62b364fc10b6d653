"""The send side of an HTTP/2 connection (h2.py): each stream's state, and our HEADERS and DATA
frames queued per stream and written as the peer's flow control windows allow (a DATA part is
split at its frame size and waits for its WINDOW_UPDATEs)."""

from __future__ import annotations

from collections import deque

from mserve.daemon.worker.h2frames import DATA, END_HEADERS, END_STREAM, HEADERS, frame


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


class Outbox:
    """What one connection sends, under the peer's windows: the connection's (``window``),
    each stream's (``Stream.window``) and its largest frame. ``finished(stream)`` is called when
    our side has sent a stream's end."""

    __slots__ = ("transport", "window", "initial_window", "max_frame", "finished")

    def __init__(self, finished):
        self.transport = None
        self.window = 65535  # the connection's, for our DATA
        self.initial_window = 65535  # each new stream's, the peer's SETTINGS
        self.max_frame = 16384
        self.finished = finished

    def send(self, stream: Stream, parts: list[tuple[int, bytes, bool]]) -> None:
        """Queue (HEADERS or DATA, bytes, end_stream) parts on ``stream`` and send what the
        windows allow now; the rest follows the peer's WINDOW_UPDATEs. A HEADERS part is an
        encoded block (headers_block)."""
        if stream.closed:
            return
        stream.pending.extend(parts)
        self.flush(stream)

    def flush(self, stream: Stream) -> None:
        out = []
        pending = stream.pending
        while pending:
            kind, data, end = pending[0]
            if kind == HEADERS:
                out.append(frame(HEADERS, END_HEADERS | (END_STREAM if end else 0),
                                 stream.id, data))
                pending.popleft()
            else:
                room = min(self.window, stream.window)
                if data and room <= 0:
                    break
                size = min(len(data), room, self.max_frame)
                last = size == len(data)
                out.append(frame(DATA, END_STREAM if end and last else 0, stream.id,
                                 data[:size] if not last else data))
                self.window -= size
                stream.window -= size
                if last:
                    pending.popleft()
                else:
                    pending[0] = (kind, memoryview(data)[size:], end)
            if end and not pending:
                self.finished(stream)
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def flush_all(self, streams) -> None:
        for stream in list(streams):
            if stream.pending:
                self.flush(stream)
