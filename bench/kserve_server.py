"""KServe's Python ModelServer wrapping an ONNX Runtime session (v2 protocol, REST only).

A ``kserve.Model`` whose ``predict`` goes InferRequest -> numpy -> ``session.run`` ->
InferResponse; one uvicorn worker, gRPC off, everything else at kserve's defaults. Runs in
bench/.venv.

    python bench/kserve_server.py MODEL.onnx NAME PORT
"""

from __future__ import annotations

import sys

import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.utils.utils import generate_uuid


class OnnxModel(Model):
    """One ONNX model, loaded at construction."""

    def __init__(self, name: str, path: str):
        super().__init__(name)
        self.path = path
        self.session = None
        self.load()

    def load(self) -> bool:
        self.session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers=None, response_headers=None):
        feeds = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
        results = self.session.run(None, feeds)
        outputs = []
        for name, result in zip(self.output_names, results):
            output = InferOutput(name=name, shape=list(result.shape), datatype="FP32")
            output.set_data_from_numpy(result, binary_data=False)
            outputs.append(output)
        return InferResponse(response_id=payload.id or generate_uuid(), model_name=self.name,
                             infer_outputs=outputs)


if __name__ == "__main__":
    path, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ModelServer(http_port=port, enable_grpc=False, workers=1).start([OnnxModel(name, path)])
