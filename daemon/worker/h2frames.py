"""HTTP/2 frames (RFC 9113, section 6): their types, flags, error codes and settings, and how
one is written. Shared by the connection (h2.py) and its send side (h2send.py)."""

from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x3
FRAME_SIZE_ERROR, REFUSED_STREAM, COMPRESSION_ERROR = 0x6, 0x7, 0x9
ENHANCE_YOUR_CALM = 0xB
S_TABLE, S_PUSH, S_STREAMS, S_WINDOW, S_FRAME, S_HEADER_LIST = 1, 2, 3, 4, 5, 6

U32 = struct.Struct(">I")  # a stream id, a window increment, an error code


class ProtocolError(Exception):
    def __init__(self, code: int, why: str):
        super().__init__(why)
        self.code = code


def frame(kind: int, flags: int, stream: int, payload=b"") -> bytes:
    return (len(payload).to_bytes(3, "big") + bytes((kind, flags))
            + U32.pack(stream) + bytes(payload))


def unpad(payload: bytes) -> bytes:
    if not payload or payload[0] >= len(payload):
        raise ProtocolError(PROTOCOL_ERROR, "padding past the frame")
    return payload[1:len(payload) - payload[0]]
