"""Tensors as the protocols carry them: datatypes, shapes, and data from JSON or binary into numpy.

Shared by the v2, v1 and gRPC codecs. Every mistake a client can make raises ``BadRequest``
naming the input, and sizes are checked before anything is allocated. Large JSON data is
converted a slice of rows at a time, pausing between slices (see ``pause``), so that a thread
decoding a large request never keeps the event loop from answering for long.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from mserve.daemon.errors import BadRequest, MserveError
from mserve.daemon.protocol.shapes import nested_shape

DEFAULT_MAX_ELEMENTS = 64 * 2**20
MAX_RANK = 32  # deeper shapes or JSON nesting are refused (numpy itself stops at 64)
SLICE_ELEMENTS = 32768  # elements converted per numpy call: a millisecond or two each
PAUSE_EVERY_S = 0.002

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

ORT_TYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

DATATYPE_BY_DTYPE = {dtype: name for name, dtype in DTYPES.items() if name != "BYTES"}
_JSON_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
                    int: "a number", float: "a number", type(None): "null"}


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype of a numpy array; object, str and bytes arrays are BYTES."""
    if array.dtype.kind in "OUS":
        return "BYTES"
    name = DATATYPE_BY_DTYPE.get(array.dtype.newbyteorder("="))
    if name is None:
        raise MserveError(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype")
    return name


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the model declares it (-1 marks a dynamic dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


_paused_at = 0.0


def pause() -> None:
    """Between two slices of a long decode or encode: every ``PAUSE_EVERY_S`` of work, let
    another thread take the GIL (the event loop, if it waits for it), which it would otherwise
    wait up to the 5 ms switch interval for. A pause costs about 0.1 ms, hence not every slice."""
    global _paused_at
    if time.perf_counter() - _paused_at >= PAUSE_EVERY_S:
        time.sleep(0)
        _paused_at = time.perf_counter()


# ---------------------------------------------------------------- shapes and names


def shape_text(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(dim) for dim in shape) + "]"


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def json_type(value) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def parse_shape(label: str, shape, max_elements: int) -> tuple[int, ...]:
    """Check a client's shape: a short list of non-negative ints whose product fits the limit."""
    if not isinstance(shape, list):
        raise BadRequest(f"{label}: 'shape' must be a list of non-negative integers")
    if len(shape) > MAX_RANK:
        raise BadRequest(f"{label}: shape has rank {len(shape)}, more than the limit of {MAX_RANK}")
    if not all(is_int(dim) and dim >= 0 for dim in shape):
        raise BadRequest(f"{label}: 'shape' must be a list of non-negative integers, "
                         f"got {str(shape)[:80]}")
    if any(dim > max_elements for dim in shape) or math.prod(shape) > max_elements:
        raise BadRequest(f"{label}: shape {shape_text(shape)} has more than the limit of "
                         f"{max_elements} elements")
    return tuple(shape)


def check_shape(label: str, shape: tuple[int, ...], spec: TensorSpec) -> None:
    """Check rank and fixed dimensions of ``shape`` against the model's declared ``spec``."""
    if len(shape) != len(spec.shape):
        raise BadRequest(f"{label}: expected rank {len(spec.shape)} "
                         f"(shape {shape_text(spec.shape)}), got shape {shape_text(shape)}")
    for axis, (want, got) in enumerate(zip(spec.shape, shape, strict=True)):
        if want >= 0 and want != got:
            raise BadRequest(f"{label}: dimension {axis} must be {want}, got {got}")
    if 0 in shape:  # ONNX Runtime's RNN kernels (GRU, LSTM) abort the process on these
        raise BadRequest(f"{label}: shape {shape_text(shape)} has a dimension of size 0; "
                         "mserve does not run models on empty tensors")


def check_input_names(names: Iterable[str], specs: list[TensorSpec]) -> None:
    """Refuse names the model does not have, then name any model input not given."""
    declared = [spec.name for spec in specs]
    given = list(names)
    for name in given:
        if name not in declared:
            raise BadRequest(f"unknown input '{name}'; the model's inputs are: "
                             f"{', '.join(declared)}")
    missing = [name for name in declared if name not in given]
    if missing:
        listed = ", ".join(f"'{name}'" for name in missing)
        raise BadRequest(f"missing input{'s' if len(missing) > 1 else ''} {listed}")


def check_declared(label: str, datatype: str, shape: tuple[int, ...], spec: TensorSpec) -> None:
    """Check what a request declares of an input (before any of its data is read) against
    the model's: the datatype, then the rank and fixed dimensions."""
    if datatype != spec.datatype:
        raise BadRequest(f"{label}: datatype {datatype} does not match the model's "
                         f"{spec.datatype}")
    check_shape(label, shape, spec)


# ---------------------------------------------------------------- JSON tensor data


def data_shape(data) -> tuple[int, ...]:
    """The shape JSON data has if it is rectangular, read along its first elements only:
    as cheap for a million rows as for one (nesting is limited by ``check_depth``)."""
    return nested_shape(data)


def check_depth(label: str, data) -> None:
    depth = 0
    while isinstance(data, list) and data:
        data, depth = data[0], depth + 1
        if depth > MAX_RANK:
            raise BadRequest(f"{label}: data is nested more than {MAX_RANK} levels deep")


def array_from_json(label: str, datatype: str, data, *, allow_b64: bool = False) -> np.ndarray:
    """Turn JSON tensor data (flat or nested) into an array of ``datatype``, in its natural shape.

    Strings where numbers belong, fractions for integer types and out-of-range values are refused.
    With ``allow_b64`` (the V1 protocol) BYTES elements may also be ``{"b64": "..."}``.
    """
    check_depth(label, data)
    if isinstance(data, list) and math.prod(data_shape(data)) > SLICE_ELEMENTS:
        return _by_slices(label, datatype, data, allow_b64)
    return _convert(label, datatype, data, allow_b64)


def _by_slices(label: str, datatype: str, data: list, allow_b64: bool) -> np.ndarray:
    """Convert large data a slice of rows at a time (a row of its own when one row is large),
    into one array; rows whose shapes differ between slices are ragged."""
    per_row = math.prod(data_shape(data[0]))
    # BYTES elements each cost a Python call: smaller slices keep the pauses as frequent
    size = SLICE_ELEMENTS // 16 if datatype == "BYTES" else SLICE_ELEMENTS
    step = max(1, size // max(per_row, 1))
    out = None
    for start in range(0, len(data), step):
        if step == 1:
            piece = array_from_json(label, datatype, data[start], allow_b64=allow_b64)[None]
        else:
            piece = _convert(label, datatype, data[start:start + step], allow_b64)
        if out is None:
            out = np.empty((len(data), *piece.shape[1:]), dtype=piece.dtype)
        elif piece.shape[1:] != out.shape[1:]:
            raise BadRequest(f"{label}: data is ragged or not rectangular")
        out[start:start + len(piece)] = piece
        pause()
    return out


def _convert(label: str, datatype: str, data, allow_b64: bool) -> np.ndarray:
    if datatype == "BYTES":
        return _bytes_from_json(label, data, allow_b64)
    try:
        raw = np.array(data)
    except (ValueError, TypeError):
        raise BadRequest(f"{label}: data is ragged or not rectangular") from None
    if datatype == "BOOL":
        return _to_bool(label, raw)
    if raw.dtype.kind not in "iuf":
        found = {"b": "booleans", "U": "strings"}.get(raw.dtype.kind, "null or non-numeric values")
        raise BadRequest(f"{label}: {datatype} data must be numbers, got {found}")
    if DTYPES[datatype].kind == "f":
        return _to_float(label, datatype, raw)
    return _to_int(label, datatype, raw, data)


def _to_bool(label: str, raw: np.ndarray) -> np.ndarray:
    if raw.dtype.kind == "b":
        return raw
    if raw.dtype.kind in "iuf" and ((raw == 0) | (raw == 1)).all():
        return raw.astype(np.bool_)
    raise BadRequest(f"{label}: BOOL data must be true/false or 0/1")


def _to_int(label: str, datatype: str, raw: np.ndarray, data) -> np.ndarray:
    dtype = DTYPES[datatype]
    if raw.dtype.kind == "f":
        return _floats_to_int(label, datatype, raw, data)
    if raw.size and not (raw.min() >= np.iinfo(dtype).min and raw.max() <= np.iinfo(dtype).max):
        raise BadRequest(f"{label}: a value is out of range for {datatype}")
    return raw.astype(dtype)


def _floats_to_int(label: str, datatype: str, raw: np.ndarray, data) -> np.ndarray:
    """Integers given as floats, or big ints numpy read as float64: convert ``data`` exactly."""
    if not np.array_equal(raw, np.trunc(raw)):
        raise BadRequest(f"{label}: {datatype} data must be integers, got fractions")
    try:
        with np.errstate(invalid="ignore", over="ignore"):
            array = np.array(data, dtype=DTYPES[datatype])
    except OverflowError:
        array = None
    # an out-of-range float converts to garbage, which no longer matches what was sent
    if array is None or not np.array_equal(array.astype(np.float64), raw):
        raise BadRequest(f"{label}: a value is out of range for {datatype}")
    return array


# The smallest magnitude that rounds to infinity when cast down (the largest finite value
# plus half a unit in the last place); JSON has no infinities, so reaching it is overflow.
_OVERFLOW_AT = {"FP32": 2.0**128 - 2.0**103, "FP16": 65520.0}
_MAX = np.maximum.reduce  # without ndarray.max's Python wrapper


def _to_float(label: str, datatype: str, raw: np.ndarray) -> np.ndarray:
    # Checked before the cast, so the cast cannot overflow: cheaper on the hot path than an
    # errstate block plus an isinf pass over the result.
    limit = _OVERFLOW_AT.get(datatype)
    if limit is not None and raw.size and _MAX(np.abs(raw), axis=None) >= limit:
        raise BadRequest(f"{label}: a value is out of range for {datatype}")
    return raw.astype(DTYPES[datatype])


def _bytes_from_json(label: str, data, allow_b64: bool) -> np.ndarray:
    try:
        raw = np.array(data, dtype=object)
    except (ValueError, TypeError):
        raise BadRequest(f"{label}: data is ragged or not rectangular") from None
    flat = raw.reshape(-1)
    leaves = (_bytes_leaf(label, item, allow_b64) for item in flat)
    return np.fromiter(leaves, dtype=object, count=flat.size).reshape(raw.shape)


def _bytes_leaf(label: str, item, allow_b64: bool) -> bytes:
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, list):
        raise BadRequest(f"{label}: data is ragged or not rectangular")
    if allow_b64 and isinstance(item, dict) and isinstance(item.get("b64"), str):
        try:
            return base64.b64decode(item["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{label}: a 'b64' value is not valid base64") from None
    wanted = "strings or {\"b64\": ...} objects" if allow_b64 else "strings"
    raise BadRequest(f"{label}: BYTES data must be {wanted}, got {json_type(item)}")


# ---------------------------------------------------------------- binary tensor data


def binary_size_error(label: str, datatype: str, shape: tuple[int, ...], size: int) -> str | None:
    """What is wrong with ``size`` bytes of binary data for ``shape`` of ``datatype``, read
    from the sizes alone (BYTES: too few bytes for the 4-byte length of each element)."""
    count = math.prod(shape)
    if datatype == "BYTES":
        if 4 * count > size:
            return f"{label}: {size} bytes of binary data cannot hold {count} BYTES elements"
        return None
    needed = count * DTYPES[datatype].itemsize
    if size != needed:
        return (f"{label}: binary_data_size is {size} but shape {shape_text(shape)} "
                f"of {datatype} needs {needed} bytes")
    return None


def array_from_binary(label: str, datatype: str, shape: tuple[int, ...], chunk) -> np.ndarray:
    if (problem := binary_size_error(label, datatype, shape, len(chunk))) is not None:
        raise BadRequest(problem)
    if datatype == "BYTES":
        return _bytes_from_binary(label, math.prod(shape), chunk).reshape(shape)
    if datatype == "BOOL":
        raw = np.frombuffer(chunk, dtype=np.uint8)
        if (raw > 1).any():
            raise BadRequest(f"{label}: BOOL binary data must be bytes 0 or 1")
        return raw.view(np.bool_).reshape(shape)
    dtype = DTYPES[datatype]
    array = np.frombuffer(chunk, dtype=dtype.newbyteorder("<"))
    if not array.dtype.isnative:
        array = array.astype(dtype)
    return array.reshape(shape)


def _bytes_from_binary(label: str, count: int, chunk) -> np.ndarray:
    """Split Triton's BYTES layout: per element a 4-byte little-endian length, then the bytes."""
    if count and (same := _same_lengths(count, chunk)) is not None:
        return same
    end = len(chunk)
    out = np.empty(count, dtype=object)
    offset = 0
    read_length = _LENGTH.unpack_from
    for index in range(count):
        if offset + 4 > end:
            raise BadRequest(f"{label}: binary data ends inside the length of "
                             f"BYTES element {index}")
        (length,) = read_length(chunk, offset)
        start, offset = offset + 4, offset + 4 + length
        if offset > end:
            raise BadRequest(f"{label}: BYTES element {index} claims {length} bytes "
                             f"but only {end - start} remain")
        out[index] = bytes(chunk[start:offset])
        if not index & 1023:  # a Python loop: about a millisecond between pauses
            pause()
    if offset != end:
        raise BadRequest(f"{label}: {end - offset} bytes left over after {count} BYTES elements")
    return out


_LENGTH = struct.Struct("<I")


def _same_lengths(count: int, chunk) -> np.ndarray | None:
    """Elements all as long as the first (fixed-width strings, the common case), split by
    numpy a slice at a time; None when they are not."""
    (length,) = _LENGTH.unpack_from(chunk, 0)
    stride = 4 + length
    if count * stride != len(chunk):
        return None
    lengths = np.ndarray((count,), dtype="<u4", buffer=chunk, strides=(stride,))
    if not (lengths == length).all():
        return None
    out = np.empty(count, dtype=object)
    if length == 0:
        out[:] = b""
        return out
    rows = np.frombuffer(chunk, dtype=np.uint8).reshape(count, stride)[:, 4:]
    step = max(1, SLICE_ELEMENTS // 4)
    for start in range(0, count, step):
        part = np.ascontiguousarray(rows[start:start + step]).view(f"V{length}")
        out[start:start + step] = part.reshape(-1).tolist()
        pause()
    return out
