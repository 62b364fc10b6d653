"""Build the example recommender: item scores from a user's features and item embeddings.

    python examples/recs/make_model.py      # writes model.onnx and features.sqlite here

``model.onnx`` takes ``user_features`` (FP32 [N, 8]) and returns ``scores`` (FP32 [N, 50]),
the dot product of the user's features with each product's embedding. ``features.sqlite``
(make_features.py) holds the feature table the transformer (recs.py) reads. Fixed seed: the
same files every time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
DIM, PRODUCTS, SEED = 8, 50, 16


def item_embeddings() -> np.ndarray:
    return np.random.default_rng(SEED).normal(size=(PRODUCTS, DIM)).astype(np.float32)


def build(path: Path = HERE / "model.onnx") -> Path:
    features = helper.make_tensor_value_info("user_features", TensorProto.FLOAT, ["N", DIM])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", PRODUCTS])
    items = numpy_helper.from_array(item_embeddings().T.copy(), "item_embeddings_t")
    node = helper.make_node("MatMul", ["user_features", "item_embeddings_t"], ["scores"])
    graph = helper.make_graph([node], "recs", [features], [scores], [items])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="mserve-examples")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


if __name__ == "__main__":
    import make_features

    print(build())
    print(make_features.build())
