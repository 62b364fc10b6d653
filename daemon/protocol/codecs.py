"""Open Inference Protocol v2 (KServe / Triton) REST codec: parse, check and answer requests.

Pure functions over bytes and numpy arrays. Every mistake a client can make raises ``BadRequest``
with a message naming the input or field. Cheap checks come first: given the model's inputs,
``parse_request`` checks names, datatypes, shapes and sizes from the JSON header before it reads
any tensor data. Datatypes, shapes and the conversion of tensor data live in ``tensors``
(re-exported here); large documents are read and written in pieces (``bigjson``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import orjson

from mserve.daemon.errors import BadRequest
from mserve.daemon.protocol import bigjson
from mserve.daemon.protocol.tensors import (DATATYPE_BY_DTYPE, DEFAULT_MAX_ELEMENTS, DTYPES,
                                          MAX_RANK, ORT_TYPES, SLICE_ELEMENTS, TensorSpec,
                                          array_from_binary, array_from_json,
                                          binary_size_error, check_declared, check_input_names,
                                          check_shape, data_shape, datatype_of, is_int,
                                          json_type, parse_shape, pause, shape_text)

__all__ = ["DEFAULT_MAX_ELEMENTS", "DTYPES", "MAX_RANK", "ORT_TYPES", "InferInput",
           "InferRequest", "RequestedOutput", "TensorSpec", "array_from_binary",
           "array_from_json", "binary_bytes", "check_input_names", "check_inputs",
           "check_outputs", "check_shape", "datatype_of", "encode_error", "encode_response",
           "json_ready", "load_json_object", "model_metadata", "parse_request", "parse_shape",
           "requested_outputs", "shape_text"]

# The numpy scalar types orjson serializes; ONNX Runtime can return arrays of an equivalent
# type it does not know (numpy.longlong for INT64, numpy.ulonglong for UINT64).
_ORJSON_TYPES = frozenset(dtype.type for dtype in DATATYPE_BY_DTYPE)


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


def load_json_object(body: bytes, what: str = "request body") -> dict:
    """Parse ``body`` as a JSON object, turning every failure (depth included) into BadRequest.
    A large body is parsed in pieces (see ``bigjson``): call it off the event loop."""
    if not body:
        raise BadRequest(f"{what} is empty")
    try:
        doc = orjson.loads(body) if len(body) <= bigjson.SMALL else bigjson.loads(body)
    except (orjson.JSONDecodeError, bigjson.InvalidJSON) as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"{what} must be a JSON object, got {json_type(doc)}")
    return doc


def _parameters(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be an object, got {json_type(value)}")
    return value


def _flag(parameters: dict, key: str, what: str, default: bool) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{what}: parameter '{key}' must be true or false")
    return value


# ---------------------------------------------------------------- requests


def parse_request(body: bytes, header_length: int | None, *,
                  max_elements: int = DEFAULT_MAX_ELEMENTS,
                  inputs: list[TensorSpec] | None = None,
                  outputs: list[TensorSpec] | None = None) -> InferRequest:
    """Decode an inference request; ``header_length`` is the Inference-Header-Content-Length header.

    With the header, the first ``header_length`` bytes are JSON and the rest is the binary data of
    the inputs that declare ``binary_data_size``, in input order. Given the model's ``inputs``
    (and ``outputs``), what the header declares is checked against them before any tensor data
    is read, so a request that cannot run costs no decoding.
    """
    if header_length is None:
        header, binary = body, memoryview(b"")
    elif not is_int(header_length) or not 0 < header_length <= len(body):
        raise BadRequest(f"Inference-Header-Content-Length must be between 1 and the body size "
                         f"({len(body)}), got {header_length}")
    else:
        header, binary = body[:header_length], memoryview(body)[header_length:]
    doc = load_json_object(header)
    if len(header) <= bigjson.SMALL:
        return _request(doc, len(header), binary, header_length, max_elements, inputs, outputs)
    try:
        return _request(doc, len(header), binary, header_length, max_elements, inputs, outputs)
    finally:  # the inputs' data, a slice at a time (the request keeps its parameters)
        for item in doc.get("inputs") if isinstance(doc.get("inputs"), list) else ():
            if isinstance(item, dict):
                bigjson.release(item.get("data"))


def _request(doc: dict, json_bytes: int, binary: memoryview, header_length: int | None,
             max_elements: int, inputs: list[TensorSpec] | None,
             outputs: list[TensorSpec] | None) -> InferRequest:
    request_id = doc.get("id")
    if "id" in doc and not isinstance(request_id, str):
        raise BadRequest(f"'id' must be a string, got {json_type(request_id)}")
    parameters = _parameters(doc.get("parameters"), "'parameters'")
    binary_output = _flag(parameters, "binary_data_output", "request", False)
    pending = _pending_inputs(doc.get("inputs"), max_elements)
    _check_binary_total(pending, len(binary), header_length)
    if inputs is not None:
        _check_declared(pending, inputs)
    _check_sizes(pending, json_bytes)
    requested = requested_outputs(doc.get("outputs"), binary_output)
    if outputs is not None and requested is not None:
        _check_output_names(requested, outputs)
    decoded, offset = [], 0
    for item in pending:
        chunk = binary[offset:offset + (item.binary_size or 0)]
        offset += len(chunk)
        decoded.append(_decode_input(item, chunk))
    return InferRequest(request_id, parameters, decoded, requested, binary_output)


def _check_declared(pending: list[_PendingInput], specs: list[TensorSpec]) -> None:
    """Each input's name, datatype and shape against the model's, from the header alone.
    Inputs not given are named by ``check_inputs``, after decoding: what is wrong with a given
    input (its data included) is said before what is missing."""
    by_name = {spec.name: spec for spec in specs}
    for item in pending:
        if item.name not in by_name:
            check_input_names([item.name], specs)
        check_declared(f"input '{item.name}'", item.datatype, item.shape, by_name[item.name])


def _check_sizes(pending: list[_PendingInput], json_bytes: int) -> None:
    """Sizes that are wrong before a byte is read: binary data of the wrong size, and large
    JSON data (there are ``json_bytes`` of JSON) whose element count, read along its first
    elements, does not fit the shape."""
    for item in pending:
        label = f"input '{item.name}'"
        if item.binary_size is not None:
            problem = binary_size_error(label, item.datatype, item.shape, item.binary_size)
            if problem is not None:
                raise BadRequest(problem)
            continue
        if json_bytes <= 2 * SLICE_ELEMENTS:  # too little JSON for large data
            continue
        count, found = math.prod(item.shape), math.prod(data_shape(item.data))
        if found > SLICE_ELEMENTS and found != count:  # small data: decoding says it exactly
            raise BadRequest(f"{label}: expected {count} elements for shape "
                             f"{shape_text(item.shape)}, got {found}")


def _check_output_names(requested: list[RequestedOutput], specs: list[TensorSpec]) -> None:
    declared = [spec.name for spec in specs]
    for output in requested:
        if output.name not in declared:
            raise BadRequest(f"unknown output '{output.name}'; the model's outputs are: "
                             f"{', '.join(declared)}")


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
        raise BadRequest(f"inputs[{index}] must be an object, got {json_type(item)}")
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
    if size is not None and not (is_int(size) and size >= 0):
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
        raise BadRequest(f"'outputs' must be a list, got {json_type(outputs)}")
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
        if item.name not in by_name:
            check_input_names([item.name], specs)
        check_declared(f"input '{item.name}'", item.datatype, item.shape, by_name[item.name])
        arrays[item.name] = item.array
    check_input_names(arrays, specs)
    return arrays


def check_outputs(request: InferRequest, specs: list[TensorSpec]) -> list[RequestedOutput]:
    """The outputs to compute: those requested, or all the model's when none are named."""
    if request.outputs is None:
        return [RequestedOutput(spec.name, request.binary_output) for spec in specs]
    _check_output_names(request.outputs, specs)
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
    flat = array.reshape(-1)
    blocks = []
    for start in range(0, flat.size, SLICE_ELEMENTS):  # one slice per GIL hold, not one join
        blocks.append(_bytes_block(flat[start:start + SLICE_ELEMENTS].tolist()))
        pause()
    return b"".join(blocks)


