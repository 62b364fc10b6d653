"""ModelInferRequest/ModelInferResponse <-> the codec's InferRequest and arrays (gRPC).

Checked as the HTTP codec checks, with the same messages. What is cheap is checked against the
model's signature before any tensor is decoded (names, datatypes, shapes, element and byte
counts), so a 16 M-element BYTES tensor sent to an FP32 input is refused without being split.

A large message is split without copies: its ``raw_input_contents`` (field 7, Triton's binary
layout) become views of the received bytes, and only the rest goes through protobuf, which
would copy each of them twice (into its arena, then into a new ``bytes`` on access). Answers
are assembled the same way: the small part from protobuf, each ``raw_output_contents`` joined
after it from the array's own buffer.
"""

from __future__ import annotations

import math

import numpy as np
from google.protobuf.message import DecodeError

from mserve.daemon.errors import BadRequest
from mserve.daemon.protocol import codecs
from mserve.daemon.protocol.proto import grpc_service_pb2 as pb

# datatype -> (InferTensorContents field, numpy dtype of that field's values)
CONTENTS = {
    "BOOL": ("bool_contents", np.bool_),
    "INT8": ("int_contents", np.int32), "INT16": ("int_contents", np.int32),
    "INT32": ("int_contents", np.int32), "INT64": ("int64_contents", np.int64),
    "UINT8": ("uint_contents", np.uint32), "UINT16": ("uint_contents", np.uint32),
    "UINT32": ("uint_contents", np.uint32), "UINT64": ("uint64_contents", np.uint64),
    "FP32": ("fp32_contents", np.float32), "FP64": ("fp64_contents", np.float64),
    "BYTES": ("bytes_contents", object),
}
SPLIT_BYTES = 256 * 1024  # messages at least this large keep their raw contents as views
_RAW_INPUT = 7 << 3 | 2  # ModelInferRequest.raw_input_contents, length-delimited
_RAW_OUTPUT = b"\x32"  # ModelInferResponse.raw_output_contents (6), length-delimited
NOT_A_MESSAGE = "the request is not a valid {} message"


def parse_message(message_type, raw: bytes):
    """A request message from its bytes; bytes that are not one are a BadRequest."""
    try:
        return message_type.FromString(raw)
    except (DecodeError, ValueError):
        raise BadRequest(NOT_A_MESSAGE.format(message_type.DESCRIPTOR.name)) from None


def parse_request(raw: bytes) -> tuple[pb.ModelInferRequest, list]:
    """A ModelInferRequest and its raw input contents (views of ``raw`` when it is large,
    else the message's own field)."""
    if len(raw) < SPLIT_BYTES:
        msg = parse_message(pb.ModelInferRequest, raw)
        return msg, msg.raw_input_contents
    try:
        rest, chunks = split_raw_inputs(raw)
    except DecodeError:
        raise BadRequest(NOT_A_MESSAGE.format("ModelInferRequest")) from None
    return parse_message(pb.ModelInferRequest, rest), chunks


def split_raw_inputs(raw: bytes) -> tuple[bytes, list[memoryview]]:
    """The top-level fields of a serialized ModelInferRequest: the message without its
    raw_input_contents (a copy, small), and those as views of ``raw``, in order."""
    view, rest, chunks = memoryview(raw), [], []
    pos, kept, end = 0, 0, len(raw)
    while pos < end:
        start = pos
        tag, pos = _varint(raw, pos)
        kind = tag & 7
        if tag >> 3 == 0:
            raise DecodeError("field number 0")
        if kind == 2:
            length, pos = _varint(raw, pos)
            stop = pos + length
            if stop > end:
                raise DecodeError("truncated field")
            if tag == _RAW_INPUT:
                rest.append(view[kept:start])
                chunks.append(view[pos:stop])
                kept = stop
            pos = stop
        elif kind == 0:
            pos = _varint(raw, pos)[1]
        elif kind in (1, 5):
            pos += 8 if kind == 1 else 4
        else:  # groups (3, 4) and the unused wire types
            raise DecodeError(f"wire type {kind}")
    if pos != end:
        raise DecodeError("truncated field")
    rest.append(view[kept:end])
    return b"".join(rest), chunks


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while shift < 64:
        if pos >= len(data):
            raise DecodeError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise DecodeError("varint too long")


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# ---------------------------------------------------------------- requests


