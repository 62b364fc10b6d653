"""Which operators an ONNX file uses, read straight from its protobuf bytes (no ``onnx``
import, no copy of the weights: the file is memory-mapped and initializers are skipped).

Used to tell whether a model's run time can depend on its input *values* rather than only
on their sizes (control flow, or ops whose output size is a value: Range, Expand, Tile...).
Only such "size-bound" models may run on the worker's event loop (see batcher.py).
"""

from __future__ import annotations

import mmap
from pathlib import Path

from mserve.daemon.onnxproto import (FUNCTION_NODE, GRAPH_NODE, MODEL_FUNCTIONS, MODEL_GRAPH,
                                     NODE_DOMAIN, NODE_OP_TYPE, fields, text)

STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
VALUE_BOUND = frozenset({
    "Loop", "Scan", "If",  # control flow
    "Range", "ConstantOfShape", "Expand", "Tile", "Pad", "Resize", "Upsample", "OneHot",
    "CenterCropPad", "Col2Im", "RandomNormal", "RandomUniform", "Multinomial",
    "NonMaxSuppression", "StringSplit", "TfIdfVectorizer", "Unique",
})


def operators(path: str | Path) -> set[tuple[str, str]]:
    """(domain, op_type) of every node in the main graph and in local functions."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        buf = memoryview(m)
        try:
            found = set()
            for number, start, end in fields(buf, 0, len(buf)):
                node_field = {MODEL_GRAPH: GRAPH_NODE, MODEL_FUNCTIONS: FUNCTION_NODE}.get(number)
                if node_field is None:
                    continue
                for inner, a, b in fields(buf, start, end):
                    if inner == node_field:
                        found.add(_node(buf, a, b))
            return found
        finally:
            buf.release()


def _node(buf, start: int, end: int) -> tuple[str, str]:
    op_type = domain = ""
    for number, a, b in fields(buf, start, end):
        if number == NODE_OP_TYPE:
            op_type = text(buf, a, b)
        elif number == NODE_DOMAIN:
            domain = text(buf, a, b)
    return domain, op_type


def read_operators(path: str | Path) -> set[tuple[str, str]] | None:
    """``operators(path)``, or None when the file cannot be read as ONNX."""
    try:
        return operators(path)
    except (OSError, ValueError, IndexError):
        return None


def is_size_bound(ops: set[tuple[str, str]] | None) -> bool:
    """True when the model's run time depends only on its input sizes: standard ops only,
    none of them value-bound. Unknown operators (None) count as not size-bound."""
    return bool(ops) and all(domain in STANDARD_DOMAINS and op not in VALUE_BOUND
                             for domain, op in ops)


def size_bound(path: str | Path) -> bool:
    return is_size_bound(read_operators(path))