def _bytes_block(items: list) -> bytes:
    """One slice of BYTES elements, each after its 4-byte length; equal lengths (fixed-width
    strings, the common case) are laid out by numpy."""
    datas = [item if isinstance(item, bytes) else str(item).encode("utf-8") for item in items]
    lengths = np.fromiter(map(len, datas), dtype="<u4", count=len(datas))
    width = int(lengths[0]) if len(datas) else 0
    if (lengths == width).all():
        block = np.empty((len(datas), 4 + width), dtype=np.uint8)
        block[:, :4] = np.frombuffer(lengths[:1].tobytes(), dtype=np.uint8)
        block[:, 4:] = np.frombuffer(b"".join(datas), dtype=np.uint8).reshape(len(datas), width)
        return block.tobytes()
    heads = [length.to_bytes(4, "little") for length in lengths.tolist()]
    return b"".join(part for pair in zip(heads, datas) for part in pair)


def encode_response(model_name: str, model_version: str, request_id: str | None,
                    outputs: list[tuple[RequestedOutput, np.ndarray]],
                    parameters: dict | None = None) -> tuple[bytes, dict[str, str]]:
    """Encode an inference response as (body, extra headers); binary outputs follow the JSON."""
    doc: dict = {"model_name": model_name, "model_version": model_version}
    if request_id:
        doc["id"] = request_id
    if parameters is not None:
        doc["parameters"] = parameters
    entries, parts, in_json = [], [], 0
    for requested, array in outputs:
        entry = {"name": requested.name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if requested.binary:
            parts.append(binary_bytes(array))
            entry["parameters"] = {"binary_data_size": len(parts[-1])}
        else:
            entry["data"] = json_ready(array.reshape(-1))
            in_json += array.size
        entries.append(entry)
    doc["outputs"] = entries
    if in_json > bigjson.PIECE_ELEMENTS:
        header = bigjson.dumps(doc)
    else:
        header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not parts:
        return header, {"content-type": "application/json"}
    return b"".join([header, *parts]), {"content-type": "application/octet-stream",
                                         "inference-header-content-length": str(len(header))}


def encode_error(message: str) -> bytes:
    return orjson.dumps({"error": message})


def model_metadata(name: str, versions: list[str], inputs: list[TensorSpec],
                   outputs: list[TensorSpec]) -> dict:
    """The body of GET /v2/models/{name}."""
    return {"name": name, "versions": list(versions), "platform": "onnxruntime_onnx",
            "inputs": [spec.to_json() for spec in inputs],
            "outputs": [spec.to_json() for spec in outputs]}

