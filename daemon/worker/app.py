"""The data plane of one deployment: what it serves (``Serving``) and its HTTP routes.

Routes: Open Inference Protocol v2 inference (version-pinned paths and Triton's binary tensor
extension) and TF Serving / KServe V1 ``:predict`` here; health, metadata, model config,
statistics, repository index and ``/metrics`` in routes.py. Every error is
``{"error": ...}`` with the status of its exception.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from mserve.daemon.errors import BadRequest, MserveError, NotFound, Unauthorized, Unavailable
from mserve.daemon.worker import bigjson, codecs, codecs_v1, routes
from mserve.daemon.worker.batcher import Batcher
from mserve.daemon.worker.http import HttpServer, Request, Response
from mserve.daemon.worker.metrics import Metrics
from mserve.daemon.worker.requestlog import Call, RequestLog
from mserve.daemon.worker.stats import Recent, VersionStats
from mserve.daemon.worker.routes import JSON, OPEN_PATHS, V1_MODEL, V2_MODEL
from mserve.daemon.worker.runtime import LoadedModel

log = logging.getLogger("mserve.worker")
CANCELLED = 499  # the status recorded for a call its client cancelled (nginx's convention)
# Larger bodies are decoded, and answers with more elements encoded, in a codec thread, so
# the event loop goes on answering (health checks included) while a large request is read;
# smaller ones stay on the loop, where they cost no thread hop.
OFF_LOOP_BYTES = 64 * 1024
OFF_LOOP_ELEMENTS = 16384


class Serving:
    """What one worker serves: the loaded versions of one deployment and its options."""

    def __init__(self, name: str, *, token_hash: str | None = None, options: dict | None = None):
        options = options or {}
        self.name = name
        self.models: dict[int, LoadedModel] = {}
        self.batchers: dict[int, Batcher] = {}
        self.active: int | None = None
        self.leaving = False  # mserve serve's SIGTERM grace: not ready, still serving
        self.traffic: list[tuple[int, int]] | None = None  # (cumulative percent, version)
        self.labels: dict[str, int] = {}
        self.sticky: str | None = None  # header name, lower case
        self.token_hash = token_hash
        self.options = options
        self.max_body = int((options.get("max_body_mb") or 64) * 2**20)
        self.max_elements = int(options.get("max_elements") or codecs.DEFAULT_MAX_ELEMENTS)
        self.metrics = Metrics(name)
        self.stats: dict[int, VersionStats] = {}
        self.recent = Recent()
        self.log = RequestLog(options.get("request_log"), payloads=bool(options.get("log_payloads")))
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="infer")
        self.codec = ThreadPoolExecutor(max_workers=2, thread_name_prefix="codec")

    # ---- versions (changed by the daemon through the control channel) -----------------
    def add(self, model: LoadedModel) -> None:
        """Make ``model`` servable (pinned requests); call on the event loop."""
        old = self.batchers.pop(model.number, None)
        if old:
            old.close()
        self.models[model.number] = model
        self.stats.setdefault(model.number, VersionStats(batched=model.batchable))
        self.batchers[model.number] = Batcher(
            model, self.executor, self.metrics.version(str(model.number)),
            self.stats[model.number],
            max_batch_size=self.options.get("max_batch_size"),
            batch_delay_ms=self.options.get("batch_delay_ms"),
            max_queue=self.options.get("max_queue"))
        self.metrics.loaded(str(model.number), model.load_ms / 1000)

    def activate(self, number: int, keep: list[int]) -> None:
        """Swap the active version (one reference) and drop versions not kept loaded."""
        if number not in self.models:
            raise NotFound(f"version {number} is not loaded")
        self.active = number
        for n in list(self.models):
            if n != number and n not in keep:
                del self.models[n]  # in-flight requests hold their own reference
                self.batchers.pop(n).close()  # it finishes what is queued
                self.stats.pop(n, None)
                self.metrics.unloaded(str(n))

    def authorize(self, given: str | None) -> None:
        """Check an ``Authorization`` value (HTTP header or gRPC metadata) against the token."""
        if self.token_hash is None:
            return
        scheme, _, token = (given or "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(digest, self.token_hash):
            raise Unauthorized("missing or wrong token: send 'Authorization: Bearer <token>'")

    def check_name(self, name: str) -> None:
        if name != self.name:
            raise NotFound(f"model '{name}' not found; this port serves '{self.name}'")

    def model(self, name: str, version: str | None = None, label: str | None = None,
              headers: dict[str, str] | None = None) -> LoadedModel:
        """The version a request asked for (pinned, by label) or, unpinned, the active one,
        or one picked by the traffic split (sticky by header when configured)."""
        self.check_name(name)
        if label is not None:
            if label not in self.labels:
                raise NotFound(f"label '{label}' of model '{name}' is not defined")
            version = str(self.labels[label])
        if version is None:
            if self.active is None:
                raise Unavailable(f"model '{name}' is not ready")
            chosen = self._split(headers) if self.traffic else self.active
            return self.models.get(chosen) or self.models[self.active]
        # Only the canonical form names a version: int() would also take ' 1', '+1', '01'
        # or '0_1' (and non-ASCII digits), so many spellings of 1 would reach version 1.
        try:
            if not (version.isascii() and version.isdigit() and version[0] != "0"):
                raise KeyError(version)
            return self.models[int(version)]
        except KeyError:
            loaded = ", ".join(str(n) for n in sorted(self.models)) or "none"
            raise NotFound(f"version '{version}' of model '{name}' is not loaded "
                           f"(loaded: {loaded})") from None

    def route(self, traffic: dict | None, labels: dict | None, sticky: str | None) -> None:
        """Set the split of unpinned traffic ({version: percent}), labels and sticky header."""
        cumulative, total = [], 0
        for v, weight in sorted((int(k), w) for k, w in (traffic or {}).items()):
            if weight > 0:
                total += weight
                cumulative.append((total, v))
        self.traffic = cumulative or None
        self.labels = {k: int(v) for k, v in (labels or {}).items()}
        self.sticky = sticky.lower() if sticky else None

    def _split(self, headers: dict[str, str] | None) -> int:
        value = headers.get(self.sticky) if self.sticky and headers else None
        if value is None:
            point = random.random() * self.traffic[-1][0]
        else:  # the same header value always lands on the same point
            digest = hashlib.blake2b(value.encode("latin-1"), digest_size=8).digest()
            point = int.from_bytes(digest, "big") % 10_000 / 10_000 * self.traffic[-1][0]
        for bound, version in self.traffic:
            if point < bound:
                return version
        return self.traffic[-1][1]

    async def run(self, model: LoadedModel, feeds: dict, names: list[str], call: Call,
                  alone: bool = False) -> list:
        """Queue one request on its version's batcher (``alone``: see Batcher.submit); the
        time from its run's start to its outputs goes into ``call.infer_s``."""
        start = time.perf_counter()
        batcher = self.batchers.get(model.number)
        if batcher is None or batcher.closed or batcher.model is not model:
            # Unloaded while this request was read: it still finishes on its own version.
            loop = asyncio.get_running_loop()
            arrays = await loop.run_in_executor(self.executor, model.run, feeds, names)
        else:
            arrays = await batcher.submit(feeds, names, call, alone)
        waited = (call.queue_ms or 0.0) / 1000
        call.infer_s = max(0.0, time.perf_counter() - start - waited)
        return arrays

    async def infer(self, model: LoadedModel, request: codecs.InferRequest, call: Call,
                    alone: bool = False) -> list[tuple[codecs.RequestedOutput, object]]:
        """Check a decoded v2 request against ``model``, run it: (requested output, array)."""
        call.request_id = call.request_id or request.id
        feeds = codecs.check_inputs(request, model.inputs)
        wanted = codecs.check_outputs(request, model.outputs)
        arrays = await self.run(model, feeds, [o.name for o in wanted], call, alone)
        return list(zip(wanted, arrays))

    async def off_loop(self, function, *args, **kwargs):
        """``function(*args, **kwargs)`` in a codec thread: decoding or encoding a large body,
        with the cyclic garbage collector paused meanwhile (see bigjson.collector_paused)."""
        call = functools.partial(_collector_paused, function, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.codec, call)

    def recorded(self, call: Call, later: list[Call] | None = None) -> Recorded:
        """A context that records ``call`` however it ends (see Recorded); with ``later``, the
        call is appended there and recorded by whoever empties it (after the answer is sent,
        so the client does not wait for the accounting)."""
        return Recorded(self, call, later)

    def record(self, call: Call) -> None:
        """Count a finished inference request everywhere it is counted."""
        seconds = time.perf_counter() - call.started
        ok = call.status < 400
        self.metrics.observe_request(str(call.version), call.status, seconds)
        self.recent.observe(seconds, ok)
        if (stats := self.stats.get(call.version)) is not None:
            if ok:
                stats.observe_success(seconds, call.input_s, call.infer_s, call.output_s)
            else:
                stats.fail.add(seconds)
            stats.last_inference_ms = int(time.time() * 1000)
        self.log.write(call, seconds)

    def statistics(self, version: int | None) -> list[dict]:
        chosen = [version] if version is not None else sorted(self.stats)
        return [self.stats[n].to_json(self.name, n) for n in chosen if n in self.stats]


