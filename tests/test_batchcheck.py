"""The batching decision (daemon/worker/batchcheck.py) on real ONNX Runtime sessions of models
shaped like real exporters' (built here with the onnx helper API), and StringNormalizer's
locale fallback (daemon/worker/stringlocale.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mserve.daemon.errors import DeployFailed
from mserve.daemon.worker import runtime, stringlocale

RNG = np.random.default_rng(7)


def _save(path: Path, nodes, inputs, outputs, inits=(), opset=17) -> str:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def _weights(name: str, shape, dtype=np.float32):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(dtype), name)


def gru(path: Path, with_state: bool) -> str:
    """PyTorch's default GRU layout: input [seq, batch, 8], dim 0 is time."""
    hidden = 4
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["seq", "batch", 8])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["seq", 1, "batch", hidden])
    h = helper.make_tensor_value_info("hn", TensorProto.FLOAT, [1, "batch", hidden])
    outs = ["output", "hn"] if with_state else ["output"]
    node = helper.make_node("GRU", ["input", "W", "R"], outs, hidden_size=hidden)
    return _save(path, [node], [x], [y, h] if with_state else [y],
                 [_weights("W", (1, 3 * hidden, 8)), _weights("R", (1, 3 * hidden, hidden))])


def nonzero(path: Path, declared) -> str:
    """Detections-like: the indices of non-zero inputs, [K, 2]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, declared or [None, None])
    return _save(path, [helper.make_node("NonZero", ["x"], ["nz"]),
                        helper.make_node("Transpose", ["nz"], ["y"], perm=[1, 0])], [x], [y])


def quantized(path: Path) -> str:
    """Dynamic quantization: one scale for the whole batch, so rows affect each other."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    w = numpy_helper.from_array(RNG.integers(0, 255, (8, 4)).astype(np.uint8), "w")
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "scale", "zero"]),
             helper.make_node("MatMulInteger", ["q", "w", "zero"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["accf", "scale"], ["y"])]
    return _save(path, nodes, [x], [y], [w])


def mlp(path: Path, out_dim0="batch", in_dim0="batch") -> str:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [in_dim0, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [out_dim0, 4])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    return _save(path, nodes, [x], [y], [_weights("w", (8, 4))])


def row_softmax_over_batch(path: Path) -> str:
    """Softmax over axis 0: every row depends on the others (a 'batch-dependent' model)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    return _save(path, [helper.make_node("Softmax", ["x"], ["y"], axis=0)], [x], [y])


@pytest.mark.parametrize("build, reason", [
    (lambda p: gru(p, True), "output 'hn' dim 0 is fixed (1)"),
    (lambda p: gru(p, False), "output 'output' differed when requests shared a run"),
    (lambda p: nonzero(p, None), "the graph has NonZero"),
    (lambda p: nonzero(p, ["K", 2]), "output 'y' dim 0 ('K') is not the inputs' dim 0 ('N')"),
    (quantized, "output 'y' differed when requests shared a run"),
    (row_softmax_over_batch, "output 'y' differed when requests shared a run"),
    (lambda p: mlp(p, out_dim0=2), "output 'y' dim 0 is fixed (2)"),
    (lambda p: mlp(p, in_dim0=1, out_dim0=1), "input 'x' has a fixed dim 0 (1)"),
])
def test_models_whose_dim0_is_not_a_batch_are_not_batched(tmp_path, build, reason):
    model = runtime.load(1, build(tmp_path / "m.onnx"))
    assert not model.batchable
    assert reason in model.batching.reason
    assert model.meta()["batching"] == {"enabled": False, "reason": model.batching.reason}


@pytest.mark.parametrize("out_dim0", ["batch", None])
def test_a_batch_major_model_is_batched(tmp_path, out_dim0):
    """Named the same as the input's dim 0, or unnamed (ONNX Runtime infers it): batched."""
    model = runtime.load(1, mlp(tmp_path / "m.onnx", out_dim0=out_dim0))
    assert model.batchable, model.batching.reason
    assert model.meta()["batchable"] is True


def test_modes_on_and_off(tmp_path):
    path = gru(tmp_path / "gru.onnx", True)
    assert runtime.load(1, path, batching="on").batchable
    assert "forced on" in runtime.load(1, path, batching="on").batching.reason
    off = runtime.load(1, mlp(tmp_path / "m.onnx"), batching="off")
    assert not off.batchable and "--batching off" in off.batching.reason
    # A fixed dim 0 cannot be joined whatever the user says.
    assert not runtime.load(1, mlp(tmp_path / "f.onnx", in_dim0=1, out_dim0=1),
                            batching="on").batchable
    with pytest.raises(DeployFailed, match="batching mode"):
        runtime.load(1, path, batching="sometimes")


