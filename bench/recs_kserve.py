"""The recs pipeline (examples/recs) as KServe runs one: a Transformer in front of a predictor,
two ModelServer processes. This script is the Transformer: ``preprocess`` reads the user's
features from the same SQLite table, KServe's own ``predict`` sends them to the predictor over
REST v2 (bench/kserve_server.py serving model.onnx, as KServe's predictor pod would), and
``postprocess`` keeps the top five. One uvicorn worker each, gRPC off, kserve's defaults
otherwise. Runs in bench/.venv.

    python bench/recs_kserve.py EXAMPLE_FOLDER recs PORT PREDICTOR_HOST:PORT
"""

from __future__ import annotations

import sqlite3
import sys
import threading
from pathlib import Path

import numpy as np
from kserve import InferInput, InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve import context as kserve_context
from kserve.predictor_config import PredictorConfig

K = 5
COLUMNS = ", ".join(f"f{i}" for i in range(8))


class RecsTransformer(Model):
    def __init__(self, name: str, folder: Path, predictor_host: str):
        super().__init__(name)
        # Where ModelServer's --predictor_host flag puts it (kserve 0.21 reads it from context).
        kserve_context.set_predictor_config(PredictorConfig(predictor_host,
                                                            predictor_protocol="v2"))
        self.path = folder / "features.sqlite"
        self.local = threading.local()
        self.products = np.array([r[0] for r in self._db().execute(
            "SELECT product_id FROM products ORDER BY position")], dtype=object)
        self.ready = True

    def _db(self) -> sqlite3.Connection:
        if getattr(self.local, "db", None) is None:
            self.local.db = sqlite3.connect(f"file:{self.path}?mode=ro&immutable=1", uri=True)
        return self.local.db

    def preprocess(self, payload: InferRequest, headers=None) -> InferRequest:
        ids = [int(v) for v in payload.inputs[0].as_numpy().reshape(-1)]
        marks = ", ".join("?" * len(ids))
        found = {row[0]: row[1:] for row in self._db().execute(
            f"SELECT user_id, {COLUMNS} FROM user_features WHERE user_id IN ({marks})", ids)}
        features = np.array([found[i] for i in ids], dtype=np.float32)
        tensor = InferInput("user_features", list(features.shape), "FP32")
        tensor.set_data_from_numpy(features, binary_data=False)
        return InferRequest(model_name=self.name, infer_inputs=[tensor],
                            request_id=payload.id)

    def postprocess(self, response: InferResponse, headers=None,
                    response_headers=None) -> InferResponse:
        scores = next(o for o in response.outputs if o.name == "scores").as_numpy()
        top = np.argsort(-scores, axis=1, kind="stable")[:, :K]
        ids = InferOutput("product_ids", list(top.shape), "BYTES")
        ids.set_data_from_numpy(self.products[top], binary_data=False)
        best = InferOutput("scores", list(top.shape), "FP32")
        best.set_data_from_numpy(np.take_along_axis(scores, top, axis=1), binary_data=False)
        return InferResponse(response_id=response.id, model_name=self.name,
                             infer_outputs=[ids, best])


if __name__ == "__main__":
    folder, name, port, predictor = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    ModelServer(http_port=port, enable_grpc=False, workers=1).start(
        [RecsTransformer(name, folder, predictor)])
