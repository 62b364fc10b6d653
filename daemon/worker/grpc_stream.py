"""Triton's ``ModelStreamInfer``: a bidirectional stream of ModelInferRequests, each answered
by one ModelStreamInferResponse, in the order the requests came.

Every message takes the unary ModelInfer's path (``Servicer.infer``: routing, validation, the
batching queue, metrics, statistics, request log), so a request gets the same answer or the
same message either way. An error goes in that message's ``error_message``, with its ``id``
(and ``model_name``/``model_version`` once a version was chosen, as the unary call's trailers
say), and the stream goes on. Messages are worked on as they arrive, up to ``WINDOW``
unanswered at once, so the messages of one stream join one batch; each answer waits for
those before it. The token is checked once, from the stream's metadata: a missing or wrong
one ends the stream with UNAUTHENTICATED. A drain ends open streams with UNAVAILABLE once
the messages already read are answered.

A stream counts as one call against the worker's cap of calls in progress; each message it
holds counts against the byte budget until answered, and one that would pass it is answered
with that error (grpc_limits.py).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from mserve.daemon.errors import MserveError
from mserve.daemon.worker.grpc_limits import Busy
from mserve.daemon.worker.grpc_server import Servicer, _headers, _peer, status_code
from mserve.daemon.protocol.proto import grpc_service_pb2 as pb
from mserve.daemon.worker.requestlog import Call

log = logging.getLogger("mserve.worker")
WINDOW = 64  # unanswered messages per stream: a default batch, and a bound on memory
END, DRAINED = "end", "drained"  # what follows the last answer in Stream.answers


class Stream:
    """One ModelStreamInfer call: ``read`` starts each message's work as it arrives and
    queues its future in ``answers``, which the handler sends back in that order."""

    def __init__(self, servicer: Servicer, context):
        self.servicer, self.context = servicer, context
        self.name = servicer.s.name
        self.headers, self.peer = _headers(context), _peer(context)
        self.window = asyncio.Semaphore(WINDOW)
        self.answers: asyncio.Queue = asyncio.Queue()  # futures in order, then END/DRAINED

    def drain(self) -> None:
        """End the stream once the messages already read are answered."""
        self.answers.put_nowait(DRAINED)

    async def read(self, requests) -> None:
        try:
            async for raw in requests:
                await self.window.acquire()
                if self.servicer.draining:
                    break
                self.answers.put_nowait(asyncio.ensure_future(self.answer(raw)))
        except Exception as exc:  # the call broke while reading: the RPC is ending anyway
            log.debug("gRPC stream read failed: %r", exc)
        self.answers.put_nowait(END)

    async def answer(self, raw: bytes) -> bytes:
        """One message's serialized ModelStreamInferResponse."""
        call = Call(started=time.perf_counter(), client=self.peer, headers=self.headers)
        limits, held = self.servicer.limits, 0
        try:
            limits.take(len(raw), True)
            held = len(raw)
            return stream_response(await self.servicer.infer(raw, call, self.headers))
        except MserveError as exc:
            return stream_error(exc.message, call, self.name)
        except Exception:
            limits.unexpected("stream message")
            return stream_error("internal error (see the deployment log)", call, self.name)
        finally:
            limits.give(held)

    def close(self, reader: asyncio.Future) -> None:
        """Stop reading; cancel the work of messages whose answers will not be sent (they
        are recorded as cancelled, 499)."""
        reader.cancel()
        while not self.answers.empty():
            if isinstance(item := self.answers.get_nowait(), asyncio.Future):
                item.cancel()


def stream_handler(servicer: Servicer) -> grpc.RpcMethodHandler:
    """The ModelStreamInfer method: raw bytes in and out, as the unary ModelInfer."""
    async def handle(requests, context):
        try:
            servicer.limits.enter(True)
        except Busy as exc:
            await context.abort(status_code(exc), exc.message)
        try:
            stream = Stream(servicer, context)
            servicer.s.authorize(stream.headers.get("authorization"))
            if servicer.draining:
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"deployment '{stream.name}' is shutting down")
            with servicer.inflight:
                servicer.streams.add(stream)
                reader = asyncio.ensure_future(stream.read(requests))
                try:
                    while (item := await stream.answers.get()) != END:
                        if item == DRAINED:
                            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                                f"deployment '{stream.name}' is shutting down")
                        yield await item
                        stream.window.release()
                finally:
                    servicer.streams.discard(stream)
                    stream.close(reader)
        except MserveError as exc:
            await context.abort(status_code(exc), exc.message)
        finally:
            servicer.limits.leave()

    return grpc.stream_stream_rpc_method_handler(handle)


def stream_response(infer_response: bytes) -> bytes:
    """A ModelStreamInferResponse around an already serialized ModelInferResponse, without
    encoding it again: field 2 (``infer_response``), length-delimited, as protobuf writes it."""
    size, prefix = len(infer_response), bytearray(b"\x12")
    while size > 0x7F:
        prefix.append(size & 0x7F | 0x80)
        size >>= 7
    prefix.append(size)
    return bytes(prefix) + infer_response


def stream_error(message: str, call: Call, name: str) -> bytes:
    """The answer to a message that failed: its error, its id, and the version that refused
    it when one was chosen."""
    response = pb.ModelInferResponse(id=call.request_id or "")
    if call.version is not None:
        response.model_name, response.model_version = name, str(call.version)
    return pb.ModelStreamInferResponse(error_message=message,
                                       infer_response=response).SerializeToString()
