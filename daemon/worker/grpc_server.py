"""The Open Inference Protocol's gRPC service (``inference.GRPCInferenceService``) on a
deployment's gRPC port, in the worker's event loop next to the HTTP server.

The RPCs are the HTTP routes over protobuf: the same ``Serving`` (versions, token, batching
queue, metrics, statistics, request log) and the same codec checks, so a bad request gets the
same message as over HTTP, as a gRPC status (INVALID_ARGUMENT, NOT_FOUND, ...). Inputs come as
typed ``contents`` or as ``raw_input_contents`` (Triton's binary layout; FP16 only raw);
outputs always go back raw, as Triton does (grpc_codec.py converts).

Every method reads its request message itself (a request-streaming handler, which a unary
client cannot tell apart), so the limits of grpc_limits.py apply before a message is read, and
bytes that are not a valid message are INVALID_ARGUMENT, never a traceback in the log. A
message of a megabyte or more is decoded, and a large answer encoded, in a small thread pool,
so the event loop (HTTP too, health checks included) keeps answering meanwhile.

Triton's extensions: ``ModelConfig`` and ``RepositoryIndex`` (daemon/protocol/modelconfig.py),
``ModelStreamInfer`` (grpc_stream.py), and the standard ``grpc.health.v1.Health``
(grpc_health.py, no token). ``RepositoryModelLoad``/``Unload`` refuse: versions change through
the daemon. Stopping drains, and a new message size limit applies at once (grpc_serve.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote

import grpc
from google.protobuf import json_format
from grpc import aio

from mserve.daemon.errors import BadRequest, MserveError, NotFound, Unavailable
from mserve.daemon.protocol import modelconfig
from mserve.daemon.protocol import codecs, grpc_codec
from mserve.daemon.worker.serving import Serving
from mserve.daemon.worker.grpc_limits import Busy, Limits, Settings
from mserve.daemon.protocol.proto import grpc_service_pb2 as pb
from mserve.daemon.worker.requestlog import Call
from mserve.daemon.worker.routes import SERVER_METADATA

log = logging.getLogger("mserve.worker")
SERVICE = "inference.GRPCInferenceService"
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
         503: grpc.StatusCode.UNAVAILABLE}
OFFLOAD_BYTES = 2**20  # messages (and answers) this large are converted off the event loop
MANAGED = "mserve manages versions itself: use 'mserve deploy' / 'mserve rollback'"
NO_MESSAGE = "the call carried no request message"


def status_code(exc: MserveError) -> grpc.StatusCode:
    """The gRPC status of an error that carries an HTTP status."""
    if isinstance(exc, Busy):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return CODES.get(exc.status, grpc.StatusCode.INTERNAL)


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

    def __init__(self, serving: Serving, max_message: int, settings: Settings | None = None):
        self.s = serving
        self.limits = Limits(settings or Settings.from_env(), max_message, serving.metrics)
        self.inflight = InFlight()  # every call but health's
        self.draining = self.refusing = False
        self.streams: set = set()  # the open ModelStreamInfer calls (grpc_stream.Stream)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grpc-codec")
        self.unrecorded: list[Call] = []  # answered calls whose accounting waits (_record)
        self._record_due = False
        self.loop: asyncio.AbstractEventLoop | None = None

    def drain(self, refuse: bool = True) -> None:
        """Open streams end once they answered what they read; with ``refuse``, new
        inference is refused (UNAVAILABLE). A process of a ``--workers`` group serves the
        calls that still come on its connections (its clients are sent to its siblings by
        GOAWAY), so that leaving the group fails none."""
        self.draining = True
        self.refusing = refuse
        for stream in list(self.streams):
            stream.drain()

    def ready(self) -> bool:
        return self.s.active is not None and not self.draining and not self.s.leaving

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
            docs = await s.siblings.statistics(None)
        else:
            model = s.model(request.name, request.version or None)
            docs = await s.siblings.statistics(model.number if request.version else None)
        return json_format.ParseDict({"model_stats": docs}, pb.ModelStatisticsResponse(),
                                     ignore_unknown_fields=True)

    async def model_infer(self, raw: bytes, context, headers: dict[str, str]) -> bytes:
        """Raw bytes in and out: the sizes go to the request log, and a message that does
        not parse is INVALID_ARGUMENT rather than a transport error."""
        call = Call(started=time.perf_counter(), request_id=headers.get("x-request-id"),
                    client=_peer(context), headers=headers)
        try:
            return await self.infer(raw, call, headers)
        except Exception:  # the version was chosen: the error's trailers name it
            if call.version is not None:
                context.set_trailing_metadata((("x-model-version", str(call.version)),))
            raise

    async def infer(self, raw: bytes, call: Call, headers: dict[str, str]) -> bytes:
        """One serialized ModelInferRequest to its serialized ModelInferResponse (a unary
        call, or one message of a stream), recorded however it ends once a version is
        chosen; ``call.version`` says which. Everything cheap is checked against the
        version's inputs before a tensor is decoded."""
        s = self.s
        if self.refusing:
            raise Unavailable(f"deployment '{s.name}' is shutting down; retry shortly")
        decoding = time.perf_counter()
        large = len(raw) >= OFFLOAD_BYTES
        if large:
            msg, chunks = await self.off_loop(grpc_codec.parse_request, raw)
        else:
            msg, chunks = grpc_codec.parse_request(raw)
        call.request_id = call.request_id or msg.id or None
        model = s.model(msg.model_name, msg.model_version or None, None, headers)
        call.version = model.number
        try:
            with s.recorded(call, self.unrecorded):
                call.bytes_in = len(raw)
                convert = grpc_codec.infer_request, msg, chunks, model.inputs, s.max_elements
                request = await self.off_loop(*convert) if large else convert[0](*convert[1:])
                del chunks, convert  # views of raw: the arrays keep what they need
                call.input_s = time.perf_counter() - decoding
                # alone: no other gRPC call in progress, nor taken by the native front end
                # and not started yet (the batcher checks its own queue)
                limits = self.limits
                results = await s.infer(model, request, call,
                                        limits.calls <= 1 and limits.accepted <= 1)
                del request
                encoding = time.perf_counter()
                encode = grpc_codec.infer_response, s.name, str(model.number), msg.id, results
                if grpc_codec.response_size(results) >= OFFLOAD_BYTES:
                    out = await self.off_loop(*encode)
                else:
                    out = encode[0](*encode[1:])
                call.output_s = time.perf_counter() - encoding
                call.status, call.bytes_out = 200, len(out)
        finally:  # after the call was appended: its accounting follows
            self._record_soon()
        return out

    def _record_soon(self) -> None:
        """Account the calls answered by then in the loop's next round, once grpcio took
        their answers, so the client does not wait for counting and the request log."""
        if not self._record_due:
            self._record_due = True
            self._loop().call_soon(self._record)

    def _loop(self) -> asyncio.AbstractEventLoop:
        """The worker's loop, looked up once (each lookup is a getpid() on Python 3.11)."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        return self.loop

    def _record(self) -> None:
        self._record_due = False
        self.s.record_answered(self.unrecorded)

    async def off_loop(self, function, *args):
        """``function(*args)`` in the codec pool, leaving the event loop free (for large
        messages; small ones are converted right away: a thread hand-off costs more)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)

    def _rpc(self, method, request_type, *, open_: bool = False, inference: bool = False):
        """``method`` behind the call cap, the token check (unless open), the byte budget
        and the error mapping; it gets the parsed request (raw bytes without a type)."""
        limits, inflight, authorize = self.limits, self.inflight, self.s.authorize

        async def handle(requests, context):
            # The status is set after the except blocks: an abort raised while handling an
            # error would chain it, and grpcio keeps the abort in a reference cycle with this
            # frame, so the request would stay in memory until a full garbage collection.
            raw, held = None, 0
            try:
                limits.enter(inference)
            except Busy as exc:
                failure = grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message
            else:
                try:
                    with inflight:
                        headers = _headers(context)  # read once: each read builds it anew
                        if not open_:
                            authorize(headers.get("authorization"))
                        limits.check_room(inference)
                        raw = await context.read()
                        if raw is aio.EOF:
                            raise BadRequest(NO_MESSAGE)
                        limits.take(size := len(raw), inference)
                        held = size
                        if request_type is not None:
                            raw = grpc_codec.parse_message(request_type, raw)
                        return await method(raw, context, headers)
                except MserveError as exc:
                    failure = status_code(exc), exc.message
                except aio.AbortError:  # the method chose its status itself
                    raise
                except Exception:
                    limits.unexpected(method.__name__)
                    failure = grpc.StatusCode.INTERNAL, "internal error (see the deployment log)"
                finally:
                    raw = None
                    limits.give(held)
                    limits.leave()
            await context.abort(*failure)
        return handle

    def handler(self) -> grpc.GenericRpcHandler:
        # imported here: grpc_stream uses this module's helpers
        from mserve.daemon.worker.grpc_stream import stream_handler

        def unary(method, request_type, open_=False):
            return grpc.stream_unary_rpc_method_handler(
                self._rpc(method, request_type, open_=open_), response_serializer=_serialize)

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
            "ModelInfer": grpc.stream_unary_rpc_method_handler(
                self._rpc(self.model_infer, None, inference=True)),
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


async def start_grpc(serving: Serving, host: str, port: int, tls: dict | None,
                     max_message_bytes: int, join: bool = False):
    """Bind ``host:port`` and start serving (see grpc_serve.GrpcServer)."""
    from mserve.daemon.worker.grpc_serve import GrpcServer

    return await GrpcServer.start(serving, host, port, tls, max_message_bytes, join)
