"""Open Inference Protocol v2 (KServe / Triton) REST codec: parse, check and answer requests.

Pure functions over bytes and numpy arrays. Every mistake a client can make raises ``BadRequest``
with a message naming the input or field, and sizes are checked before anything is allocated.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import orjson

from mserve.daemon.errors import BadRequest, MserveError

DEFAULT_MAX_ELEMENTS = 64 * 2**20
MAX_RANK = 32  # deeper shapes or JSON nesting are refused (numpy itself stops at 64)

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

_DATATYPE_BY_DTYPE = {dtype: name for name, dtype in DTYPES.items() if name != "BYTES"}
# The numpy scalar types orjson serializes; ONNX Runtime can return arrays of an equivalent
# type it does not know (numpy.longlong for INT64, numpy.ulonglong for UINT64).
_ORJSON_TYPES = frozenset(dtype.type for dtype in _DATATYPE_BY_DTYPE)
_JSON_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
                    int: "a number", float: "a number", type(None): "null"}


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype of a numpy array; object, str and bytes arrays are BYTES."""
    if array.dtype.kind in "OUS":
        return "BYTES"
    name = _DATATYPE_BY_DTYPE.get(array.dtype.newbyteorder("="))
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


@dataclass
class InferInput:
    """One decoded request input; ``array`` already has ``shape`` and the dtype of ``datatype``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray


@dataclass
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    id: str | None
    parameters: dict
    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None  # None: every output the model has
    binary_output: bool


@dataclass
class _PendingInput:
    """An input whose JSON header has been checked but whose data is not decoded yet."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: object
    binary_size: int | None


# ---------------------------------------------------------------- small shared helpers


def shape_text(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(dim) for dim in shape) + "]"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def load_json_object(body: bytes, what: str = "request body") -> dict:
    """Parse ``body`` as a JSON object, turning every failure (depth included) into BadRequest."""
    if not body:
        raise BadRequest(f"{what} is empty")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"{what} must be a JSON object, got {_json_type(doc)}")
    return doc


