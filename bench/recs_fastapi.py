"""The recs pipeline (examples/recs) written as a FastAPI app, the way a user would without
mserve: the same SQLite feature lookup, the same ONNX model, the same top-k, one uvicorn
worker with default settings. Runs in bench/.venv.

    python bench/recs_fastapi.py EXAMPLE_FOLDER recs PORT
"""

from __future__ import annotations

import sqlite3
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, HTTPException

from fastapi_server import InferenceRequest  # the baseline's request model (same folder)

K = 5
COLUMNS = ", ".join(f"f{i}" for i in range(8))


def create_app(folder: Path) -> FastAPI:
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    local = threading.local()

    def db() -> sqlite3.Connection:
        if getattr(local, "db", None) is None:
            local.db = sqlite3.connect(f"file:{folder / 'features.sqlite'}?mode=ro&immutable=1",
                                       uri=True)
        return local.db

    products = np.array([r[0] for r in db().execute(
        "SELECT product_id FROM products ORDER BY position")], dtype=object)
    app = FastAPI()

    @app.get("/v2/health/ready")
    def ready():
        return {"ready": True}

    @app.post("/v2/models/recs/infer")
    def infer(request: InferenceRequest):
        ids = [int(v) for v in request.inputs[0].data]
        marks = ", ".join("?" * len(ids))
        found = {row[0]: row[1:] for row in db().execute(
            f"SELECT user_id, {COLUMNS} FROM user_features WHERE user_id IN ({marks})", ids)}
        if any(i not in found for i in ids):
            raise HTTPException(status_code=400, detail="unknown user id")
        features = np.array([found[i] for i in ids], dtype=np.float32)
        (scores,) = session.run(["scores"], {"user_features": features})
        top = np.argsort(-scores, axis=1, kind="stable")[:, :K]
        return {"model_name": "recs", "outputs": [
            {"name": "product_ids", "datatype": "BYTES", "shape": list(top.shape),
             "data": products[top].ravel().tolist()},
            {"name": "scores", "datatype": "FP32", "shape": list(top.shape),
             "data": np.take_along_axis(scores, top, axis=1).ravel().tolist()}]}

    return app


if __name__ == "__main__":
    uvicorn.run(create_app(Path(sys.argv[1])), host="127.0.0.1", port=int(sys.argv[3]))
