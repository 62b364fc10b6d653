"""The example's transformer: a user id in, that user's top-k products and scores out.

preprocess looks the user's features up in features.sqlite (next to this file, stored with
the version), the model scores every product, postprocess keeps the best K.

    mserve deploy examples/recs/model.onnx --name recs --transformer examples/recs/recs.py
    curl -s localhost:PORT/v2/models/recs/infer \\
      -d '{"inputs": [{"name": "user_id", "datatype": "INT64", "shape": [1], "data": [42]}]}'
"""

import os
import sqlite3
import threading

import numpy as np

K = 5
COLUMNS = ", ".join(f"f{i}" for i in range(8))


class Transformer:
    # What clients send and get: the metadata and model-config routes report this.
    inputs = [{"name": "user_id", "datatype": "INT64", "shape": [-1]}]
    outputs = [{"name": "product_ids", "datatype": "BYTES", "shape": [-1, K]},
               {"name": "scores", "datatype": "FP32", "shape": [-1, K]}]

    def __init__(self, context):
        self.path = os.path.join(context.folder, "features.sqlite")
        self.local = threading.local()  # one read-only connection per pool thread
        rows = self._db().execute("SELECT product_id FROM products ORDER BY position")
        self.products = np.array([r[0] for r in rows], dtype=object)
        self.log = context.logger
        self.log.info("recs: %d products, features from %s", len(self.products), self.path)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self.local, "db", None)
        if db is None:
            db = self.local.db = sqlite3.connect(f"file:{self.path}?mode=ro&immutable=1",
                                                 uri=True)
        return db

    def sample(self):
        return {"user_id": np.array([1], dtype=np.int64)}

    def preprocess(self, inputs, headers):
        ids = [int(v.decode() if isinstance(v, bytes) else v)
               for v in inputs["user_id"].reshape(-1)]
        marks = ", ".join("?" * len(ids))
        found = {row[0]: row[1:] for row in self._db().execute(
            f"SELECT user_id, {COLUMNS} FROM user_features WHERE user_id IN ({marks})", ids)}
        missing = [i for i in ids if i not in found]
        if missing:
            raise LookupError(f"unknown user id {missing[0]}")
        return {"user_features": np.array([found[i] for i in ids], dtype=np.float32)}

    def postprocess(self, outputs, inputs):
        scores = outputs["scores"]
        top = np.argsort(-scores, axis=1, kind="stable")[:, :K]
        return {"product_ids": self.products[top],
                "scores": np.take_along_axis(scores, top, axis=1)}
