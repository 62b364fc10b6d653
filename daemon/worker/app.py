"""The HTTP routes of one deployment's worker, over what it serves (serving.py).

Routes: Open Inference Protocol v2 inference (version-pinned paths and Triton's binary tensor
extension) and TF Serving / KServe V1 ``:predict`` here; health, metadata, model config,
statistics, repository index and ``/metrics`` in routes.py. Every error is
``{"error": ...}`` with the status of its exception.
"""

from __future__ import annotations

import logging
import re
import sys
import time

from mserve.daemon.errors import BadRequest, MserveError
from mserve.daemon.protocol import codecs, codecs_v1
from mserve.daemon.worker import routes
from mserve.daemon.worker.http import HttpServer, Request, Response
from mserve.daemon.worker.requestlog import Call
from mserve.daemon.worker.routes import JSON, OPEN_PATHS, V1_MODEL, V2_MODEL
from mserve.daemon.worker.runtime import LoadedModel
from mserve.daemon.worker.serving import Serving

log = logging.getLogger("mserve.worker")
# Larger bodies are decoded, and answers with more elements encoded, in a codec thread, so
# the event loop goes on answering (health checks included) while a large request is read;
# smaller ones stay on the loop, where they cost no thread hop.
OFF_LOOP_BYTES = 64 * 1024
OFF_LOOP_ELEMENTS = 16384


class WorkerApp:
    """Route, authorize and answer one buffered request (``http.Request``)."""

    def __init__(self, serving: Serving):
        self.s = serving
        self.http: HttpServer | None = None  # the server, to know whether others wait
        self.unrecorded: list[Call] = []  # answered calls whose accounting waits (see after)

    def after(self) -> None:
        """Record the calls answered so far: the HTTP server calls this once an answer is
        written, so counting, statistics and the request log cost the client no latency."""
        self.s.record_answered(self.unrecorded)

    def _alone(self) -> bool:
        """No other request is waiting in this worker's HTTP server."""
        return self.http is not None and self.http.pending <= 1

    async def __call__(self, request: Request) -> Response:
        request_id = request.headers.get("x-request-id")
        try:
            if request.path not in OPEN_PATHS:
                self.s.authorize(request.headers.get("authorization"))
            status, body, headers = await self._route(request)
        except Exception as exc:
            status, body, headers = _failure(request, exc)
        if request_id is not None:
            headers = [*headers, (b"x-request-id", request_id.encode("latin-1"))]
        return status, headers, body

    async def _route(self, request: Request):
        path, method = request.path, request.method
        if method == "GET":
            return await routes.get(self.s, path)
        if method == "POST":
            if m := V2_MODEL.fullmatch(path):
                if m["op"] == "/infer":
                    return await self._inference(m, request, self._v2)
            elif (m := V1_MODEL.fullmatch(path)) and m["op"]:
                return await self._inference(m, request, self._v1)
            elif path.startswith("/v2/repository/"):
                if (answer := routes.repository(self.s, path, request.body)) is not None:
                    return answer
        elif method == "HEAD" and routes.allowed(path) == routes.GET_ALLOW:
            return await routes.get(self.s, path)  # the server sends GET's head without its body
        raise routes.unrouted(method, path)

    async def _inference(self, m: re.Match, request: Request, handler):
        """The shared life of an inference request: handle, record, answer."""
        body = request.body
        call = Call(started=time.perf_counter(), request_id=request.headers.get("x-request-id"),
                    client=request.client, bytes_in=len(body), headers=request.headers)
        model = self.s.model(m["name"], m["version"], m["label"], request.headers)
        call.version = model.number
        version = (b"x-model-version", str(model.number).encode())
        try:
            with self.s.recorded(call, self.unrecorded):
                if self.s.log.payloads:
                    call.payload_in = body
                out, headers = await handler(model, request, call)
                call.status, call.bytes_out = 200, len(out)
                if self.s.log.payloads:
                    call.payload_out = out
        except Exception as exc:  # the version was chosen: its answer names it, errors too
            status, out, headers = _failure(request, exc)
            return status, out, [*headers, version]
        headers.append(version)
        return 200, out, headers

    async def _v2(self, model: LoadedModel, request: Request, call: Call):
        header_length = _int_header(request.headers, "inference-header-content-length")
        start = time.perf_counter()  # decode and encode times: Triton's compute_input/output
        args = (codecs.parse_request, request.body, header_length)
        kwargs = {"max_elements": self.s.max_elements, "inputs": model.inputs,
                  "outputs": model.outputs}
        if len(request.body) > OFF_LOOP_BYTES:
            parsed = await self.s.off_loop(*args, **kwargs)
        else:
            parsed = codecs.parse_request(*args[1:], **kwargs)
        call.input_s = time.perf_counter() - start
        results = await self.s.infer(model, parsed, call, self._alone())
        start = time.perf_counter()
        args = (codecs.encode_response, self.s.name, str(model.number), parsed.id, results)
        if sum(array.size for _, array in results) > OFF_LOOP_ELEMENTS:
            out, headers = await self.s.off_loop(*args)
        else:
            out, headers = codecs.encode_response(*args[1:])
        call.output_s = time.perf_counter() - start
        return out, [(k.encode(), v.encode()) for k, v in headers.items()]

    async def _v1(self, model: LoadedModel, request: Request, call: Call):
        start = time.perf_counter()
        args, limit = (request.body, model.inputs), self.s.max_elements
        if len(request.body) > OFF_LOOP_BYTES:
            feeds, form = await self.s.off_loop(codecs_v1.parse_predict, *args, max_elements=limit)
        else:
            feeds, form = codecs_v1.parse_predict(*args, max_elements=limit)
        call.input_s = time.perf_counter() - start
        outputs = await self.s.outputs(model, feeds, call, self._alone())
        start = time.perf_counter()
        if sum(array.size for array in outputs.values()) > OFF_LOOP_ELEMENTS:
            out = await self.s.off_loop(codecs_v1.encode_predict, outputs, form)
        else:
            out = codecs_v1.encode_predict(outputs, form)
        call.output_s = time.perf_counter() - start
        return out, list(JSON)


def _failure(request: Request, exc: Exception) -> tuple[int, bytes, list]:
    """The answer to a request that raised ``exc``: its status and message for an
    MserveError (503 with Retry-After), else a logged 500."""
    if isinstance(exc, MserveError):
        if exc.status == 405:
            return 405, codecs.encode_error(exc.message), JSON + [(b"allow", exc.allow.encode())]
        if exc.status == 503:
            return 503, codecs.encode_error(exc.message), JSON + [(b"retry-after", b"1")]
        return exc.status, codecs.encode_error(exc.message), JSON
    log.error("unexpected error on %s %s", request.method, request.path, exc_info=exc)
    return 500, codecs.encode_error("internal error (see the deployment log)"), JSON


def _int_header(headers: dict[str, str], key: str) -> int | None:
    value = headers.get(key)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"header {key} must be an integer, got {value!r}") from None


def configure_logging() -> None:
    """The worker log's lines; the pid tells a --workers group's processes apart (they
    write one file)."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
