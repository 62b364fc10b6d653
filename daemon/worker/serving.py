"""What one worker serves (``Serving``): the loaded versions of one deployment, their
batchers, routing (pins, labels, traffic splits, sticky headers), the token check, the
pipeline around a version with a transformer, and the accounting of every inference request
(metrics, Triton statistics, request log). The HTTP routes (app.py) and the gRPC service
(grpc_server.py) both serve through it.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hashlib
import hmac
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor

from mserve.daemon.errors import MserveError, NotFound, Unauthorized, Unavailable
from mserve.daemon.protocol import bigjson, codecs
from mserve.daemon.worker.batcher import Batcher
from mserve.daemon.worker.metrics import Metrics
from mserve.daemon.worker.requestlog import Call, RequestLog
from mserve.daemon.worker.runtime import LoadedModel
from mserve.daemon.worker.siblings import Siblings
from mserve.daemon.worker.stats import Recent, VersionStats

log = logging.getLogger("mserve.worker")
CANCELLED = 499  # the status recorded for a call its client cancelled (nginx's convention)


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
        self.siblings = Siblings(self)  # the deployment's other processes (--workers)
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
        if model.card is not None:
            self.metrics.on_gpu(model.card)
        settle_heap()

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
        if model.pipeline is None:
            wanted = codecs.check_outputs(request, model.outputs)
            arrays = await self.run(model, feeds, [o.name for o in wanted], call, alone)
            return list(zip(wanted, arrays))
        codecs.check_outputs(request, model.outputs)  # names it declares, or the model's
        outputs = await self.through_pipeline(model, feeds, call, alone)
        if request.outputs is None:
            return [(codecs.RequestedOutput(k, request.binary_output), v)
                    for k, v in model.pipeline.ordered(outputs).items()]
        return [(o, model.pipeline.pick(outputs, o.name)) for o in request.outputs]

    async def outputs(self, model: LoadedModel, feeds: dict, call: Call,
                      alone: bool = False) -> dict:
        """Every output of one checked request by name: the model's, or its transformer's."""
        if model.pipeline is not None:
            return model.pipeline.ordered(await self.through_pipeline(model, feeds, call, alone))
        names = [o.name for o in model.outputs]
        return dict(zip(names, await self.run(model, feeds, names, call, alone)))

    async def through_pipeline(self, model: LoadedModel, inputs: dict, call: Call,
                               alone: bool = False) -> dict:
        """Preprocess (this request alone), the model run (batched with others: run),
        postprocess (alone again); their times go into ``call``."""
        pipeline, start = model.pipeline, time.perf_counter()
        feeds = await pipeline.preprocess(inputs, call.headers or {}, model.graph_inputs)
        call.pre_s = time.perf_counter() - start
        names = [s.name for s in model.graph_outputs]
        arrays = await self.run(model, feeds, names, call, alone)
        start = time.perf_counter()
        outputs = await pipeline.postprocess(dict(zip(names, arrays)), inputs)
        call.post_s = time.perf_counter() - start
        return outputs

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

    def record_answered(self, calls: list[Call]) -> None:
        """Record the calls in ``calls`` (answered already) and empty it in place: a
        Recorded holds the list it was given, so swapping in a new one would lose calls."""
        answered = calls[:]
        calls.clear()
        for call in answered:
            try:
                self.record(call)
            except Exception:  # e.g. the request log's disk is full: the answer went out
                log.exception("could not record a request")

    def record(self, call: Call) -> None:
        """Count a finished inference request everywhere it is counted."""
        seconds = time.perf_counter() - call.started
        ok = call.status < 400
        self.metrics.observe_request(str(call.version), call.status, seconds)
        self.recent.observe(seconds, ok)
        if call.pre_s is not None:  # a transformer's share (Triton: compute_input/output)
            self.metrics.observe_pipeline(str(call.version), call.pre_s, call.post_s)
        if (stats := self.stats.get(call.version)) is not None:
            if ok:
                stats.observe_success(seconds, call.input_s + (call.pre_s or 0.0),
                                      call.infer_s, call.output_s + (call.post_s or 0.0))
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


def _collector_paused(function, *args, **kwargs):
    with bigjson.collector_paused():
        return function(*args, **kwargs)


def settle_heap() -> None:
    """Collect, then freeze what the worker holds now (its modules, the loaded versions), so
    the cycle collector's passes no longer walk them: a full pass over a loaded worker took
    ~30 ms on the event loop, an outlier in every client's p99 under load; after the freeze
    a pass walks only what requests made since. Frozen objects are still freed by their
    reference counts (a retired version's arrays go as before)."""
    gc.collect()
    gc.freeze()
