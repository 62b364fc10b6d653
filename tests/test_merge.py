"""Merging the figures of a deployment's worker processes (merge.py): two real workers'
metrics and statistics merge to what one worker that saw all their traffic reports."""

from __future__ import annotations

import math

import orjson
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mserve.daemon.worker.merge import merge_exposition, merge_statistics
from mserve.daemon.worker.metrics import Metrics
from mserve.daemon.worker.serving import Serving
from mserve.daemon.worker.stats import VersionStats


def families(text: str) -> list:
    return list(text_string_to_metric_families(text))


def samples(text: str, process: bool = False) -> dict:
    """(name, labels) -> value; without the process_* samples unless asked."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in families(text) for s in family.samples
            if process or not s.name.startswith("mserve_process_")}


# ---- exposition ------------------------------------------------------------------------

def traffic_a(m: Metrics) -> None:
    for seconds in (0.0001, 0.003, 0.003):
        m.observe_request("1", 200, seconds)
    m.observe_request("1", 500, 0.1)
    m.observe_request("2", 200, 0.02)
    m.rejected("grpc", "calls", inference=True)
    m.observe_pipeline("1", 0.001, 0.002)
    run = m.version("1")
    run.depth += 2
    run.queue_time.observe(0.004)
    run.inference_time.observe(0.002)
    run.batch_size.observe(3)
    run.inline_runs += 1
    m.version("2").batch_size.observe(1)


def traffic_b(m: Metrics) -> None:
    m.observe_request("2", 200, 4.0)
    m.observe_request("3", 200, 99.0)  # past the last bound
    m.observe_request("1", 499, 0.5)
    m.rejected("grpc", "bytes", inference=False)
    m.observe_pipeline("2", 0.01, None)
    run = m.version("1")
    run.depth += 1
    run.queue_time.observe(0.3)
    run.inference_time.observe(0.02)
    run.batch_size.observe(300)
    run.inline_runs += 4
    m.version("3").queue_time.observe(0.0002)


def test_two_workers_merge_to_one_that_saw_all_the_traffic():
    a, b, both = Metrics("d"), Metrics("d"), Metrics("d")
    traffic_a(a)
    traffic_b(b)
    traffic_a(both)
    traffic_b(both)
    a.loaded("1", 0.5)
    a.loaded("2", 0.25)
    b.loaded("1", 0.75)
    b.loaded("3", 0.125)
    for version, seconds in (("1", 0.75), ("2", 0.25), ("3", 0.125)):  # the slowest load
        both.loaded(version, seconds)
    merged = merge_exposition([generate_latest(m.registry).decode() for m in (a, b)])
    expected = generate_latest(both.registry).decode()
    assert merged.endswith("\n")
    assert samples(merged) == pytest.approx(samples(expected))  # sums of floats: approx
    assert [f.name for f in families(merged)] == [f.name for f in families(expected)]
    for got, want in zip(families(merged), families(expected)):
        assert (got.documentation, got.type) == (want.documentation, want.type)
        if got.type == "histogram":  # series in first-seen order, buckets by le, +Inf last
            assert [(s.name, s.labels) for s in got.samples] == \
                   [(s.name, s.labels) for s in want.samples]


def test_one_text_merges_to_itself():
    m = Metrics("d")
    traffic_a(m)
    m.loaded("1", 0.5)
    text = generate_latest(m.registry).decode()
    assert merge_exposition([text]) == text
    assert merge_exposition([]) == ""


def test_a_bucket_only_a_later_text_has_lands_in_le_order():
    def text(buckets: dict[str, int]) -> str:
        lines = "".join(f'h_bucket{{le="{le}"}} {n}\n' for le, n in buckets.items())
        return f"# HELP h H.\n# TYPE h histogram\n{lines}h_count {buckets['+Inf']}\nh_sum 1.0\n"

    merged = merge_exposition([text({"1.0": 1, "+Inf": 2}),
                               text({"0.5": 1, "1.0": 1, "10.0": 3, "+Inf": 3})])
    assert [(s.name, s.labels.get("le")) for s in families(merged)[0].samples] == [
        ("h_bucket", "0.5"), ("h_bucket", "1.0"), ("h_bucket", "10.0"), ("h_bucket", "+Inf"),
        ("h_count", None), ("h_sum", None)]


PROCESS = """\
# HELP mserve_process_resident_memory_bytes Resident memory size in bytes.
# TYPE mserve_process_resident_memory_bytes gauge
mserve_process_resident_memory_bytes {rss}
# HELP mserve_process_start_time_seconds Start time of the process since unix epoch in seconds.
# TYPE mserve_process_start_time_seconds gauge
mserve_process_start_time_seconds {start}
# HELP mserve_process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE mserve_process_cpu_seconds_total counter
mserve_process_cpu_seconds_total {cpu}
# HELP mserve_process_open_fds Number of open file descriptors.
# TYPE mserve_process_open_fds gauge
mserve_process_open_fds {fds}
# HELP mserve_process_max_fds Maximum number of open file descriptors.
# TYPE mserve_process_max_fds gauge
mserve_process_max_fds {max_fds}
"""


def test_process_figures_add_up_but_start_time_and_fd_limit():
    texts = [PROCESS.format(rss=2e7, start=1.7e9 + 5, cpu=0.5, fds=10, max_fds=1024.0),
             PROCESS.format(rss=3e7, start=1.7e9, cpu=1.25, fds=7, max_fds=1024.0),
             PROCESS.format(rss=1e7, start=1.7e9 + 9, cpu=0.25, fds=5, max_fds=1024.0)]
    got = samples(merge_exposition(texts), process=True)
    assert got == {("mserve_process_resident_memory_bytes", ()): 6e7,
                   ("mserve_process_start_time_seconds", ()): 1.7e9,  # the first to start
                   ("mserve_process_cpu_seconds_total", ()): 2.0,
                   ("mserve_process_open_fds", ()): 22,
                   ("mserve_process_max_fds", ()): 1024}


def test_created_takes_the_earliest():
    texts, created = [], []
    for n in (2, 3):
        registry = CollectorRegistry()
        Counter("jobs", "Jobs done.", registry=registry).inc(n)
        text = generate_latest(registry).decode()
        texts.append(text)
        created.append(samples(text)["jobs_created", ()])
    got = samples(merge_exposition(texts))
    assert got["jobs_total", ()] == 5
    assert got["jobs_created", ()] == min(created)


def test_odd_labels_help_and_values_round_trip():
    registry = CollectorRegistry()
    odd = 'quote " backslash \\ newline \n end'
    Gauge("odd", 'Help with a \\ and a\nsecond line.', ["path"], registry=registry) \
        .labels(odd).set(1.5)
    Gauge("edge", "Infinite and not a number.", ["kind"], registry=registry) \
        .labels("inf").set(math.inf)
    text = generate_latest(registry).decode()
    assert merge_exposition([text]) == text
    merged = merge_exposition([text, text])
    assert samples(merged)["odd", (("path", odd),)] == 3.0
    assert families(merged)[0].documentation == 'Help with a \\ and a\nsecond line.'
    assert 'edge{kind="inf"} +Inf\n' in merged
    nan = 'edge{kind="inf"} NaN\n'
    assert nan in merge_exposition([text, text.replace('edge{kind="inf"} +Inf\n', nan)])


# ---- statistics ------------------------------------------------------------------------

def statistics(stats: dict[int, VersionStats]) -> list[dict]:
    """What Serving.statistics answers for a worker holding ``stats``."""
    serving = Serving("d")
    try:
        serving.stats = stats
        return serving.statistics(None)
    finally:
        serving.executor.shutdown()
        serving.codec.shutdown()


def stats_a(s: dict[int, VersionStats]) -> None:
    one, two = s.setdefault(1, VersionStats()), s.setdefault(2, VersionStats())
    one.observe_run(2, 4, 0.01)
    one.observe_run(1, 1, 0.002)
    for _ in range(3):
        one.observe_success(0.02, 0.001, 0.01, 0.002)
    one.fail.add(0.5)
    one.queue.add(0.003, count=3)
    two.observe_run(1, 1, 0.004)
    two.observe_success(0.01, 0.001, 0.004, 0.001)


def stats_b(s: dict[int, VersionStats]) -> None:
    one, three = s.setdefault(1, VersionStats()), s.setdefault(3, VersionStats())
    one.observe_run(2, 2, 0.005)
    one.observe_run(8, 8, 0.05)
    for _ in range(10):
        one.observe_success(0.07, 0.002, 0.05, 0.003)
    one.queue.add(0.01, count=10)
    three.observe_run(1, 1, 0.001)
    three.fail.add(0.2)


def test_statistics_merge_to_one_worker_that_saw_all_the_traffic():
    a, b, both = {}, {}, {}
    stats_a(a)
    stats_b(b)
    stats_a(both)
    stats_b(both)
    for stats, last in ((a, 1000), (b, 3000), (both, 3000)):
        stats[1].last_inference_ms = last
    merged = merge_statistics([statistics(a), statistics(b)])
    assert merged == statistics(both)
    assert [s["batch_size"] for s in merged[0]["batch_stats"]] == [1, 2, 8]


def test_statistics_keep_the_first_docs_order_and_leave_the_inputs_alone():
    a, b = {}, {}
    stats_a(a)
    stats_b(b)
    docs = [statistics(b)[::-1], statistics(a)]
    before = orjson.loads(orjson.dumps(docs))
    merged = merge_statistics(docs)
    assert [s["version"] for s in merged] == ["3", "1", "2"]
    assert docs == before
    assert merge_statistics(docs[:1]) == docs[0]


def test_other_fields_come_from_the_first_doc_holding_them():
    first = [{"name": "d", "version": "1", "state": "READY", "inference_count": 1}]
    second = [{"name": "d", "version": "1", "state": "LOADING", "inference_count": 2,
               "reason": "", "flag": True}]
    assert merge_statistics([first, second]) == [
        {"name": "d", "version": "1", "state": "READY", "inference_count": 3, "reason": "",
         "flag": True}]
