"""Reading (and minimally editing) ONNX files straight from their protobuf bytes, with no
``onnx`` import and no copy of the weights: the walkers take a buffer (often a memory-mapped
file) and yield where each field lies.

Shared by the worker (which operators a graph uses: worker/graphscan.py) and the daemon
(which external-data files a model names: store.py). Field numbers are onnx.proto's.
"""

from __future__ import annotations

import mmap
import os

# ModelProto
MODEL_GRAPH, MODEL_FUNCTIONS = 7, 25
# GraphProto
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_SPARSE_INITIALIZER = 1, 5, 15
# FunctionProto
FUNCTION_NODE, FUNCTION_ATTRIBUTE_PROTO = 7, 11
# NodeProto
NODE_OP_TYPE, NODE_ATTRIBUTE, NODE_DOMAIN = 4, 5, 7
# AttributeProto
ATTR_T, ATTR_G, ATTR_TENSORS, ATTR_GRAPHS = 5, 6, 10, 11
ATTR_SPARSE_TENSOR, ATTR_SPARSE_TENSORS = 22, 23
# TensorProto (data_location is an enum: DEFAULT 0, EXTERNAL 1)
TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION, EXTERNAL = 13, 14, 1
# SparseTensorProto
SPARSE_VALUES, SPARSE_INDICES = 1, 2
# StringStringEntryProto
ENTRY_KEY, ENTRY_VALUE = 1, 2


def varint(buf, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    result = shift = 0
    while shift < 64:  # at most 10 bytes: a longer run is a hostile file, not a number
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise ValueError("varint too long")


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
    for number, wire, _, a, b in walk(buf, start, end):
        if wire == 2:
            yield number, a, b


def text(buf, start: int, end: int) -> str:
    return bytes(buf[start:end]).decode("utf-8", "replace")


def length_delimited(number: int, payload: bytes) -> bytes:
    """One length-delimited field (wire type 2), encoded."""
    return encode_varint(number << 3 | 2) + encode_varint(len(payload)) + payload


# ---- external data -----------------------------------------------------------------------

def external_data_locations(path: str | os.PathLike) -> list[str]:
    """The external-data locations (as written: relative to the model's folder) that an ONNX
    file's tensors name, sorted, each once: tensors whose data_location is EXTERNAL, in
    initializers, sparse initializers and node attributes (Constant values), in the main
    graph, every subgraph (If/Loop/Scan bodies) and local functions.

    The file is memory-mapped and the weights are skipped, never read. ValueError when it
    is not a readable protobuf. (training_info graphs are left out: ONNX Runtime never
    loads them.)
    """
    if os.path.getsize(path) == 0:
        return []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        buf = memoryview(m)
        try:
            found: set[str] = set()
            _visit(buf, 0, len(buf), found, _MODEL)
            return sorted(found)
        except (IndexError, RecursionError):
            raise ValueError("not a readable ONNX protobuf") from None
        finally:
            buf.release()


def walk(buf, start: int, end: int):
    """(field number, wire type, begin, a, b) of each field in buf[start:end]: ``begin`` is
    where the field (its key) starts; for a varint ``a`` is its value and ``b`` the position
    after it, otherwise [a, b) is where its bytes lie. Checks the bounds."""
    pos = start
    while pos < end:
        begin = pos
        key, pos = varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            a, pos = varint(buf, pos)
        elif wire == 2:
            size, a = varint(buf, pos)
            pos = a + size
        elif wire in (1, 5):
            a, pos = pos, pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError("truncated protobuf field")
        yield number, wire, begin, a, pos


def _visit(buf, start: int, end: int, found: set[str], handlers: dict) -> None:
    """Hand each embedded message of buf[start:end] whose field has a handler to it."""
    for number, wire, _, a, b in walk(buf, start, end):
        handler = handlers.get(number)
        if handler is not None and wire == 2:
            handler(buf, a, b, found)


def _tensor(buf, start: int, end: int, found: set[str]) -> None:
    external, location = False, None
    for number, wire, _, a, b in walk(buf, start, end):
        if number == TENSOR_DATA_LOCATION and wire == 0:
            external = a == EXTERNAL  # a repeated scalar: the last one counts
        elif number == TENSOR_EXTERNAL_DATA and wire == 2:
            key, value = _entry(buf, a, b)
            if key == "location":
                location = value  # as in ONNX Runtime and onnx: the last one counts
    if external and location is not None:
        found.add(location)


def _entry(buf, start: int, end: int) -> tuple[str, str]:
    key = value = ""
    for number, wire, _, a, b in walk(buf, start, end):
        if number == ENTRY_KEY and wire == 2:
            key = text(buf, a, b)
        elif number == ENTRY_VALUE and wire == 2:
            value = text(buf, a, b)
    return key, value


def _sparse(buf, start, end, found):
    _visit(buf, start, end, found, _SPARSE)


def _graph(buf, start, end, found):
    _visit(buf, start, end, found, _GRAPH)


def _node(buf, start, end, found):
    _visit(buf, start, end, found, _NODE)


def _attribute(buf, start, end, found):
    _visit(buf, start, end, found, _ATTRIBUTE)


def _function(buf, start, end, found):
    _visit(buf, start, end, found, _FUNCTION)


_SPARSE = {SPARSE_VALUES: _tensor, SPARSE_INDICES: _tensor}
_GRAPH = {GRAPH_INITIALIZER: _tensor, GRAPH_SPARSE_INITIALIZER: _sparse, GRAPH_NODE: _node}
_NODE = {NODE_ATTRIBUTE: _attribute}
_ATTRIBUTE = {ATTR_T: _tensor, ATTR_TENSORS: _tensor, ATTR_SPARSE_TENSOR: _sparse,
              ATTR_SPARSE_TENSORS: _sparse, ATTR_G: _graph, ATTR_GRAPHS: _graph}
_FUNCTION = {FUNCTION_NODE: _node, FUNCTION_ATTRIBUTE_PROTO: _attribute}
_MODEL = {MODEL_GRAPH: _graph, MODEL_FUNCTIONS: _function}
