"""The worker's Prometheus exposition, rendered and parsed back (prometheus-client's parser):
the loop-side counters and histograms read as ordinary metric families."""

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
    m.queue_time.observe(0.004)
    m.batch_size.observe(3)
    m.inference_time.observe(0.002)
    m.inline_runs += 2
    got = samples(m)
    ok = (("code", "200"), ("outcome", "success"), ("version", "2"))
    assert got["mserve_requests_total", ok] == 4
    assert got["mserve_requests_total", (("code", "400"), ("outcome", "failure"),
                                         ("version", "2"))] == 1
    assert got["mserve_requests_total", (("code", "499"), ("outcome", "cancelled"),
                                         ("version", "2"))] == 1

    def bucket(name, le, **labels):
        return got[name + "_bucket", tuple(sorted({"le": le, **labels}.items()))]

    name = "mserve_request_duration_seconds"
    assert bucket(name, "0.0001", version="2") == 1  # le is inclusive
    assert bucket(name, "0.0005", version="2") == 2
    assert bucket(name, "0.25", version="2") == 3
    assert bucket(name, str(LATENCY_BUCKETS[-1]), version="2") == 3
    assert bucket(name, "+Inf", version="2") == 4
    assert got[name + "_count", (("version", "2"),)] == 4  # failures are not timed
    assert abs(got[name + "_sum", (("version", "2"),)] - 99.2004) < 1e-9
    assert bucket("mserve_queue_duration_seconds", "0.0025") == 0
    assert bucket("mserve_queue_duration_seconds", "0.005") == 1
    assert got["mserve_queue_depth", ()] == 0
    assert bucket("mserve_batch_size", "2.0") == 0 and bucket("mserve_batch_size", "4.0") == 1
    assert bucket("mserve_inference_duration_seconds", "0.0025") == 1
    assert got["mserve_inference_duration_seconds_count", ()] == 1
    assert got["mserve_inline_runs_total", ()] == 2
