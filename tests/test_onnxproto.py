"""Unit tests for daemon/onnxproto.py's external-data scan, checked against the onnx package
(``onnx.load(..., load_external_data=False)`` + ``onnx.external_data_helper``)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from mserve.daemon.onnxproto import external_data_locations

OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]


def const(name: str, value: float) -> TensorProto:
    return numpy_helper.from_array(np.full([2], value, dtype=np.float32), name)


def branch(name: str, value: float) -> onnx.GraphProto:
    """A subgraph with an initializer and a Constant node: out = c + w."""
    out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("Constant", [], [f"{name}_c"], value=const(f"{name}_k", value)),
             helper.make_node("Add", [f"{name}_c", f"{name}_w"], [f"{name}_out"])]
    return helper.make_graph(nodes, name, [], [out], [const(f"{name}_w", value)])


def loop_body() -> onnx.GraphProto:
    i = helper.make_tensor_value_info("i", TensorProto.INT64, [])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    acc = helper.make_tensor_value_info("acc", TensorProto.FLOAT, [2])
    outs = [helper.make_tensor_value_info(n, t, s) for n, t, s in
            (("cond_out", TensorProto.BOOL, []), ("acc_out", TensorProto.FLOAT, [2]))]
    nodes = [helper.make_node("Identity", ["cond"], ["cond_out"]),
             helper.make_node("Add", ["acc", "step"], ["acc_out"])]
    return helper.make_graph(nodes, "body", [i, cond, acc], outs, [const("step", 1.0)])


def every_place_model() -> onnx.ModelProto:
    """Tensors in each place external data can hide: initializers, a Constant, If branches,
    a Loop body, and a local function's Constant."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    flag = helper.make_tensor_value_info("flag", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    fn = helper.make_function(
        "local", "AddK", ["a"], ["b"],
        [helper.make_node("Constant", [], ["k"], value=const("fn_k", 3.0)),
         helper.make_node("Add", ["a", "k"], ["b"])], [helper.make_opsetid("", 17)])
    nodes = [
        helper.make_node("Constant", [], ["c"], value=const("main_k", 2.0)),
        helper.make_node("If", ["flag"], ["picked"], then_branch=branch("then", 1.0),
                         else_branch=branch("else", -1.0)),
        helper.make_node("Loop", ["trips", "", "picked"], ["looped"], body=loop_body()),
        helper.make_node("AddK", ["looped"], ["z"], domain="local"),
        helper.make_node("Add", ["x", "z"], ["xz"]),
        helper.make_node("Mul", ["xz", "c"], ["y0"]),
        helper.make_node("Add", ["y0", "w"], ["y"]),
    ]
    inits = [const("w", 0.5), numpy_helper.from_array(np.array(2, dtype=np.int64), "trips")]
    graph = helper.make_graph(nodes, "every", [x, flag], [y], inits)
    return helper.make_model(graph, opset_imports=OPSETS, functions=[fn])


def externalize(tensor: TensorProto, location: str) -> None:
    external_data_helper.set_external_data(tensor, location=location)
    tensor.ClearField("raw_data")


def onnx_says(path) -> list[str]:
    """What the onnx package finds (it leaves sparse initializers out)."""
    model = onnx.load(str(path), load_external_data=False)
    return sorted({external_data_helper.ExternalDataInfo(t).location
                   for t in external_data_helper._get_all_tensors(model)
                   if external_data_helper.uses_external_data(t)})


def test_torch_style_export_names_its_one_data_file(tmp_path):
    model = every_place_model()
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    assert (tmp_path / "model.onnx.data").is_file()
    assert external_data_locations(path) == onnx_says(path) == ["model.onnx.data"]


def test_finds_every_place_onnx_finds(tmp_path):
    model = every_place_model()
    for tensor in external_data_helper._get_all_tensors(model):
        externalize(tensor, f"data/{tensor.name}.bin")
    path = tmp_path / "every.onnx"
    path.write_bytes(model.SerializeToString())
    expected = sorted(f"data/{n}.bin" for n in (
        "w", "trips", "main_k", "then_k", "then_w", "else_k", "else_w", "step", "fn_k"))
    assert onnx_says(path) == expected
    assert external_data_locations(path) == expected


def test_finds_sparse_initializers_and_sparse_attributes(tmp_path):
    values = numpy_helper.from_array(np.array([1.0, 2.0], dtype=np.float32), "sv")
    indices = numpy_helper.from_array(np.array([0, 3], dtype=np.int64), "si")
    externalize(values, "values.bin")
    externalize(indices, "indices.bin")
    sparse = helper.make_sparse_tensor(values, indices, [4])
    attr_values = numpy_helper.from_array(np.array([5.0], dtype=np.float32), "av")
    externalize(attr_values, "attr.bin")
    attr_sparse = helper.make_sparse_tensor(attr_values, numpy_helper.from_array(
        np.array([1], dtype=np.int64), "ai"), [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    node = helper.make_node("Constant", [], ["y"], sparse_value=attr_sparse)
    graph = helper.make_graph([node], "sparse", [], [y], sparse_initializer=[sparse])
    path = tmp_path / "sparse.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    assert external_data_locations(path) == ["attr.bin", "indices.bin", "values.bin"]


def test_inline_tensors_and_stray_entries_are_not_external(tmp_path):
    model = every_place_model()
    stray = model.graph.initializer[0]
    stray.external_data.add(key="location", value="ignored.bin")  # data_location DEFAULT
    path = tmp_path / "inline.onnx"
    onnx.save_model(model, str(path))
    assert external_data_locations(path) == onnx_says(path) == []


def test_the_last_location_entry_counts(tmp_path):
    model = every_place_model()
    tensor = model.graph.initializer[0]
    externalize(tensor, "first.bin")
    tensor.external_data.add(key="location", value="second.bin")
    path = tmp_path / "twice.onnx"
    path.write_bytes(model.SerializeToString())
    assert external_data_locations(path) == onnx_says(path) == ["second.bin"]


def test_unreadable_bytes_are_a_value_error(tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert external_data_locations(empty) == []
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a model\n" * 10)
    with pytest.raises(ValueError):
        external_data_locations(junk)
    whole = every_place_model().SerializeToString()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError):
        external_data_locations(truncated)
