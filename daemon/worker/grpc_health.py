"""The standard gRPC health service (``grpc.health.v1.Health``) on a deployment's gRPC port,
as grpc_health_probe, Kubernetes gRPC probes and load balancers ask it.

SERVING while the active version is loaded and the worker is not leaving, NOT_SERVING from
the moment it starts leaving: a SIGTERM's grace (main.Grace, inference still served) or the
drain (``GrpcServer.stop``); that is the last status a ``Watch`` sends before it ends. The
port answers during the whole drain, so a probe reads NOT_SERVING rather than a refused
connection. The services known are the whole server (""), the deployment's name and
the inference service's name; another is NOT_FOUND for ``Check`` and SERVICE_UNKNOWN for
``Watch``, as the protocol says. No token, like the HTTP health routes. Bytes that are not a
HealthCheckRequest are INVALID_ARGUMENT (parsed here, not by grpcio, which would log a
traceback for each).
"""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf.message import DecodeError

from mserve.daemon.worker.serving import Serving
from mserve.daemon.protocol.proto import health_pb2 as pb

SERVICE = "grpc.health.v1.Health"
Status = pb.HealthCheckResponse.ServingStatus


class Health:
    """Check and Watch for one worker."""

    def __init__(self, serving: Serving):
        self.s = serving
        self.services = frozenset({"", serving.name, "inference.GRPCInferenceService"})
        self.draining = False
        self._changed = asyncio.Event()  # replaced by a fresh one at each change

    def drain(self) -> None:
        self.draining = True
        self._changed.set()
        self._changed = asyncio.Event()

    def status(self, service: str) -> int:
        if service not in self.services:
            return Status.SERVICE_UNKNOWN
        if self.s.active is None or self.draining:
            return Status.NOT_SERVING
        return Status.SERVING

    async def check(self, raw: bytes, context) -> pb.HealthCheckResponse:
        request = await _request(raw, context)
        status = self.status(request.service)
        if status == Status.SERVICE_UNKNOWN:
            known = ", ".join(repr(name) for name in sorted(self.services))
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"unknown service {request.service[:100]!r}; known: {known}")
        return pb.HealthCheckResponse(status=status)

    async def watch(self, raw: bytes, context):
        """The status now, then each change. A drain's NOT_SERVING is the last: the call
        then ends (OK) rather than be cut by the server's stop, which could lose it."""
        request, last = await _request(raw, context), None
        while True:
            changed = self._changed
            if (status := self.status(request.service)) != last:
                yield pb.HealthCheckResponse(status=status)
                last = status
            if self.draining:
                return
            await changed.wait()

    def handler(self) -> grpc.GenericRpcHandler:
        serialize = pb.HealthCheckResponse.SerializeToString
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Check": grpc.unary_unary_rpc_method_handler(self.check,
                                                         response_serializer=serialize),
            "Watch": grpc.unary_stream_rpc_method_handler(self.watch,
                                                          response_serializer=serialize),
        })


async def _request(raw: bytes, context) -> pb.HealthCheckRequest:
    try:
        return pb.HealthCheckRequest.FromString(raw)
    except (DecodeError, ValueError):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            "the request is not a valid HealthCheckRequest message")
