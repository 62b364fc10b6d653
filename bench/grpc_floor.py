"""The gRPC floor: `python bench/grpc_floor.py PORT ANSWER_FILE`, a bare ``grpc.aio`` server
whose ModelInfer returns a fixed, pre-serialized answer (read from ANSWER_FILE): no model,
no parsing, no batching, no accounting. On uvloop, as mserve's worker runs.

It measures what grpcio's asyncio server costs per call on this machine, under the same
h2load as mserve's gRPC rows: no Python gRPC server built on grpcio can answer faster.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
from grpc import aio


async def serve(port: int, answer: bytes) -> None:
    async def model_infer(request: bytes, context) -> bytes:
        return answer

    server = aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {"ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def main(argv: list[str]) -> int:
    import uvloop

    uvloop.run(serve(int(argv[1]), Path(argv[2]).read_bytes()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
