"""The baseline: an Open Inference Protocol endpoint written the way a typical user writes one.

FastAPI + pydantic request model, numpy conversion, ``session.run``, FastAPI's default JSON
response, one uvicorn worker with default settings (access log included). Runs in bench/.venv.

    python bench/fastapi_server.py MODEL.onnx NAME PORT
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64}
DATATYPES = {np.dtype(v): k for k, v in DTYPES.items()}


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list


class InferenceRequest(BaseModel):
    inputs: list[Tensor]


def create_app(model_path: str, model_name: str) -> FastAPI:
    """The app serving ``model_path`` as ``model_name``."""
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]
    app = FastAPI()

    @app.get("/v2/health/ready")
    def ready():
        return {"ready": True}

    @app.post("/v2/models/{name}/infer")
    def infer(name: str, request: InferenceRequest):
        if name != model_name:
            raise HTTPException(status_code=404, detail=f"unknown model {name}")
        feeds = {t.name: np.array(t.data, dtype=DTYPES[t.datatype]).reshape(t.shape)
                 for t in request.inputs}
        results = session.run(None, feeds)
        outputs = [{"name": n, "shape": list(r.shape), "datatype": DATATYPES[r.dtype],
                    "data": r.flatten().tolist()} for n, r in zip(output_names, results)]
        return {"model_name": model_name, "outputs": outputs}

    return app


if __name__ == "__main__":
    path, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    uvicorn.run(create_app(path, name), host="127.0.0.1", port=port)