class Recorded:
    """Records a call when its block ends: an MserveError sets its status and error, a
    cancellation (a gRPC client gone) 499. A class rather than a generator context manager:
    it runs on every request."""

    __slots__ = ("serving", "call", "later")

    def __init__(self, serving: Serving, call: Call, later: list[Call] | None = None):
        self.serving, self.call, self.later = serving, call, later

    def __enter__(self) -> Call:
        return self.call

    def __exit__(self, kind, exc, tb) -> None:
        if isinstance(exc, MserveError):
            self.call.status, self.call.error = exc.status, exc.message
        elif isinstance(exc, asyncio.CancelledError):
            self.call.status, self.call.error = CANCELLED, "the client cancelled the call"
        if self.later is None:
            self.serving.record(self.call)
        else:
            self.later.append(self.call)


class WorkerApp:
    """Route, authorize and answer one buffered request (``http.Request``)."""

    def __init__(self, serving: Serving):
        self.s = serving
        self.http: HttpServer | None = None  # the server, to know whether others wait
        self.unrecorded: list[Call] = []  # answered calls whose accounting waits (see after)

    def after(self) -> None:
        """Record the calls answered so far: the HTTP server calls this once an answer is
        written, so counting, statistics and the request log cost the client no latency."""
        # The same list stays in place: calls answered later append to it (a Recorded
        # holds the list it was given), so swapping in a new one lost them.
        calls = self.unrecorded[:]
        self.unrecorded.clear()
        for call in calls:
            try:
                self.s.record(call)
            except Exception:  # e.g. the request log's disk is full: the answer went out
                log.exception("could not record a request")

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
            return routes.get(self.s, path)
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
            return routes.get(self.s, path)  # the server sends GET's head without its body
        raise routes.unrouted(method, path)

    async def _inference(self, m: re.Match, request: Request, handler):
        """The shared life of an inference request: handle, record, answer."""
        body = request.body
        call = Call(started=time.perf_counter(), request_id=request.headers.get("x-request-id"),
                    client=request.client, bytes_in=len(body))
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
        names = [o.name for o in model.outputs]
        arrays = await self.s.run(model, feeds, names, call, self._alone())
        start = time.perf_counter()
        outputs = dict(zip(names, arrays))
        if sum(array.size for array in arrays) > OFF_LOOP_ELEMENTS:
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


def _collector_paused(function, *args, **kwargs):
    with bigjson.collector_paused():
        return function(*args, **kwargs)


def _int_header(headers: dict[str, str], key: str) -> int | None:
    value = headers.get(key)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"header {key} must be an integer, got {value!r}") from None


def configure_logging() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
