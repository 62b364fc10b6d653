"""One deployment's figures from the snapshots of its worker processes: the Prometheus
exposition of ``GET /metrics`` and Triton's statistics, each merged as if one process had
seen all the traffic. Pure functions: the answering worker gathers the snapshots (peers.py).

Counts add up; a few figures that every process holds alike, or that only mean something
as the earliest or the latest, combine otherwise (the tables below).
"""

from __future__ import annotations

import operator
from collections.abc import Callable

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

# Samples whose sum across processes would be meaningless: the same figure in every process,
# or one each process knows on its own account. Everything else (counters, histogram
# buckets, sums and counts, queue depth, memory, CPU seconds, open fds) adds up.
EARLIEST = {
    "mserve_process_start_time_seconds",  # the deployment is up since its first process
}
LARGEST = {
    "mserve_process_max_fds",  # the fd limit, inherited alike by every worker
    "mserve_model_load_seconds",  # each process loads each version itself: the slowest load
    "mserve_deployment_info",  # 1 in every process, labelled with the one deployment
    "mserve_gpu_utilization_ratio",  # the card's, seen alike by every process on it
    "mserve_gpu_memory_total_bytes",  # the card's size
}


def merge_exposition(texts: list[str]) -> str:
    """The exposition texts of several processes as one: samples with the same name and
    labels combined (see EARLIEST and LARGEST; ``_created`` takes the earliest, the rest add
    up), families in the order of the first text with new ones after, each histogram series'
    buckets in ``le`` order. Raises ValueError on a text that is not exposition format."""
    families: dict[str, Metric] = {}
    samples: dict[str, dict[tuple, Sample]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                samples[family.name] = {}
            into = samples[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                have = into.get(key)
                if have is None:
                    into[key] = sample
                else:
                    into[key] = have._replace(value=_combine(sample.name)(have.value,
                                                                          sample.value))
    for name, family in families.items():
        family.samples = _ordered(list(samples[name].values()))
    return generate_latest(_Families(list(families.values()))).decode()


def _combine(name: str) -> Callable[[float, float], float]:
    if name in EARLIEST or name.endswith("_created"):
        return min
    if name in LARGEST:
        return max
    return operator.add


def _ordered(samples: list[Sample]) -> list[Sample]:
    """The samples of one family grouped by series (the labels but ``le``), in order of first
    appearance, each series' buckets first and in numeric ``le`` order (+Inf last)."""
    first: dict[tuple, int] = {}
    for sample in samples:
        first.setdefault(_series(sample), len(first))

    def key(sample: Sample) -> tuple:
        bucket = sample.name.endswith("_bucket") and "le" in sample.labels
        return (first[_series(sample)], not bucket,
                float(sample.labels["le"]) if bucket else 0.0)

    return sorted(samples, key=key)


def _series(sample: Sample) -> tuple:
    return tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))


class _Families(Collector):
    """Merged families, for prometheus-client's own renderer (its escaping and numbers)."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self):
        return self.families


def merge_statistics(docs: list[list[dict]]) -> list[dict]:
    """Several processes' Triton ``model_stats`` lists as one: entries by (name, version),
    every count and ns added, ``last_inference`` the latest, ``batch_stats`` by batch size
    (sorted by it); any other field from the first doc holding it. Entries in the first
    doc's order, new ones after."""
    merged: dict[tuple, dict] = {}
    for doc in docs:
        for entry in doc:
            key = (entry["name"], entry["version"])
            if key in merged:
                _add(merged[key], entry)
            else:
                merged[key] = _copy(entry)
    return list(merged.values())


IDENTITY = {"name", "version", "batch_size"}  # what an entry is, never added up


def _add(into: dict, more: dict) -> None:
    """Add ``more``'s figures to ``into`` (a copy of ours), in place."""
    for key, value in more.items():
        have = into.get(key)
        if key not in into:
            into[key] = _copy(value)
        elif key == "last_inference":
            into[key] = max(have, value)
        elif key == "batch_stats":
            into[key] = _add_batches(have, value)
        elif isinstance(have, dict) and isinstance(value, dict):
            _add(have, value)
        elif key not in IDENTITY and _is_count(have) and _is_count(value):
            into[key] = have + value


def _add_batches(have: list[dict], more: list[dict]) -> list[dict]:
    by_size = {batch["batch_size"]: batch for batch in have}
    for batch in more:
        if batch["batch_size"] in by_size:
            _add(by_size[batch["batch_size"]], batch)
        else:
            by_size[batch["batch_size"]] = _copy(batch)
    return sorted(by_size.values(), key=lambda batch: batch["batch_size"])


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _copy(value):
    """A deep copy that shares nothing: ``VersionStats.to_json`` uses one zero dict for
    several fields, which ``copy.deepcopy`` would keep shared (and add to twice)."""
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value