def infer_request(msg: pb.ModelInferRequest, raw, specs: list[codecs.TensorSpec],
                  max_elements: int) -> codecs.InferRequest:
    """The codec's InferRequest from a ModelInferRequest and its raw input contents, checked
    against the model's inputs ``specs`` before any tensor is decoded."""
    tensors = msg.inputs
    if not tensors:
        raise BadRequest("'inputs' must be a non-empty list")
    if raw and len(raw) != len(tensors):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries but the request has "
                         f"{len(tensors)} inputs")
    # (tensor, name, datatype): protobuf builds a new str at each attribute read
    given, seen = [(tensor, tensor.name, tensor.datatype) for tensor in tensors], set()
    for index, (_, name, _) in enumerate(given):
        if not name:
            raise BadRequest(f"inputs[{index}]: 'name' must be a non-empty string")
        if name in seen:
            raise BadRequest(f"input '{name}' is given more than once")
        seen.add(name)
    by_name = {spec.name: spec for spec in specs}
    checked = [(name, datatype, tensor, chunk,
                _checked(tensor, name, datatype, chunk, by_name, specs, max_elements))
               for (tensor, name, datatype), chunk in zip(given, raw or [None] * len(given))]
    inputs = [codecs.InferInput(name, datatype, shape,
                                _decode(tensor, name, datatype, shape, chunk))
              for name, datatype, tensor, chunk, shape in checked]
    outputs = codecs.requested_outputs([{"name": out.name} for out in msg.outputs], True)
    return codecs.InferRequest(msg.id or None, _parameters(msg.parameters), inputs, outputs,
                               True)


def _checked(tensor, name: str, datatype: str, chunk, by_name: dict, specs: list,
             max_elements: int) -> tuple[int, ...]:
    """The shape of one input, once what it says (name, datatype, shape, where its data is)
    fits the protocol and the model's input; nothing is decoded yet."""
    label = f"input '{name}'"
    if datatype not in codecs.DTYPES:
        raise BadRequest(f"{label}: unknown datatype {datatype[:40]!r}; "
                         f"expected one of {', '.join(codecs.DTYPES)}")
    shape = codecs.parse_shape(label, list(tensor.shape), max_elements)
    if chunk is not None:
        if tensor.HasField("contents"):
            raise BadRequest(f"{label}: 'contents' must not be set when raw_input_contents "
                             "is used")
    elif datatype not in CONTENTS:
        raise BadRequest(f"{label}: {datatype} data must be sent in raw_input_contents "
                         "(the protocol has no typed field for it)")
    else:
        field = CONTENTS[datatype][0]
        fields = [f.name for f, _ in tensor.contents.ListFields()]
        if any(other != field for other in fields):
            raise BadRequest(f"{label}: {datatype} data goes in contents.{field}, got "
                             f"contents.{', contents.'.join(fields)}")
    spec = by_name.get(name)
    if spec is None:
        codecs.check_input_names([name], specs)
    if datatype != spec.datatype:
        raise BadRequest(f"{label}: datatype {datatype} does not match the model's "
                         f"{spec.datatype}")
    codecs.check_shape(label, shape, spec)
    return shape


def _decode(tensor, name: str, datatype: str, shape: tuple[int, ...], chunk) -> np.ndarray:
    label = f"input '{name}'"
    if chunk is None:
        return _from_contents(label, datatype, shape, tensor.contents)
    if datatype != "BYTES":
        needed = math.prod(shape) * codecs.DTYPES[datatype].itemsize
        if len(chunk) != needed:
            raise BadRequest(f"{label}: raw_input_contents has {len(chunk)} bytes but shape "
                             f"{codecs.shape_text(shape)} of {datatype} needs {needed} bytes")
    return codecs.array_from_binary(label, datatype, shape, chunk)


def _from_contents(label: str, datatype: str, shape: tuple[int, ...], contents) -> np.ndarray:
    field, wide = CONTENTS[datatype]
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise BadRequest(f"{label}: expected {count} elements for shape "
                         f"{codecs.shape_text(shape)}, got {len(values)}")
    if wide is object:
        array = np.empty(count, dtype=object)
        array[:] = list(values)
    else:
        array = np.fromiter(values, dtype=wide, count=count)
        if array.dtype != codecs.DTYPES[datatype]:  # INT8 in int32 values: range-checked
            array = codecs.array_from_json(label, datatype, array)
    return array.reshape(shape)


def _parameters(parameters) -> dict:
    return {key: getattr(value, value.WhichOneof("parameter_choice"))
            for key, value in parameters.items() if value.WhichOneof("parameter_choice")}


# ---------------------------------------------------------------- answers


def infer_response(name: str, version: str, request_id: str,
                   results: list[tuple[codecs.RequestedOutput, np.ndarray]]) -> bytes:
    """A serialized ModelInferResponse with every output in raw_output_contents."""
    response = pb.ModelInferResponse(model_name=name, model_version=version, id=request_id)
    parts = [b""]
    for requested, array in results:
        response.outputs.add(name=requested.name, datatype=codecs.datatype_of(array),
                             shape=array.shape)
        data = _raw_output(array)
        parts += (_RAW_OUTPUT, _varint_bytes(len(data)), data)
    parts[0] = response.SerializeToString()
    return b"".join(parts)


def _raw_output(array: np.ndarray):
    """Triton's binary layout of ``array``: its own buffer when it already is that layout."""
    if array.dtype.kind in "OUS":
        return codecs.binary_bytes(array)
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return memoryview(little).cast("B") if little.size else b""


def response_size(results: list[tuple[codecs.RequestedOutput, np.ndarray]]) -> int:
    """About how many bytes the answer to ``results`` takes (to choose where to encode it)."""
    size = 0
    for _, array in results:  # an object array's nbytes counts pointers, not its strings
        size += array.size * 64 if array.dtype.kind in "OUS" else array.nbytes
    return size
