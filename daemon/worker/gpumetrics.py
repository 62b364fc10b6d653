"""GPU figures in ``/metrics``, for a worker whose version runs on CUDA: the GPU memory this
process holds and the card's utilisation, read through NVML (``nvidia-ml-py``) at scrape time.

Registered only when a version is loaded on a card and NVML can be imported and initialised;
anything NVML cannot say is left out of that scrape rather than failing it.

- ``mserve_gpu_memory_used_bytes{gpu}``: this process's memory on card ``gpu``.
- ``mserve_gpu_utilization_ratio{gpu}``: the card's utilisation over NVML's last sample
  period (0 to 1; the whole card, other processes included).
- ``mserve_gpu_memory_total_bytes{gpu}``: the card's memory.
"""

from __future__ import annotations

import logging
import os

from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("mserve.worker")


def nvml():
    """The initialised ``pynvml`` module, or None where there is none or no driver."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError and its many subclasses
        log.info("no GPU figures in /metrics: NVML did not start (%s)", exc)
        return None
    return pynvml


class GpuCollector:
    """Collects the figures of the cards in ``cards`` (indexes) for this process."""

    def __init__(self, nvml_module, cards: set[int], pid: int | None = None):
        self.nvml, self.cards, self.pid = nvml_module, cards, pid or os.getpid()

    def collect(self):
        used = GaugeMetricFamily("mserve_gpu_memory_used_bytes",
                                 "GPU memory this worker process holds, per card.",
                                 labels=["gpu"])
        total = GaugeMetricFamily("mserve_gpu_memory_total_bytes", "The card's memory.",
                                  labels=["gpu"])
        busy = GaugeMetricFamily("mserve_gpu_utilization_ratio",
                                 "The card's utilisation over NVML's last sample period.",
                                 labels=["gpu"])
        for card in sorted(self.cards):
            try:
                handle = self.nvml.nvmlDeviceGetHandleByIndex(card)
                memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
                total.add_metric([str(card)], float(memory.total))
                busy.add_metric([str(card)],
                                self.nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
                mine = sum(p.usedGpuMemory or 0 for p in
                           self.nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                           if p.pid == self.pid)
                used.add_metric([str(card)], float(mine))
            except Exception as exc:  # noqa: BLE001 - NVML errors leave the card out
                log.debug("NVML could not read card %s: %s", card, exc)
        yield used
        yield total
        yield busy
