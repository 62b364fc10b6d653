"""Tiny real ONNX models built at test time with the onnx helper API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]


def _save(graph, path: Path, opsets=OPSET) -> Path:
    model = helper.make_model(graph, opset_imports=opsets, producer_name="mserve-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def affine(path: Path, scale: float = 1.0, bias: float = 0.0, width: int = 4) -> Path:
    """y = x * scale + bias, x: FP32 [N, width]. Different scale/bias = a different version."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])
    inits = [numpy_helper.from_array(np.array(scale, dtype=np.float32), "scale"),
             numpy_helper.from_array(np.array(bias, dtype=np.float32), "bias")]
    nodes = [helper.make_node("Mul", ["x", "scale"], ["xs"]),
             helper.make_node("Add", ["xs", "bias"], ["y"])]
    return _save(helper.make_graph(nodes, "affine", [x], [y], inits), path)


def keras_style(path: Path) -> Path:
    """y = inputs * 2 for an input named "inputs" (Keras and tf2onnx name their input so):
    FP32 [N, 4]."""
    x = helper.make_tensor_value_info("inputs", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    two = numpy_helper.from_array(np.array(2, dtype=np.float32), "two")
    return _save(helper.make_graph([helper.make_node("Mul", ["inputs", "two"], ["y"])],
                                   "keras_style", [x], [y], [two]), path)


def mixed(path: Path) -> Path:
    """Two inputs of different dtypes, two outputs:
    a: FP32 [N, 3], b: INT64 [N, 3] -> sum = a + float(b) (FP32), count = b * 2 (INT64)."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3])
    b = helper.make_tensor_value_info("b", TensorProto.INT64, ["N", 3])
    total = helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", 3])
    count = helper.make_tensor_value_info("count", TensorProto.INT64, ["N", 3])
    two = numpy_helper.from_array(np.array(2, dtype=np.int64), "two")
    nodes = [helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["a", "bf"], ["sum"]),
             helper.make_node("Mul", ["b", "two"], ["count"])]
    return _save(helper.make_graph(nodes, "mixed", [a, b], [total, count], [two]), path)


ALL_TYPES = {
    "BOOL": TensorProto.BOOL, "INT8": TensorProto.INT8, "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32, "INT64": TensorProto.INT64, "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16, "UINT32": TensorProto.UINT32, "UINT64": TensorProto.UINT64,
    "FP16": TensorProto.FLOAT16, "FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def identities(path: Path) -> Path:
    """One Identity per datatype: input in_<DT> [N, 2] -> output out_<DT>."""
    inputs, outputs, nodes = [], [], []
    for name, elem in ALL_TYPES.items():
        inputs.append(helper.make_tensor_value_info(f"in_{name}", elem, ["N", 2]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", elem, ["N", 2]))
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
    return _save(helper.make_graph(nodes, "identities", inputs, outputs), path)


def zipmap(path: Path) -> Path:
    """A classifier tail like skl2onnx writes: probabilities FP32 [N, 2] -> ZipMap."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])
    map_type = helper.make_map_type_proto(TensorProto.INT64,
                                          helper.make_tensor_type_proto(TensorProto.FLOAT, []))
    out = helper.make_value_info("probs", helper.make_sequence_type_proto(map_type))
    nodes = [helper.make_node("ZipMap", ["x"], ["probs"], domain="ai.onnx.ml",
                              classlabels_int64s=[0, 1])]
    opsets = OPSET + [helper.make_opsetid("ai.onnx.ml", 1)]
    return _save(helper.make_graph(nodes, "zipmap", [x], [out]), path, opsets)


def fixed(path: Path) -> Path:
    """A model with no batch dimension: x FP32 [2, 3] -> y = x + 1."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    one = numpy_helper.from_array(np.array(1, dtype=np.float32), "one")
    nodes = [helper.make_node("Add", ["x", "one"], ["y"])]
    return _save(helper.make_graph(nodes, "fixed", [x], [y], [one]), path)


def _loop(path: Path, name: str, trip_count: int | None) -> Path:
    """y = x after a Loop of empty iterations (about 0.6 µs each): from input ``n`` (INT64
    scalar) when ``trip_count`` is None, else that constant."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    inputs, inits = [x], []
    if trip_count is None:
        inputs.append(helper.make_tensor_value_info("n", TensorProto.INT64, []))
        trip = "n"
    else:
        inits.append(numpy_helper.from_array(np.array(trip_count, dtype=np.int64), "trip"))
        trip = "trip"
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Identity", ["v_in"], ["v_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["N", 4])])
    nodes = [helper.make_node("Loop", [trip, "", "x"], ["y"], body=body)]
    return _save(helper.make_graph(nodes, name, inputs, [y], inits), path)


def slow(path: Path) -> Path:
    """A model whose run time the request chooses: n iterations (n = 3_000_000 ≈ 2 s)."""
    return _loop(path, "slow", None)


def hanging(path: Path) -> Path:
    """A model that never finishes its warm-up run (2**62 iterations)."""
    return _loop(path, "hanging", 2**62)


def typed_outputs(path: Path) -> Path:
    """A classifier-like model with outputs of several datatypes and ranks, x: FP32 [N, 3] ->
    label = argmax(x) INT64 [N], code = label as UINT8 [N], positive = x > 0 BOOL [N, 3],
    half = x as FP16 [N, 3]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    outputs = [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
               helper.make_tensor_value_info("code", TensorProto.UINT8, ["N"]),
               helper.make_tensor_value_info("positive", TensorProto.BOOL, ["N", 3]),
               helper.make_tensor_value_info("half", TensorProto.FLOAT16, ["N", 3])]
    zero = numpy_helper.from_array(np.array(0, dtype=np.float32), "zero")
    nodes = [helper.make_node("ArgMax", ["x"], ["label"], axis=1, keepdims=0),
             helper.make_node("Cast", ["label"], ["code"], to=TensorProto.UINT8),
             helper.make_node("Greater", ["x", "zero"], ["positive"]),
             helper.make_node("Cast", ["x"], ["half"], to=TensorProto.FLOAT16)]
    return _save(helper.make_graph(nodes, "typed_outputs", [x], outputs, [zero]), path)


def with_total(path: Path) -> Path:
    """Outputs that share no batch dimension, x: FP32 [N, 4] -> y = x [N, 4] and
    total = sum of every element of x, FP32 [] (a scalar)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    total = helper.make_tensor_value_info("total", TensorProto.FLOAT, [])
    nodes = [helper.make_node("Identity", ["x"], ["y"]),
             helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0)]
    return _save(helper.make_graph(nodes, "with_total", [x], [y, total]), path)


def lookup(path: Path) -> Path:
    """y = table[i] with a table of 3 FP32 values, i: INT64 [N]: an index past 2 passes every
    check but makes ONNX Runtime fail at run time (the model could not run)."""
    i = helper.make_tensor_value_info("i", TensorProto.INT64, ["N"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])
    table = numpy_helper.from_array(np.array([0.5, 1.5, 2.5], dtype=np.float32), "table")
    nodes = [helper.make_node("Gather", ["table", "i"], ["y"], axis=0)]
    return _save(helper.make_graph(nodes, "lookup", [i], [y], [table]), path)
