"""Seldon MLServer custom runtime: an ``MLModel`` whose ``predict`` runs an ONNX Runtime session.

The model's ``parameters.uri`` is the .onnx file. ``predict`` decodes the (possibly adaptively
batched) ``x`` with MLServer's NumpyCodec, runs ``session.run`` and encodes ``y`` the same way:
the plain path MLServer's docs show for a custom runtime. Runs in bench/.venv-mlserver, started
by ``mlserver start`` on the folder bench/peers.py writes (settings.json, model-settings.json).
"""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxRuntime(MLModel):
    """One ONNX model, loaded in each inference worker."""

    async def load(self) -> bool:
        self.session = ort.InferenceSession(self.settings.parameters.uri,
                                            providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {tensor.name: NumpyCodec.decode_input(tensor) for tensor in payload.inputs}
        results = self.session.run(None, feeds)
        return InferenceResponse(
            model_name=self.name, id=payload.id,
            outputs=[NumpyCodec.encode_output(name=name, payload=result)
                     for name, result in zip(self.output_names, results)])
