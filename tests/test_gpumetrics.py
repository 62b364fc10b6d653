"""GPU figures in /metrics, with NVML stood in for (no GPU on the test machines): the
process's memory on its card, the card's size and utilisation; a card NVML cannot read is
left out, never failing the scrape."""

from __future__ import annotations

import os
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mserve.daemon.worker.gpumetrics import GpuCollector


class FakeNvml:
    def __init__(self, broken: set[int] = frozenset()):
        self.broken = broken

    def nvmlDeviceGetHandleByIndex(self, index):
        if index in self.broken:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        return index

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(total=80 * 2**30, used=5 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=37, memory=10)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [SimpleNamespace(pid=os.getpid(), usedGpuMemory=3 * 2**30),
                SimpleNamespace(pid=1, usedGpuMemory=2**30),  # another process: not ours
                SimpleNamespace(pid=os.getpid(), usedGpuMemory=None)]  # NVML may not know


def scrape(collector) -> dict:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {(s.name, s.labels.get("gpu")): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_the_process_memory_the_card_and_its_utilisation():
    got = scrape(GpuCollector(FakeNvml(), {1}))
    assert got[("mserve_gpu_memory_used_bytes", "1")] == 3 * 2**30
    assert got[("mserve_gpu_memory_total_bytes", "1")] == 80 * 2**30
    assert got[("mserve_gpu_utilization_ratio", "1")] == 0.37


def test_a_card_nvml_cannot_read_is_left_out():
    got = scrape(GpuCollector(FakeNvml(broken={0}), {0, 1}))
    assert ("mserve_gpu_memory_used_bytes", "0") not in got
    assert got[("mserve_gpu_utilization_ratio", "1")] == 0.37
