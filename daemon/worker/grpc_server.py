"""The Open Inference Protocol's gRPC service (``inference.GRPCInferenceService``) on a
deployment's gRPC port, in the worker's event loop next to the HTTP server.

The RPCs are the HTTP routes over protobuf: the same ``Serving`` (versions, token, batching
queue, metrics, statistics, request log) and the same codec checks, so a bad request gets the
same message as over HTTP, as a gRPC status (INVALID_ARGUMENT, NOT_FOUND, ...). Inputs come as
typed ``contents`` or as ``raw_input_contents`` (Triton's binary layout; FP16 only raw);
outputs always go back raw, as Triton does.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from urllib.parse import unquote

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from grpc import aio

from mserve.daemon.errors import BadRequest, MserveError, NotFound, Unavailable
from mserve.daemon.worker import codecs
from mserve.daemon.worker.app import SERVER_METADATA, Serving
from mserve.daemon.worker.proto import grpc_service_pb2 as pb
from mserve.daemon.worker.requestlog import Call

log = logging.getLogger("mserve.worker")
SERVICE = "inference.GRPCInferenceService"
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
         503: grpc.StatusCode.UNAVAILABLE}
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


def status_code(exc: MserveError) -> grpc.StatusCode:
    """The gRPC status of an error that carries an HTTP status."""
    return CODES.get(exc.status, grpc.StatusCode.INTERNAL)


# ---------------------------------------------------------------- protobuf <-> codec


def infer_request(msg: pb.ModelInferRequest, max_elements: int) -> codecs.InferRequest:
    """The codec's InferRequest from a ModelInferRequest, checked as the HTTP codec checks."""
    if not msg.inputs:
        raise BadRequest("'inputs' must be a non-empty list")
    raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries but the request has "
                         f"{len(msg.inputs)} inputs")
    seen = set()
    for index, tensor in enumerate(msg.inputs):
        if not tensor.name:
            raise BadRequest(f"inputs[{index}]: 'name' must be a non-empty string")
        if tensor.name in seen:
            raise BadRequest(f"input '{tensor.name}' is given more than once")
        seen.add(tensor.name)
    inputs = [_input(tensor, raw[index] if raw else None, max_elements)
              for index, tensor in enumerate(msg.inputs)]
    names = [{"name": output.name} for output in msg.outputs]
    outputs = codecs.requested_outputs(names, True)
    return codecs.InferRequest(msg.id or None, _parameters(msg.parameters), inputs, outputs,
                               True)


def _input(tensor, chunk: bytes | None, max_elements: int) -> codecs.InferInput:
    label, datatype = f"input '{tensor.name}'", tensor.datatype
    if datatype not in codecs.DTYPES:
        raise BadRequest(f"{label}: unknown datatype {datatype[:40]!r}; "
                         f"expected one of {', '.join(codecs.DTYPES)}")
    shape = codecs.parse_shape(label, list(tensor.shape), max_elements)
    if chunk is not None:
        if tensor.HasField("contents"):
            raise BadRequest(f"{label}: 'contents' must not be set when raw_input_contents "
                             "is used")
        return codecs.InferInput(tensor.name, datatype, shape,
                                 _from_raw(label, datatype, shape, chunk))
    return codecs.InferInput(tensor.name, datatype, shape,
                             _from_contents(label, datatype, shape, tensor.contents))


def _from_raw(label: str, datatype: str, shape: tuple[int, ...], chunk: bytes) -> np.ndarray:
    if datatype != "BYTES":
        needed = math.prod(shape) * codecs.DTYPES[datatype].itemsize
        if len(chunk) != needed:
            raise BadRequest(f"{label}: raw_input_contents has {len(chunk)} bytes but shape "
                             f"{codecs.shape_text(shape)} of {datatype} needs {needed} bytes")
    return codecs.array_from_binary(label, datatype, shape, chunk)


def _from_contents(label: str, datatype: str, shape: tuple[int, ...], contents) -> np.ndarray:
    if datatype not in CONTENTS:
        raise BadRequest(f"{label}: {datatype} data must be sent in raw_input_contents "
                         "(the protocol has no typed field for it)")
    field, wide = CONTENTS[datatype]
    given = [f.name for f, _ in contents.ListFields()]
    if any(name != field for name in given):
        raise BadRequest(f"{label}: {datatype} data goes in contents.{field}, got "
                         f"contents.{', contents.'.join(given)}")
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


def infer_response(name: str, version: str, request_id: str,
                   results: list[tuple[codecs.RequestedOutput, np.ndarray]]) -> bytes:
    """A serialized ModelInferResponse with every output in raw_output_contents."""
    response = pb.ModelInferResponse(model_name=name, model_version=version, id=request_id)
    for requested, array in results:
        response.outputs.add(name=requested.name, datatype=codecs.datatype_of(array),
                             shape=array.shape)
        response.raw_output_contents.append(codecs.binary_bytes(array))
    return response.SerializeToString()


# ---------------------------------------------------------------- the service


