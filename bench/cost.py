"""What a measured run cost the server: CPU time per request and the mean batch size.

CPU: utime + stime (/proc/PID/stat, every thread of the process) of the server process and all
its descendants, summed before and after the measured run (Triton: the PyTriton process, the
``tritonserver`` it starts and the Python backend stub processes; MLServer: the main process
and its inference workers; mserve: the deployment's worker). Divided by the requests the load
generator got answered in that run: µs of server CPU per request, client CPU excluded.

Batch size, where the server reports it, from its Prometheus metrics (delta over the run):
mserve ``mserve_batch_size`` sum / count; Triton ``nv_inference_count`` /
``nv_inference_exec_count``; MLServer ``model_infer_request_success`` (client requests) /
``parallel_request_queue`` observations (one per batch handed to an inference worker).
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from loadgen import _tree_jiffies

TICK = os.sysconf("SC_CLK_TCK")


def metrics(url: str) -> dict[str, float]:
    """Prometheus text at ``url`` as {series line without value: value} (comments dropped)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                found[key] = float(value)
            except ValueError:
                continue
    return found


def total(series: dict[str, float], name: str, model: str | None = None) -> float:
    """Sum of the series called ``name`` (with label model="MODEL" when given)."""
    return sum(v for k, v in series.items()
               if k.split("{", 1)[0] == name and (model is None or f'model="{model}"' in k))


def mserve_batches(url: str, model: str) -> Callable[[], tuple[float, float]]:
    """(requests run, model runs) so far, from mserve's /metrics."""
    def read():
        m = metrics(f"{url}/metrics")
        return total(m, "mserve_batch_size_sum", model), total(m, "mserve_batch_size_count", model)
    return read


def triton_batches(metrics_url: str, model: str) -> Callable[[], tuple[float, float]]:
    """(inferences, executions) so far, from Triton's Prometheus endpoint."""
    def read():
        m = metrics(metrics_url)
        return total(m, "nv_inference_count", model), total(m, "nv_inference_exec_count", model)
    return read


def mlserver_batches(metrics_url: str, model: str) -> Callable[[], tuple[float, float]]:
    """(requests answered, batches dispatched to workers) so far, from MLServer's metrics."""
    def read():
        m = metrics(metrics_url)
        requests = total(m, "model_infer_request_success_total", model)
        return requests, total(m, "parallel_request_queue_count")
    return read


@dataclass
class Cost:
    """Server CPU µs per request and mean batch size of one run (None: not known)."""

    cpu_us: float | None = None
    batch: float | None = None


class Meter:
    """Snapshots the server's CPU time (and batch counters) around one measured run."""

    def __init__(self, pids: list[int], batches: Callable[[], tuple[float, float]] | None):
        self.pids, self.batches = [p for p in pids if p], batches

    def __enter__(self) -> Meter:
        self.jiffies = _tree_jiffies(self.pids)
        self.counts = self._counts()
        return self

    def __exit__(self, *exc) -> None:
        self.used = _tree_jiffies(self.pids) - self.jiffies
        after = self._counts()
        self.batch = None
        if self.counts and after and after[1] > self.counts[1]:
            self.batch = (after[0] - self.counts[0]) / (after[1] - self.counts[1])

    def _counts(self) -> tuple[float, float] | None:
        if self.batches is None:
            return None
        try:
            return self.batches()
        except OSError:
            return None

    def cost(self, requests: int) -> Cost:
        """The run's Cost, ``requests`` having been answered."""
        cpu = self.used / TICK * 1e6 / requests if self.pids and requests else None
        return Cost(cpu, self.batch)
