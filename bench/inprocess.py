"""The physical limit: ``session.run`` on one [1, F] FP32 row in a loop, no network.

Prints one JSON line: calls, rps, p50_ms, p99_ms. Runs in bench/.venv (the same ONNX Runtime
version as the project's, see run.py).

    python bench/inprocess.py MODEL.onnx FEATURES SECONDS WARMUP_SECONDS
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import onnxruntime as ort


def loop(session: ort.InferenceSession, x: np.ndarray, seconds: float) -> list[int]:
    """Call ``session.run`` back to back for ``seconds``; per-call durations in ns."""
    durations = []
    deadline = time.perf_counter_ns() + int(seconds * 1e9)
    now = time.perf_counter_ns()
    while now < deadline:
        session.run(None, {"x": x})
        after = time.perf_counter_ns()
        durations.append(after - now)
        now = after
    return durations


def main() -> None:
    path, features, seconds, warmup = sys.argv[1], int(sys.argv[2]), *map(float, sys.argv[3:5])
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, features)).astype(np.float32)
    loop(session, x, warmup)
    durations = np.array(loop(session, x, seconds), dtype=np.float64) / 1e6
    print(json.dumps({"calls": len(durations), "rps": len(durations) / (durations.sum() / 1e3),
                      "p50_ms": float(np.percentile(durations, 50)),
                      "p99_ms": float(np.percentile(durations, 99))}))


if __name__ == "__main__":
    main()
