"""The worker's Prometheus exposition, rendered and parsed back (prometheus-client's parser):
the loop-side counters and histograms read as ordinary metric families, each labelled with
the deployment (``model``) and its version."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from mserve.daemon.worker.metrics import LATENCY_BUCKETS, Metrics


def samples(metrics: Metrics) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(metrics.render().decode())
            for s in family.samples}


def test_loop_counters_and_histograms_render_as_prometheus_families():
    m = Metrics("d")
    for seconds in (0.0001, 0.0003, 0.2, 99.0):  # on a bound, between, between, past the last
        m.observe_request("2", 200, seconds)
    m.observe_request("2", 400, 0.5)
    m.observe_request("2", 499, 0.5)
    run = m.version("2")
    run.queue_time.observe(0.004)
    run.batch_size.observe(3)
    run.inference_time.observe(0.002)
    run.inline_runs += 2
    got = samples(m)
    ok = (("code", "200"), ("model", "d"), ("outcome", "success"), ("version", "2"))
    assert got["mserve_requests_total", ok] == 4
    assert got["mserve_requests_total", (("code", "400"), ("model", "d"), ("outcome", "failure"),
                                         ("version", "2"))] == 1
    assert got["mserve_requests_total", (("code", "499"), ("model", "d"),
                                         ("outcome", "cancelled"), ("version", "2"))] == 1
    v2 = (("model", "d"), ("version", "2"))

    def bucket(name, le):
        return got[name + "_bucket", tuple(sorted({"le": le, **dict(v2)}.items()))]

    name = "mserve_request_duration_seconds"
    assert bucket(name, "0.0001") == 1  # le is inclusive
    assert bucket(name, "0.0005") == 2
    assert bucket(name, "0.25") == 3
    assert bucket(name, str(LATENCY_BUCKETS[-1])) == 3
    assert bucket(name, "+Inf") == 4
    assert got[name + "_count", v2] == 4  # failures are not timed
    assert abs(got[name + "_sum", v2] - 99.2004) < 1e-9
    assert bucket("mserve_queue_duration_seconds", "0.0025") == 0
    assert bucket("mserve_queue_duration_seconds", "0.005") == 1
    assert got["mserve_queue_depth", v2] == 0
    assert bucket("mserve_batch_size", "2.0") == 0 and bucket("mserve_batch_size", "4.0") == 1
    assert bucket("mserve_inference_duration_seconds", "0.0025") == 1
    assert got["mserve_inference_duration_seconds_count", v2] == 1
    assert got["mserve_inline_runs_total", v2] == 2


def test_each_version_has_its_own_series_and_load_time():
    m = Metrics("recs")
    m.loaded("1", 0.5)
    m.loaded("2", 0.25)
    m.version("1").depth = 3
    m.version("2").batch_size.observe(1)
    m.observe_request("1", 200, 0.01)
    m.unloaded("1")
    m.unloaded("7")  # never loaded: nothing to remove, no error
    got = samples(m)
    assert ("mserve_model_load_seconds", (("model", "recs"), ("version", "1"))) not in got
    assert got["mserve_model_load_seconds", (("model", "recs"), ("version", "2"))] == 0.25
    assert got["mserve_queue_depth", (("model", "recs"), ("version", "1"))] == 3
    assert got["mserve_queue_depth", (("model", "recs"), ("version", "2"))] == 0
    assert got["mserve_batch_size_count", (("model", "recs"), ("version", "2"))] == 1
    assert got["mserve_batch_size_count", (("model", "recs"), ("version", "1"))] == 0
    assert got["mserve_deployment_info", (("deployment", "recs"),)] == 1
    # every mserve_ series but the deployment's info and the process's names the model
    for (name, labels) in got:
        if name.startswith("mserve_") and not name.startswith(("mserve_process_",
                                                                "mserve_deployment_info")):
            assert ("model", "recs") in labels, name


def test_refused_calls_are_counted_by_protocol_and_limit():
    """A gRPC call refused by a limit before a version was chosen: counted by limit, and an
    inference call also as a request that failed with 503 (as a full HTTP queue's 503 is),
    with an empty version."""
    m = Metrics("d")
    m.rejected("grpc", "calls", True)
    m.rejected("grpc", "calls", True)
    m.rejected("grpc", "bytes", False)  # e.g. ModelMetadata: not an inference request
    got = samples(m)
    assert got["mserve_rejected_total", (("model", "d"), ("protocol", "grpc"),
                                         ("reason", "calls"))] == 2
    assert got["mserve_rejected_total", (("model", "d"), ("protocol", "grpc"),
                                         ("reason", "bytes"))] == 1
    assert got["mserve_requests_total", (("code", "503"), ("model", "d"), ("outcome", "failure"),
                                         ("version", ""))] == 2
    assert ("mserve_request_duration_seconds_count", (("model", "d"), ("version", ""))) \
        not in got
