"""NVIDIA Triton Inference Server through PyTriton, serving an ONNX model with ONNX Runtime.

PyTriton starts the bundled ``tritonserver`` (its C++ HTTP and gRPC front ends, dynamic
batcher and Prometheus metrics) and binds a Python inference function to it through Triton's
Python backend: each model instance is a ``triton_python_backend_stub`` process that hands
the batched request to this process over ZeroMQ, where ``session.run`` runs. Settings, as
PyTriton's docs recommend for production: ``ModelConfig(batching=True, max_batch_size=64,
batcher=DynamicBatcher(max_queue_delay_microseconds=100))``, a ``@batch`` function, one model
instance, everything else at defaults. Runs in bench/.venv-triton.

    python bench/triton_server.py MODEL.onnx NAME HTTP_PORT GRPC_PORT METRICS_PORT [WORKSPACE]

WORKSPACE (must not exist) is where PyTriton puts its model store and its copy of tritonserver
(default: a new folder in ~/.cache/pytriton, removed only on a clean stop).
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

MAX_BATCH = 64
QUEUE_DELAY_US = 100  # as peers.TRITON_DELAY_US
SETTINGS = (f"PyTriton, dynamic batching max_batch_size={MAX_BATCH}, "
            f"max_queue_delay={QUEUE_DELAY_US} µs, 1 instance, @batch")


def main(path: str, name: str, http_port: int, grpc_port: int, metrics_port: int,
         workspace: str | None = None) -> None:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    features = session.get_inputs()[0].shape[1]
    outputs = session.get_outputs()[0].shape[1]

    @batch
    def infer(x: np.ndarray) -> dict[str, np.ndarray]:
        return {"y": session.run(None, {"x": x})[0]}

    config = TritonConfig(http_address="127.0.0.1", http_port=http_port,
                          grpc_address="127.0.0.1", grpc_port=grpc_port,
                          metrics_address="127.0.0.1", metrics_port=metrics_port)
    with Triton(config=config, workspace=workspace) as triton:
        triton.bind(model_name=name, infer_func=infer,
                    inputs=[Tensor(name="x", dtype=np.float32, shape=(features,))],
                    outputs=[Tensor(name="y", dtype=np.float32, shape=(outputs,))],
                    config=ModelConfig(batching=True, max_batch_size=MAX_BATCH,
                                       batcher=DynamicBatcher(
                                           max_queue_delay_microseconds=QUEUE_DELAY_US)),
                    strict=False)
        triton.serve()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]), *sys.argv[6:7])