class Servicer:
    """One method per RPC; errors are raised as MserveError and mapped in ``_rpc``."""

    def __init__(self, serving: Serving):
        self.s = serving

    async def server_live(self, request, context, headers):
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request, context, headers):
        return pb.ServerReadyResponse(ready=self.s.active is not None)

    async def model_ready(self, request, context, headers):
        self.s.check_name(request.name)
        try:
            self.s.model(request.name, request.version or None)
        except (NotFound, Unavailable):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def server_metadata(self, request, context, headers):
        return pb.ServerMetadataResponse(**SERVER_METADATA)

    async def model_metadata(self, request, context, headers):
        s = self.s
        model = s.model(request.name, request.version or None)
        meta = codecs.model_metadata(s.name, [str(n) for n in sorted(s.models)],
                                     model.inputs, model.outputs)
        return json_format.ParseDict(meta, pb.ModelMetadataResponse())

    async def model_statistics(self, request, context, headers):
        s = self.s
        if not request.name:  # every model this port serves: this one
            docs = s.statistics(None)
        else:
            model = s.model(request.name, request.version or None)
            docs = s.statistics(model.number if request.version else None)
        return json_format.ParseDict({"model_stats": docs}, pb.ModelStatisticsResponse(),
                                     ignore_unknown_fields=True)

    async def model_infer(self, raw: bytes, context, headers: dict[str, str]) -> bytes:
        """Raw bytes in and out: the sizes go to the request log, and a message that does
        not parse is INVALID_ARGUMENT rather than a transport error."""
        s = self.s
        call = Call(started=time.perf_counter(), request_id=headers.get("x-request-id"),
                    client=_peer(context))
        try:
            msg = pb.ModelInferRequest.FromString(raw)
        except DecodeError:
            raise BadRequest("the request is not a valid ModelInferRequest message") from None
        model = s.model(msg.model_name, msg.model_version or None, None, headers)
        call.version = model.number
        try:
            with s.recorded(call):
                call.bytes_in = len(raw)
                request = infer_request(msg, s.max_elements)
                results = await s.infer(model, request, call)
                out = infer_response(s.name, str(model.number), msg.id, results)
                call.status, call.bytes_out = 200, len(out)
        except Exception:  # the version was chosen: the error's trailers name it
            context.set_trailing_metadata((("x-model-version", str(model.number)),))
            raise
        return out

    def _rpc(self, method, *, open_: bool = False):
        """``method`` behind the token check (unless open) and the error mapping."""
        async def handle(request, context):
            try:
                headers = _headers(context)  # read once: each read builds the metadata anew
                if not open_:
                    self.s.authorize(headers.get("authorization"))
                return await method(request, context, headers)
            except MserveError as exc:
                await context.abort(status_code(exc), exc.message)
            except Exception:
                log.exception("unexpected error in gRPC %s", method.__name__)
                await context.abort(grpc.StatusCode.INTERNAL,
                                    "internal error (see the deployment log)")
        return handle

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(method, request_type, open_=False):
            return grpc.unary_unary_rpc_method_handler(
                self._rpc(method, open_=open_), request_deserializer=request_type.FromString,
                response_serializer=_serialize)

        return grpc.method_handlers_generic_handler(SERVICE, {
            "ServerLive": unary(self.server_live, pb.ServerLiveRequest, open_=True),
            "ServerReady": unary(self.server_ready, pb.ServerReadyRequest, open_=True),
            "ModelReady": unary(self.model_ready, pb.ModelReadyRequest),
            "ServerMetadata": unary(self.server_metadata, pb.ServerMetadataRequest),
            "ModelMetadata": unary(self.model_metadata, pb.ModelMetadataRequest),
            "ModelStatistics": unary(self.model_statistics, pb.ModelStatisticsRequest),
            "ModelInfer": grpc.unary_unary_rpc_method_handler(self._rpc(self.model_infer)),
        })


def _serialize(message) -> bytes:
    return message.SerializeToString()


def _headers(context) -> dict[str, str]:
    """The call's text metadata as headers (token, request id, sticky splits)."""
    return {item.key: item.value for item in context.invocation_metadata() or ()
            if isinstance(item.value, str)}


def _peer(context) -> str | None:
    """'ipv4:127.0.0.1:5000' -> '127.0.0.1:5000', as the HTTP request log writes clients."""
    peer = context.peer()
    return unquote(peer.partition(":")[2]) if peer else None


async def start_grpc(serving: Serving, host: str, port: int, tls: dict | None,
                     max_message_bytes: int) -> aio.Server:
    """Bind ``host:port`` and start serving; a port that cannot be bound raises RuntimeError
    (grpcio's error), an unreadable certificate or key OSError."""
    limit = min(max_message_bytes, 2**31 - 1)
    server = aio.server(options=[
        ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0),  # a busy port must fail, not be shared with its holder
    ])
    server.add_generic_rpc_handlers((Servicer(serving).handler(),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if tls:
        pair = (Path(tls["key"]).read_bytes(), Path(tls["cert"]).read_bytes())
        server.add_secure_port(address, grpc.ssl_server_credentials([pair]))
    else:
        server.add_insecure_port(address)
    await server.start()
    return server
