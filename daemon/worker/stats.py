"""Per-version statistics of one worker: Triton's statistics extension and the live figures
that ``mserve list`` shows (requests, errors, p50/p99 over the last minute).

Counting costs a few integer additions per request; percentiles come from a one-minute ring
of per-second latency histograms (bins about 12% wide), so memory stays flat at any rate.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field

# Latency bin edges in seconds: 50 µs × 1.12^k up to about 60 s.
EDGES = [50e-6 * 1.12 ** k for k in range(int(math.log(60 / 50e-6, 1.12)) + 2)]
WINDOW_S = 60


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)

    def to_json(self) -> dict:
        return {"count": self.count, "ns": self.ns}


@dataclass
class VersionStats:
    """Triton's per-model statistics for one version. ``compute_input`` is the request's
    decoding (body to arrays), ``compute_infer`` its model run (the joined batch's run for a
    batched request), ``compute_output`` encoding the answer; each counts every answered
    request. ``batch_stats`` count model runs by the number of requests joined."""

    batched: bool = True  # the version batches: dim 0 is the batch (else each request is 1)
    last_inference_ms: int = 0
    inference_count: int = 0  # inferences: batch elements (rows), or requests when unbatched
    execution_count: int = 0  # model runs
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, Duration] = field(default_factory=dict)

    def summary(self) -> dict:
        """Requests, errors and mean latency since the version was loaded."""
        done = self.success.count + self.fail.count
        mean = self.success.ns / self.success.count / 1e6 if self.success.count else None
        return {"requests": done, "errors": self.fail.count,
                "error_rate": round(self.fail.count / done, 4) if done else 0.0,
                "mean_ms": round(mean, 3) if mean is not None else None}

    def observe_run(self, requests: int, rows: int, seconds: float) -> None:
        """One model run of ``requests`` requests, ``rows`` rows (batch_stats)."""
        self.execution_count += 1
        # Triton's count: a model without batching makes one inference per request, whatever
        # its dim 0 means (a time-major RNN's dim 0 is time).
        self.inference_count += rows if self.batched else requests
        self.batches.setdefault(requests, Duration()).add(seconds)

    def observe_success(self, seconds: float, input_s: float, infer_s: float,
                        output_s: float) -> None:
        """One answered request: its latency and its decode, run and encode times. All in
        one step, as Triton does when it releases a request, so the three compute counts
        are equal in any snapshot (perf_analyzer refuses statistics where they differ)."""
        self.success.add(seconds)
        self.compute_input.add(input_s)
        self.compute_infer.add(infer_s)
        self.compute_output.add(output_s)

    def to_json(self, name: str, version: int) -> dict:
        zero = Duration().to_json()
        return {
            "name": name, "version": str(version),
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.to_json(), "fail": self.fail.to_json(),
                "queue": self.queue.to_json(), "compute_input": self.compute_input.to_json(),
                "compute_infer": self.compute_infer.to_json(),
                "compute_output": self.compute_output.to_json(),
                "cache_hit": zero, "cache_miss": zero,
            },
            "batch_stats": [{"batch_size": size, "compute_input": zero,
                             "compute_infer": d.to_json(), "compute_output": zero}
                            for size, d in sorted(self.batches.items())],
        }


class Recent:
    """Requests, errors and latency percentiles over the last minute."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.slots = [[0, 0, 0, [0] * (len(EDGES) + 1)] for _ in range(WINDOW_S)]  # sec, n, err

    def observe(self, seconds: float, ok: bool) -> None:
        now = int(self.clock())
        slot = self.slots[now % WINDOW_S]
        if slot[0] != now:
            slot[0], slot[1], slot[2], slot[3] = now, 0, 0, [0] * (len(EDGES) + 1)
        slot[1] += 1
        if ok:
            slot[3][bisect.bisect_left(EDGES, seconds)] += 1
        else:
            slot[2] += 1

    def summary(self) -> dict:
        """The last minute's counts and percentiles, and its latency histogram (bins that
        are not empty, by index), so the figures of several processes can be merged."""
        now = int(self.clock())
        live = [s for s in self.slots if now - s[0] < WINDOW_S]
        hist = [sum(s[3][i] for s in live) for i in range(len(EDGES) + 1)]
        requests, errors = sum(s[1] for s in live), sum(s[2] for s in live)
        return {"requests_1m": requests, "errors_1m": errors,
                "error_rate_1m": round(errors / requests, 4) if requests else 0.0,
                "p50_ms_1m": percentile_ms(hist, 0.50), "p99_ms_1m": percentile_ms(hist, 0.99),
                "hist_1m": {str(i): n for i, n in enumerate(hist) if n}}


def percentile_ms(hist: list[int], q: float) -> float | None:
    """The ``q`` quantile of a latency histogram over ``EDGES``, in milliseconds."""
    total = sum(hist)
    if not total:
        return None
    rank, seen = q * total, 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= rank:
            edge = EDGES[min(i, len(EDGES) - 1)]
            return round(edge * 1000, 3)
    return None
