"""The benchmark models, built with the onnx helper API from fixed numpy seeds.

- ``tiny``: FP32 ``x`` [N, 16] -> Gemm 32 -> Relu -> Gemm 4 -> ``y``
- ``mlp``:  FP32 ``x`` [N, 512] -> 4 x (Gemm 1024 -> Relu) -> Gemm 10 -> ``y``

The batch dimension is dynamic. ``variant`` changes the seed, which gives the same graph with
other weights (a second version of a deployment, for the rollback timing). ``reference``
computes the same function in numpy, so every contender's answer can be checked without
importing ONNX Runtime here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]


@dataclass(frozen=True)
class Spec:
    """Layer widths of one model: ``features`` in, ``hidden`` Gemm+Relu layers, ``outputs``."""

    features: int
    hidden: tuple[int, ...]
    outputs: int
    seed: int


SPECS = {
    "tiny": Spec(features=16, hidden=(32,), outputs=4, seed=1601),
    "mlp": Spec(features=512, hidden=(1024, 1024, 1024, 1024), outputs=10, seed=5120),
}


def weights(name: str, variant: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W [in, out], b [out]) for each Gemm of model ``name``, He-scaled, from a fixed seed."""
    spec = SPECS[name]
    rng = np.random.default_rng(spec.seed + 1000 * variant)
    widths = [spec.features, *spec.hidden, spec.outputs]
    layers = []
    for fan_in, fan_out in itertools.pairwise(widths):
        w = rng.standard_normal((fan_in, fan_out)).astype(np.float32) * np.sqrt(2.0 / fan_in)
        b = rng.standard_normal(fan_out).astype(np.float32) * 0.1
        layers.append((w.astype(np.float32), b.astype(np.float32)))
    return layers


def build(name: str, path: Path, variant: int = 0) -> Path:
    """Write model ``name`` (weights ``variant``) to ``path`` and return it."""
    spec = SPECS[name]
    layers = weights(name, variant)
    nodes, inits, current = [], [], "x"
    for i, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"B{i}")]
        last = i == len(layers) - 1
        gemm_out = "y" if last else f"h{i}"
        nodes.append(helper.make_node("Gemm", [current, f"W{i}", f"B{i}"], [gemm_out]))
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [f"r{i}"]))
            current = f"r{i}"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", spec.features])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", spec.outputs])
    graph = helper.make_graph(nodes, name, [x], [y], inits)
    model = helper.make_model(graph, opset_imports=OPSET, producer_name="mserve-bench")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def reference(name: str, x: np.ndarray, variant: int = 0) -> np.ndarray:
    """What model ``name`` answers for ``x``, computed in numpy."""
    layers = weights(name, variant)
    h = x.astype(np.float32)
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h


def sample_input(name: str) -> np.ndarray:
    """The fixed [1, F] FP32 request row used for every request to model ``name``."""
    rng = np.random.default_rng(SPECS[name].seed + 7)
    return rng.standard_normal((1, SPECS[name].features)).astype(np.float32)


def build_all(workdir: Path, names: list[str]) -> dict[str, Path]:
    """Build each model in ``names`` as ``workdir/NAME.onnx`` (plus ``tiny_v2.onnx``)."""
    paths = {name: build(name, workdir / f"{name}.onnx") for name in names}
    paths["tiny_v2"] = build("tiny", workdir / "tiny_v2.onnx", variant=1)
    return paths
