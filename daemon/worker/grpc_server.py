"""The Open Inference Protocol's gRPC service (``inference.GRPCInferenceService``) on a
deployment's gRPC port, in the worker's event loop next to the HTTP server.

The RPCs are the HTTP routes over protobuf: the same ``Serving`` (versions, token, batching
queue, metrics, statistics, request log) and the same codec checks, so a bad request gets the
same message as over HTTP, as a gRPC status (INVALID_ARGUMENT, NOT_FOUND, ...). Inputs come as
typed ``contents`` or as ``raw_input_contents`` (Triton's binary layout; FP16 only raw);
outputs always go back raw, as Triton does.

Triton's extensions: ``ModelConfig`` and ``RepositoryIndex`` (daemon/protocol/modelconfig.py),
``ModelStreamInfer`` (grpc_stream.py), and the standard ``grpc.health.v1.Health``
(grpc_health.py, no token). ``RepositoryModelLoad``/``Unload`` refuse: versions change through
the daemon. Stopping drains (see ``GrpcServer.stop``).
"""

from __future__ import annotations

import asyncio
import contextlib
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
from mserve.daemon.protocol import modelconfig
from mserve.daemon.worker import codecs
from mserve.daemon.worker.app import Serving
from mserve.daemon.worker.grpc_health import Health
from mserve.daemon.worker.proto import grpc_service_pb2 as pb
from mserve.daemon.worker.requestlog import Call
from mserve.daemon.worker.routes import SERVER_METADATA

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
FINAL_GRACE_S = 1.0  # see GrpcServer.stop
MANAGED = "mserve manages versions itself: use 'mserve deploy' / 'mserve rollback'"


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