def _parameters(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be an object, got {_json_type(value)}")
    return value


def _flag(parameters: dict, key: str, what: str, default: bool) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{what}: parameter '{key}' must be true or false")
    return value


def parse_shape(label: str, shape, max_elements: int) -> tuple[int, ...]:
    """Check a client's shape: a short list of non-negative ints whose product fits the limit."""
    if not isinstance(shape, list):
        raise BadRequest(f"{label}: 'shape' must be a list of non-negative integers")
    if len(shape) > MAX_RANK:
        raise BadRequest(f"{label}: shape has rank {len(shape)}, more than the limit of {MAX_RANK}")
    if not all(_is_int(dim) and dim >= 0 for dim in shape):
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


# ---------------------------------------------------------------- JSON tensor data


def _check_depth(label: str, data) -> None:
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
    _check_depth(label, data)
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
    raise BadRequest(f"{label}: BYTES data must be {wanted}, got {_json_type(item)}")


# ---------------------------------------------------------------- binary tensor data


def array_from_binary(label: str, datatype: str, shape: tuple[int, ...], chunk) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_from_binary(label, count, chunk).reshape(shape)
    dtype = DTYPES[datatype]
    needed = count * dtype.itemsize
    if len(chunk) != needed:
        raise BadRequest(f"{label}: binary_data_size is {len(chunk)} but shape {shape_text(shape)} "
                         f"of {datatype} needs {needed} bytes")
    if datatype == "BOOL":
        raw = np.frombuffer(chunk, dtype=np.uint8)
        if (raw > 1).any():
            raise BadRequest(f"{label}: BOOL binary data must be bytes 0 or 1")
        return raw.view(np.bool_).reshape(shape)
    array = np.frombuffer(chunk, dtype=dtype.newbyteorder("<"))
    if not array.dtype.isnative:
        array = array.astype(dtype)
    return array.reshape(shape)


def _bytes_from_binary(label: str, count: int, chunk) -> np.ndarray:
    """Split Triton's BYTES layout: per element a 4-byte little-endian length, then the bytes."""
    end = len(chunk)
    if 4 * count > end:
        raise BadRequest(f"{label}: {end} bytes of binary data cannot hold {count} BYTES elements")
    out = np.empty(count, dtype=object)
    offset = 0
    for index in range(count):
        if offset + 4 > end:
            raise BadRequest(f"{label}: binary data ends inside the length of "
                             f"BYTES element {index}")
        length = int.from_bytes(chunk[offset:offset + 4], "little")
        start, offset = offset + 4, offset + 4 + length
        if offset > end:
            raise BadRequest(f"{label}: BYTES element {index} claims {length} bytes "
                             f"but only {end - start} remain")
        out[index] = bytes(chunk[start:offset])
    if offset != end:
        raise BadRequest(f"{label}: {end - offset} bytes left over after {count} BYTES elements")
    return out


# ---------------------------------------------------------------- requests


def parse_request(body: bytes, header_length: int | None, *,
                  max_elements: int = DEFAULT_MAX_ELEMENTS) -> InferRequest:
    """Decode an inference request; ``header_length`` is the Inference-Header-Content-Length header.

    With the header, the first ``header_length`` bytes are JSON and the rest is the binary data of
    the inputs that declare ``binary_data_size``, in input order.
    """
    if header_length is None:
        header, binary = body, memoryview(b"")
    elif not _is_int(header_length) or not 0 < header_length <= len(body):
        raise BadRequest(f"Inference-Header-Content-Length must be between 1 and the body size "
                         f"({len(body)}), got {header_length}")
    else:
        header, binary = body[:header_length], memoryview(body)[header_length:]
    doc = load_json_object(header)
    request_id = doc.get("id")
    if "id" in doc and not isinstance(request_id, str):
        raise BadRequest(f"'id' must be a string, got {_json_type(request_id)}")
    parameters = _parameters(doc.get("parameters"), "'parameters'")
    binary_output = _flag(parameters, "binary_data_output", "request", False)
    pending = _pending_inputs(doc.get("inputs"), max_elements)
    _check_binary_total(pending, len(binary), header_length)
    inputs, offset = [], 0
    for item in pending:
        chunk = binary[offset:offset + (item.binary_size or 0)]
        offset += len(chunk)
        inputs.append(_decode_input(item, chunk))
    outputs = requested_outputs(doc.get("outputs"), binary_output)
    return InferRequest(request_id, parameters, inputs, outputs, binary_output)


def _pending_inputs(inputs, max_elements: int) -> list[_PendingInput]:
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("'inputs' must be a non-empty list")
    pending = [_pending_input(index, item, max_elements) for index, item in enumerate(inputs)]
    seen = set()
    for item in pending:
        if item.name in seen:
            raise BadRequest(f"input '{item.name}' is given more than once")
        seen.add(item.name)
    return pending


def _pending_input(index: int, item, max_elements: int) -> _PendingInput:
    if not isinstance(item, dict):
        raise BadRequest(f"inputs[{index}] must be an object, got {_json_type(item)}")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"inputs[{index}]: 'name' must be a non-empty string")
    label = f"input '{name}'"
    datatype = item.get("datatype")
    if not isinstance(datatype, str) or datatype not in DTYPES:
        raise BadRequest(f"{label}: unknown datatype {str(datatype)[:40]!r}; "
                         f"expected one of {', '.join(DTYPES)}")
    shape = parse_shape(label, item.get("shape"), max_elements)
    size = _parameters(item.get("parameters"), f"{label}: 'parameters'").get("binary_data_size")
    if size is None and "data" not in item:
        raise BadRequest(f"{label}: 'data' is missing (and no binary_data_size is given)")
    if size is not None and not (_is_int(size) and size >= 0):
        raise BadRequest(f"{label}: binary_data_size must be a non-negative integer")
    if size is not None and "data" in item:
        raise BadRequest(f"{label}: has both 'data' and binary_data_size")
    return _PendingInput(name, datatype, shape, item.get("data"), size)


def _check_binary_total(pending: list[_PendingInput], available: int, header_length) -> None:
    declared = sum(item.binary_size or 0 for item in pending)
    if declared == available:
        return
    if header_length is None:
        raise BadRequest(f"binary data: inputs declare {declared} bytes but the request has no "
                         "Inference-Header-Content-Length header")
    raise BadRequest(f"binary data: inputs declare {declared} bytes but the body has {available}")


def _decode_input(item: _PendingInput, chunk) -> InferInput:
    label = f"input '{item.name}'"
    if item.binary_size is not None:
        array = array_from_binary(label, item.datatype, item.shape, chunk)
        return InferInput(item.name, item.datatype, item.shape, array)
    array = array_from_json(label, item.datatype, item.data)
    count = math.prod(item.shape)
    if array.size != count:
        raise BadRequest(f"{label}: expected {count} elements for shape {shape_text(item.shape)}, "
                         f"got {array.size}")
    return InferInput(item.name, item.datatype, item.shape, array.reshape(item.shape))