def _normalizer(path: Path, locale: str | None) -> str:
    x = helper.make_tensor_value_info("x", TensorProto.STRING, ["N"])
    y = helper.make_tensor_value_info("y", TensorProto.STRING, ["N"])
    attrs = {"case_change_action": "LOWER"}
    if locale is not None:
        attrs["locale"] = locale
    return _save(path, [helper.make_node("StringNormalizer", ["x"], ["y"], **attrs)], [x], [y])


def _has_locale(name: str) -> bool:
    try:
        ort.InferenceSession(_normalizer(Path(f"/tmp/ms-locale-{name}.onnx"), name),
                             providers=["CPUExecutionProvider"])
        return True
    except Exception:
        return False


@pytest.mark.parametrize("locale", [None, "en_US.UTF-8"])
def test_string_normalizer_loads_without_the_en_us_locale(tmp_path, locale):
    """On a machine without en_US.UTF-8 (this one, most containers) the model loads with
    C.UTF-8 and lower-cases non-ASCII text the same way."""
    path = _normalizer(tmp_path / "norm.onnx", locale)
    model = runtime.load(1, path)
    words = np.array(["HÉLLO", "Wörld ΑΒΓ", "ǅ"], dtype=object)
    (got,) = model.run({"x": words}, ["y"])
    assert list(got) == [w.lower() for w in words]
    if not _has_locale("en_US.UTF-8"):
        assert model.notes and "C.UTF-8" in model.notes[0]


def test_locale_rewrite_matches_the_onnx_library(tmp_path):
    """The protobuf rewrite gives what onnx's own API gives, and keeps everything else."""
    path = _normalizer(tmp_path / "norm.onnx", None)
    rewritten = onnx.load_from_string(stringlocale.with_fallback_locale(path))
    expected = onnx.load(path)
    expected.graph.node[0].attribute.append(helper.make_attribute("locale", "C.UTF-8"))
    assert rewritten == expected
    # An explicit en_US is replaced, not doubled.
    explicit = onnx.load_from_string(stringlocale.with_fallback_locale(
        _normalizer(tmp_path / "en.onnx", "en_US.UTF-8")))
    assert [(a.name, a.s) for a in explicit.graph.node[0].attribute
            if a.name == "locale"] == [("locale", b"C.UTF-8")]


def test_another_missing_locale_names_the_fix(tmp_path):
    if _has_locale("tr_TR.UTF-8"):
        pytest.skip("this machine has tr_TR.UTF-8")
    with pytest.raises(DeployFailed, match="needs the 'tr_TR.UTF-8' locale.*install it"):
        runtime.load(1, _normalizer(tmp_path / "tr.onnx", "tr_TR.UTF-8"))


def test_a_cnn_with_dynamic_height_and_width_warms_up_and_batches(tmp_path):
    """torch exports with dynamic_axes {0: batch, 2: height, 3: width}: a 3x3 convolution
    cannot run on a 1x1 image, so warm-up and the check use a size that runs."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "h", "w"])
    y = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4, 1, 1])
    nodes = [helper.make_node("Conv", ["images", "k"], ["c"], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["features"])]
    path = _save(tmp_path / "cnn.onnx", nodes, [x], [y], [_weights("k", (4, 3, 3, 3))])
    model = runtime.load(1, path)
    assert model.fill == 8 and model.batchable, model.batching.reason


def test_a_model_that_refuses_random_samples_is_checked_with_warm_up_values(tmp_path):
    """A one-hot encoder that knows only its own categories (zeros=0: an unknown one is an
    error) beside a float input: checked again with empty strings, and batched."""
    cats = helper.make_tensor_value_info("cat", TensorProto.STRING, ["N", 1])
    num = helper.make_tensor_value_info("num", TensorProto.FLOAT, ["N", 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    nodes = [helper.make_node("OneHotEncoder", ["cat"], ["hot"], domain="ai.onnx.ml",
                              cats_strings=["", "known"], zeros=0),
             helper.make_node("Reshape", ["hot", "shape"], ["flat"]),
             helper.make_node("Add", ["flat", "num"], ["y"])]
    shape = numpy_helper.from_array(np.array([-1, 2], dtype=np.int64), "shape")
    graph = helper.make_graph(nodes, "onehot", [cats, num], [y], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    path = tmp_path / "onehot.onnx"
    onnx.save(model, str(path))
    loaded = runtime.load(1, str(path))
    assert loaded.batchable, loaded.batching.reason
    with pytest.raises(Exception, match="could not run"):
        loaded.run({"cat": np.array([["alpha"]], dtype=object),
                    "num": np.zeros((1, 1), np.float32)}, ["y"])