class InFlight:
    """Counts the calls in progress, so a drain knows when they are done."""

    def __init__(self):
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __enter__(self) -> None:
        self.count += 1
        self._idle.clear()

    def __exit__(self, *exc) -> None:
        self.count -= 1
        if not self.count:
            self._idle.set()

    async def idle(self, timeout: float) -> None:
        """Return once no call is in progress, or after ``timeout`` seconds."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)


class Servicer:
    """One method per RPC; errors are raised as MserveError and mapped in ``_rpc``."""

    def __init__(self, serving: Serving):
        self.s = serving
        self.inflight = InFlight()  # every call but health's
        self.draining = False
        self.streams: set = set()  # the open ModelStreamInfer calls (grpc_stream.Stream)

    def drain(self) -> None:
        """Take no new inference; open streams end once they answered what they read."""
        self.draining = True
        for stream in list(self.streams):
            stream.drain()

    def ready(self) -> bool:
        return self.s.active is not None and not self.draining

    async def server_live(self, request, context, headers):
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request, context, headers):
        return pb.ServerReadyResponse(ready=self.ready())

    async def model_ready(self, request, context, headers):
        self.s.check_name(request.name)
        try:
            self.s.model(request.name, request.version or None)
        except (NotFound, Unavailable):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not self.draining)

    async def server_metadata(self, request, context, headers):
        return pb.ServerMetadataResponse(**SERVER_METADATA)

    async def model_metadata(self, request, context, headers):
        s = self.s
        model = s.model(request.name, request.version or None)
        meta = codecs.model_metadata(s.name, [str(n) for n in sorted(s.models)],
                                     model.inputs, model.outputs)
        return json_format.ParseDict(meta, pb.ModelMetadataResponse())

    async def model_config(self, request, context, headers):
        """Triton's configuration of the pinned version, else of the active one (not one
        picked by a traffic split: the configuration is not a request)."""
        s = self.s
        version = request.version or (str(s.active) if s.active is not None else None)
        model = s.model(request.name, version)
        doc = modelconfig.model_config(s.name, model, s.options, versions=sorted(s.models))
        return pb.ModelConfigResponse(config=json_format.ParseDict(doc, pb.ModelConfig()))

    async def repository_index(self, request, context, headers):
        s = self.s
        states = [(n, "active" if n == s.active else "loaded") for n in sorted(s.models)]
        models = modelconfig.repository_index(s.name, states)
        if request.ready:
            models = [m for m in models if m["state"] == modelconfig.READY]
        return json_format.ParseDict({"models": models}, pb.RepositoryIndexResponse())

    async def repository_change(self, request, context, headers):
        """RepositoryModelLoad and RepositoryModelUnload."""
        self.s.check_name(request.model_name)
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, MANAGED)

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
        call = Call(started=time.perf_counter(), request_id=headers.get("x-request-id"),
                    client=_peer(context))
        try:
            return await self.infer(raw, call, headers)
        except Exception:  # the version was chosen: the error's trailers name it
            if call.version is not None:
                context.set_trailing_metadata((("x-model-version", str(call.version)),))
            raise

    async def infer(self, raw: bytes, call: Call, headers: dict[str, str]) -> bytes:
        """One serialized ModelInferRequest to its serialized ModelInferResponse (a unary
        call, or one message of a stream), recorded however it ends once a version is
        chosen; ``call.version`` says which."""
        s = self.s
        if self.draining:
            raise Unavailable(f"deployment '{s.name}' is shutting down; retry shortly")
        decoding = time.perf_counter()
        try:
            msg = pb.ModelInferRequest.FromString(raw)
        except DecodeError:
            raise BadRequest("the request is not a valid ModelInferRequest message") from None
        call.request_id = call.request_id or msg.id or None
        model = s.model(msg.model_name, msg.model_version or None, None, headers)
        call.version = model.number
        with s.recorded(call):
            call.bytes_in = len(raw)
            request = infer_request(msg, s.max_elements)
            call.input_s = time.perf_counter() - decoding
            results = await s.infer(model, request, call)
            encoding = time.perf_counter()
            out = infer_response(s.name, str(model.number), msg.id, results)
            call.output_s = time.perf_counter() - encoding
            call.status, call.bytes_out = 200, len(out)
        return out

    def _rpc(self, method, *, open_: bool = False):
        """``method`` behind the token check (unless open) and the error mapping."""
        async def handle(request, context):
            try:
                with self.inflight:
                    headers = _headers(context)  # read once: each read builds it anew
                    if not open_:
                        self.s.authorize(headers.get("authorization"))
                    return await method(request, context, headers)
            except MserveError as exc:
                await context.abort(status_code(exc), exc.message)
            except aio.AbortError:  # the method chose its status itself
                raise
            except Exception:
                log.exception("unexpected error in gRPC %s", method.__name__)
                await context.abort(grpc.StatusCode.INTERNAL,
                                    "internal error (see the deployment log)")
        return handle

    def handler(self) -> grpc.GenericRpcHandler:
        # imported here: grpc_stream uses this module's helpers
        from mserve.daemon.worker.grpc_stream import stream_handler

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
            "ModelConfig": unary(self.model_config, pb.ModelConfigRequest),
            "ModelStatistics": unary(self.model_statistics, pb.ModelStatisticsRequest),
            "RepositoryIndex": unary(self.repository_index, pb.RepositoryIndexRequest),
            "RepositoryModelLoad": unary(self.repository_change,
                                         pb.RepositoryModelLoadRequest),
            "RepositoryModelUnload": unary(self.repository_change,
                                           pb.RepositoryModelUnloadRequest),
            "ModelInfer": grpc.unary_unary_rpc_method_handler(self._rpc(self.model_infer)),
            "ModelStreamInfer": stream_handler(self),
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


class GrpcServer:
    """The started gRPC server of a worker; ``stop`` drains it."""

    def __init__(self, server: aio.Server, servicer: Servicer, health: Health):
        self.server, self.servicer, self.health = server, servicer, health

    async def stop(self, grace: float) -> None:
        """Drain, then stop. Health turns NOT_SERVING at once (watchers are told), new
        inference gets UNAVAILABLE, open streams end with UNAVAILABLE once they answered
        what they had read, and the calls in progress get up to ``grace`` seconds. The port
        keeps answering meanwhile, so a probe reads NOT_SERVING, not a refused connection."""
        self.servicer.drain()
        self.health.drain()
        await self.servicer.inflight.idle(grace)
        # what is left: health watches sending their last status (they then end), and
        # calls past the grace, cut after a last second
        await self.server.stop(FINAL_GRACE_S)


async def start_grpc(serving: Serving, host: str, port: int, tls: dict | None,
                     max_message_bytes: int) -> GrpcServer:
    """Bind ``host:port`` and start serving; a port that cannot be bound raises RuntimeError
    (grpcio's error), an unreadable certificate or key OSError."""
    limit = min(max_message_bytes, 2**31 - 1)
    server = aio.server(options=[
        ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0),  # a busy port must fail, not be shared with its holder
    ])
    servicer, health = Servicer(serving), Health(serving)
    server.add_generic_rpc_handlers((servicer.handler(), health.handler()))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if tls:
        pair = (Path(tls["key"]).read_bytes(), Path(tls["cert"]).read_bytes())
        server.add_secure_port(address, grpc.ssl_server_credentials([pair]))
    else:
        server.add_insecure_port(address)
    await server.start()
    return GrpcServer(server, servicer, health)