def requested_outputs(outputs, binary_output: bool) -> list[RequestedOutput] | None:
    """The outputs asked for; absent or empty means all of them (as Triton does)."""
    if outputs is None or outputs == []:
        return None
    if not isinstance(outputs, list):
        raise BadRequest(f"'outputs' must be a list, got {_json_type(outputs)}")
    requested, seen = [], set()
    for index, item in enumerate(outputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest(f"outputs[{index}] must be an object with a string 'name'")
        name = item["name"]
        if name in seen:
            raise BadRequest(f"output '{name}' is requested more than once")
        seen.add(name)
        parameters = _parameters(item.get("parameters"), f"output '{name}': 'parameters'")
        binary = _flag(parameters, "binary_data", f"output '{name}'", binary_output)
        requested.append(RequestedOutput(name, binary))
    return requested


def check_inputs(request: InferRequest, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Check the request's inputs against the model's: names, datatypes, ranks, fixed dims.
    What is wrong with a given input is said before what is missing."""
    by_name = {spec.name: spec for spec in specs}
    arrays = {}
    for item in request.inputs:
        spec, label = by_name.get(item.name), f"input '{item.name}'"
        if spec is None:
            check_input_names([item.name], specs)
        if item.datatype != spec.datatype:
            raise BadRequest(f"{label}: datatype {item.datatype} does not match the model's "
                             f"{spec.datatype}")
        check_shape(label, item.shape, spec)
        arrays[item.name] = item.array
    check_input_names(arrays, specs)
    return arrays


def check_outputs(request: InferRequest, specs: list[TensorSpec]) -> list[RequestedOutput]:
    """The outputs to compute: those requested, or all the model's when none are named."""
    if request.outputs is None:
        return [RequestedOutput(spec.name, request.binary_output) for spec in specs]
    declared = [spec.name for spec in specs]
    for output in request.outputs:
        if output.name not in declared:
            raise BadRequest(f"unknown output '{output.name}'; the model's outputs are: "
                             f"{', '.join(declared)}")
    return list(request.outputs)


# ---------------------------------------------------------------- responses


def json_ready(array: np.ndarray):
    """What orjson (with OPT_SERIALIZE_NUMPY) writes as the array's nested JSON list.

    BYTES become str, decoded as UTF-8 with undecodable bytes replaced by U+FFFD; FP16 widens to
    FP32. NaN and infinities come out as null, which is what orjson writes for them. An array
    comes back native, C-ordered and of a dtype whose elements orjson also writes one by one
    (a V1 row of a 1-D output is one element).
    """
    if array.dtype.kind in "OUS":
        texts = [_text(item) for item in array.reshape(-1)]
        return np.array(texts, dtype=object).reshape(array.shape).tolist()
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    dtype = array.dtype.newbyteorder("=")
    if dtype.type not in _ORJSON_TYPES:  # e.g. numpy.longlong: the same bytes, viewed as int64
        dtype = DTYPES[datatype_of(array)]
    array = np.asarray(array, dtype=dtype, order="C")
    return array.item() if array.ndim == 0 else array


def _text(item) -> str:
    return item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)


def binary_bytes(array: np.ndarray) -> bytes:
    """Triton's binary layout: little-endian row-major; BOOL one byte; BYTES length-prefixed."""
    if array.dtype.kind not in "OUS":
        return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    parts = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts += (len(data).to_bytes(4, "little"), data)
    return b"".join(parts)


def encode_response(model_name: str, model_version: str, request_id: str | None,
                    outputs: list[tuple[RequestedOutput, np.ndarray]],
                    parameters: dict | None = None) -> tuple[bytes, dict[str, str]]:
    """Encode an inference response as (body, extra headers); binary outputs follow the JSON."""
    doc: dict = {"model_name": model_name, "model_version": model_version}
    if request_id:
        doc["id"] = request_id
    if parameters is not None:
        doc["parameters"] = parameters
    entries, parts = [], []
    for requested, array in outputs:
        entry = {"name": requested.name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if requested.binary:
            parts.append(binary_bytes(array))
            entry["parameters"] = {"binary_data_size": len(parts[-1])}
        else:
            entry["data"] = json_ready(array.reshape(-1))
        entries.append(entry)
    doc["outputs"] = entries
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not any(requested.binary for requested, _ in outputs):
        return header, {"content-type": "application/json"}
    return header + b"".join(parts), {"content-type": "application/octet-stream",
                                      "inference-header-content-length": str(len(header))}


def encode_error(message: str) -> bytes:
    return orjson.dumps({"error": message})


def model_metadata(name: str, versions: list[str], inputs: list[TensorSpec],
                   outputs: list[TensorSpec]) -> dict:
    """The body of GET /v2/models/{name}."""
    return {"name": name, "versions": list(versions), "platform": "onnxruntime_onnx",
            "inputs": [spec.to_json() for spec in inputs],
            "outputs": [spec.to_json() for spec in outputs]}
