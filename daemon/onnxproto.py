"""Reading (and minimally editing) ONNX files straight from their protobuf bytes, with no
``onnx`` import and no copy of the weights: the walkers take a buffer (often a memory-mapped
file) and yield where each field lies.

Shared by the worker (which operators a graph uses: worker/graphscan.py) and the daemon
(which external-data files a model names: store.py). Field numbers are onnx.proto's.
"""

from __future__ import annotations

# ModelProto
MODEL_GRAPH, MODEL_FUNCTIONS = 7, 25
# GraphProto
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_SPARSE_INITIALIZER = 1, 5, 15
# FunctionProto
FUNCTION_NODE = 7
# NodeProto
NODE_OP_TYPE, NODE_ATTRIBUTE, NODE_DOMAIN = 4, 5, 7


def varint(buf, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def fields(buf, start: int, end: int):
    """(field number, start, end) of each length-delimited field in buf[start:end]."""
    pos = start
    while pos < end:
        key, pos = varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = varint(buf, pos)
            yield number, pos, pos + size
            pos += size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def text(buf, start: int, end: int) -> str:
    return bytes(buf[start:end]).decode("utf-8", "replace")


def length_delimited(number: int, payload: bytes) -> bytes:
    """One length-delimited field (wire type 2), encoded."""
    return encode_varint(number << 3 | 2) + encode_varint(len(payload)) + payload
