"""Build the iris example model for mserve.

Trains a small scikit-learn LogisticRegression (max_iter=1000, random_state=0)
on scikit-learn's bundled iris data (``sklearn.datasets.load_iris()``, no
download) and converts it to ONNX with skl2onnx.

Rerun (from any directory) with:

    pip install scikit-learn skl2onnx onnx
    python examples/iris/make_model.py

It writes, next to this script:

* ``model.onnx``   -- input ``features`` (float32 [N, 4]: sepal length,
  sepal width, petal length, petal width, in cm); outputs ``label``
  (int64 [N]) and ``probabilities`` (float32 [N, 3]). ZipMap is disabled,
  so both outputs are plain tensors.
* ``input.json``   -- three example rows as ``{"features": [[...], ...]}``.
* ``request.json`` -- the same rows as an Open Inference Protocol request.

Labels: 0 = setosa, 1 = versicolor, 2 = virginica (columns of
``probabilities`` are in the same order).
"""

import json
import re
from pathlib import Path

import onnx
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

HERE = Path(__file__).resolve().parent
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
# One example row of each species, straight from the dataset
# (0 setosa, 1 versicolor, 2 virginica).
EXAMPLE_ROWS = [0, 50, 100]


def _dumps(obj):
    """Indented JSON, but with each innermost list (one row) on one line."""
    text = json.dumps(obj, indent=2)
    text = re.sub(
        r"\[\s*([^\[\]{}]*?)\s*\]",
        lambda m: "[" + ", ".join(p.strip() for p in m.group(1).split(",")) + "]",
        text,
    )
    return text + "\n"


def main():
    iris = load_iris()
    X = iris.data.astype("float32")
    y = iris.target

    clf = LogisticRegression(max_iter=1000, random_state=0)
    clf.fit(X, y)

    onx = convert_sklearn(
        clf,
        name="iris",
        initial_types=[("features", FloatTensorType([None, 4]))],
        options={id(clf): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )

    # skl2onnx names the outputs output_label / output_probability;
    # rename them to label / probabilities everywhere in the graph.
    renames = {"output_label": "label", "output_probability": "probabilities"}
    graph = onx.graph
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name in renames:
                node.output[i] = renames[name]
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for out in graph.output:
        if out.name in renames:
            out.name = renames[out.name]
    names = [o.name for o in graph.output]
    assert names == ["label", "probabilities"], names

    # skl2onnx can list the same domain twice in opset_import; keep one
    # entry per domain (the highest version) so strict tools are happy.
    opsets = {}
    for op in onx.opset_import:
        opsets[op.domain] = max(op.version, opsets.get(op.domain, 0))
    del onx.opset_import[:]
    for domain, version in sorted(opsets.items()):
        onx.opset_import.add(domain=domain, version=version)

    onx.doc_string = (
        "Iris LogisticRegression. Input 'features' float32 [N,4] "
        "(sepal length, sepal width, petal length, petal width, cm). "
        "Outputs 'label' int64 [N] (0 setosa, 1 versicolor, 2 virginica) "
        "and 'probabilities' float32 [N,3]."
    )
    onnx.checker.check_model(onx)
    onnx.save_model(onx, str(HERE / "model.onnx"))

    rows = [[round(float(v), 4) for v in iris.data[i]] for i in EXAMPLE_ROWS]
    with open(HERE / "input.json", "w") as f:
        f.write(_dumps({"features": rows}))
    request = {
        "inputs": [
            {
                "name": "features",
                "shape": [len(rows), 4],
                "datatype": "FP32",
                "data": rows,
            }
        ]
    }
    with open(HERE / "request.json", "w") as f:
        f.write(_dumps(request))

    acc = clf.score(X, y)
    print(f"training accuracy {acc:.3f}; wrote model.onnx, input.json, request.json in {HERE}")


if __name__ == "__main__":
    main()
