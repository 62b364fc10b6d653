"""Closed-loop gRPC load against one deployment: `python bench/grpc_load.py TARGET MODEL
FEATURES CONCURRENCY SECONDS`, printing one JSON line {rps, p50_ms, p99_ms, errors}.

No non-Python gRPC load generator (ghz) installs here, so this is a multi-process Python
client: one process per core, each running its share of the concurrency as asyncio tasks
over one channel, with raw_input_contents (how Triton's clients send tensors). Python costs
the client more CPU per call than wrk costs the HTTP rows, and client and server share the
machine, so gRPC figures are a lower bound next to the HTTP ones.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import sys
import time

import numpy as np


def _request(model: str, features: int):
    from mserve.daemon.worker.proto import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, features])
    del tensor
    row = np.random.default_rng(0).standard_normal(features).astype(np.float32)
    request.raw_input_contents.append(row.tobytes())
    return request


async def _worker(target: str, model: str, features: int, conc: int, seconds: float) -> dict:
    import grpc

    from mserve.daemon.worker.proto import grpc_service_pb2_grpc as pbg

    request = _request(model, features)
    latencies, errors = [], 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)
        await stub.ModelInfer(request)  # warm the channel
        deadline = time.perf_counter() + seconds

        async def loop():
            nonlocal errors
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    await stub.ModelInfer(request)
                    latencies.append(time.perf_counter() - start)
                except grpc.aio.AioRpcError:
                    errors += 1

        await asyncio.gather(*(loop() for _ in range(conc)))
    return {"latencies": latencies, "errors": errors}


def _run(args) -> dict:
    return asyncio.run(_worker(*args))


def main(argv: list[str]) -> int:
    target, model, features, conc, seconds = argv[1], argv[2], int(argv[3]), int(argv[4]), \
        float(argv[5])
    procs = max(1, min(conc, os.cpu_count() or 1))
    shares = [conc // procs + (1 if i < conc % procs else 0) for i in range(procs)]
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        parts = pool.map(_run, [(target, model, features, s, seconds) for s in shares])
    latencies = np.array([x for p in parts for x in p["latencies"]]) * 1000
    print(json.dumps({
        "rps": len(latencies) / seconds,
        "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else None,
        "p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else None,
        "errors": sum(p["errors"] for p in parts)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
