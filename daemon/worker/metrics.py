"""Prometheus metrics of one worker, served at ``GET /metrics``.

Every name starts with ``mserve_``; ``docs/metrics.md`` lists them. Each worker has its own
registry, so a scrape shows exactly one deployment, and every per-request or per-run series
carries ``model`` (the deployment's name) and ``version`` labels.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Gauge, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# 100 µs .. 10 s, roughly ×2.5 a step.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The registry of one worker. Every per-request series carries ``model`` (the
    deployment's name) and ``version``, as Triton labels its series, so one Prometheus can
    scrape many deployments without relabeling."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, deployment: str):
        self.model = deployment
        self.registry = registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=registry, namespace="mserve")
        # Per request and per run, on the event loop only: plain counters, turned into metric
        # families when scraped (prometheus-client's locked children cost ~5 % of a busy
        # worker).
        self.requests: dict[tuple[str, str, str], int] = {}  # (version, outcome, code)
        self.latency: dict[str, LoopHistogram] = {}
        self.versions: dict[str, RunMetrics] = {}
        self.refusals: dict[tuple[str, str], int] = {}  # (protocol, reason)
        registry.register(_LoopCollector(self))
        self.load_time = Gauge(
            "mserve_model_load_seconds", "Time to load and warm up each loaded version.",
            ["model", "version"], registry=registry)
        self.info = Gauge("mserve_deployment_info", "The deployment this worker serves.",
                          ["deployment"], registry=registry)
        self.info.labels(deployment).set(1)
        self._keys: dict[tuple[str, int], tuple[str, str, str]] = {}
        self._gpu = None  # gpumetrics.GpuCollector, once a version runs on a card

    def version(self, version: str) -> RunMetrics:
        """The run-side figures of one version (what its batcher updates)."""
        run = self.versions.get(version)
        if run is None:
            run = self.versions[version] = RunMetrics()
        return run

    def loaded(self, version: str, seconds: float) -> None:
        self.load_time.labels(self.model, version).set(seconds)

    def unloaded(self, version: str) -> None:
        """A version no longer loaded: its load time goes; its counters stay (they count)."""
        try:
            self.load_time.remove(self.model, version)
        except KeyError:
            pass

    def observe_request(self, version: str, status: int, seconds: float) -> None:
        key = self._keys.get((version, status))
        if key is None:
            outcome = "success" if status < 400 else "cancelled" if status == 499 else "failure"
            key = self._keys[version, status] = (version, outcome, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        if status < 400:
            latency = self.latency.get(version)
            if latency is None:
                latency = self.latency[version] = LoopHistogram()
            latency.observe(seconds)

    def observe_pipeline(self, version: str, pre_s: float, post_s: float | None) -> None:
        """A request's time in its version's transformer (preprocess, postprocess)."""
        run = self.version(version)
        run.preprocess_time.observe(pre_s)
        if post_s is not None:
            run.postprocess_time.observe(post_s)

    def rejected(self, protocol: str, reason: str, inference: bool) -> None:
        """A call refused by a limit before a version was chosen (a gRPC call past the cap
        of calls or bytes). An inference call also counts as a request that failed with 503,
        as an HTTP request refused by a full queue does, with an empty ``version``."""
        key = (protocol, reason)
        self.refusals[key] = self.refusals.get(key, 0) + 1
        if inference:
            self.observe_request("", 503, 0.0)

    def on_gpu(self, card: int) -> None:
        """A version loaded on CUDA card ``card``: /metrics shows the cards' figures from
        now on (gpumetrics.py), where NVML can be had."""
        if self._gpu is None:
            from mserve.daemon.worker import gpumetrics

            if (nvml := gpumetrics.nvml()) is None:
                return
            self._gpu = gpumetrics.GpuCollector(nvml, set())
            self.registry.register(self._gpu)
        self._gpu.cards.add(card)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RunMetrics:
    """One version's queue and run figures, updated by its batcher on the event loop."""

    __slots__ = ("queue_time", "inference_time", "batch_size", "inline_runs", "depth",
                 "preprocess_time", "postprocess_time")

    def __init__(self):
        self.queue_time = LoopHistogram()
        self.inference_time = LoopHistogram()
        self.batch_size = LoopHistogram(BATCH_BUCKETS)
        self.preprocess_time = LoopHistogram()  # a transformer's, per request
        self.postprocess_time = LoopHistogram()
        self.inline_runs = 0
        self.depth = 0  # requests waiting for or in a model run


class LoopHistogram:
    """A histogram updated from the event loop only: plain ints, no lock."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple = LATENCY_BUCKETS):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative (le, count) pairs, as the exposition format wants them."""
        total, out = 0, []
        for bound, count in zip([*map(_le, self.bounds), "+Inf"], self.counts):
            total += count
            out.append((bound, total))
        return out


class _LoopCollector:
    """Exposes the loop-side figures of ``Metrics`` at scrape time."""

    RUNS = (("mserve_queue_duration_seconds",
             "Time a request waited before its model run began.", "queue_time"),
            ("mserve_inference_duration_seconds", "Duration of one session.run (one batch).",
             "inference_time"),
            ("mserve_batch_size", "Requests combined into one model run.", "batch_size"),
            ("mserve_request_preprocess_seconds",
             "Time in the transformer's preprocess, per request.", "preprocess_time"),
            ("mserve_request_postprocess_seconds",
             "Time in the transformer's postprocess, per request.", "postprocess_time"))

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def collect(self):
        model = self.m.model
        requests = CounterMetricFamily(
            "mserve_requests", "Inference requests by version, outcome and HTTP status "
            "(499: cancelled by the client).", labels=["model", "version", "outcome", "code"])
        for labels, count in sorted(self.m.requests.items()):
            requests.add_metric([model, *labels], count)
        yield requests
        latency = HistogramMetricFamily(
            "mserve_request_duration_seconds",
            "Inference request latency, body read to answer written.",
            labels=["model", "version"])
        for version, histogram in sorted(self.m.latency.items()):
            latency.add_metric([model, version], histogram.buckets(), histogram.sum)
        yield latency
        refused = CounterMetricFamily(
            "mserve_rejected", "Calls refused by a limit before they were read or run, by "
            "protocol and limit (gRPC: RESOURCE_EXHAUSTED; calls: too many in progress, "
            "bytes: too many request bytes held).", labels=["model", "protocol", "reason"])
        for labels, count in sorted(self.m.refusals.items()):
            refused.add_metric([model, *labels], count)
        yield refused
        yield from self._runs(model, sorted(self.m.versions.items()))

    def _runs(self, model: str, versions: list[tuple[str, RunMetrics]]):
        labels = ["model", "version"]
        for name, text, attribute in self.RUNS:
            family = HistogramMetricFamily(name, text, labels=labels)
            for version, run in versions:
                histogram = getattr(run, attribute)
                family.add_metric([model, version], histogram.buckets(), histogram.sum)
            yield family
        depth = GaugeMetricFamily("mserve_queue_depth",
                                  "Requests waiting for or in a model run.", labels=labels)
        inline = CounterMetricFamily(
            "mserve_inline_runs", "Model runs made on the event loop for a lone request "
            "(no thread hand-off).", labels=labels)
        for version, run in versions:
            depth.add_metric([model, version], run.depth)
            inline.add_metric([model, version], run.inline_runs)
        yield depth
        yield inline


def _le(bound: float) -> str:
    """A bucket bound as prometheus-client writes it (1 -> '1.0')."""
    return str(float(bound))
