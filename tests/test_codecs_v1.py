"""Unit tests for the V1 (TF Serving / KServe V1) answers: every datatype, rank and output count
in the rows ("predictions") and columns ("outputs") forms, checked against numpy's ``tolist``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import orjson
import pytest

from mserve.daemon.errors import BadRequest
from mserve.daemon.protocol import bigjson, codecs_v1, tensors
from mserve.daemon.protocol.codecs import DTYPES, RequestedOutput, TensorSpec, encode_response

IRIS = Path(__file__).resolve().parent.parent / "examples" / "iris" / "model.onnx"
INTEGERS = ["INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"]
FLOATS = ["FP16", "FP32", "FP64"]
ALL = [*INTEGERS, *FLOATS, "BOOL", "BYTES"]


def sample(datatype: str) -> np.ndarray:
    """Shape [3, 2, 2] of ``datatype``: integer extremes, float specials, text that is not UTF-8."""
    if datatype in INTEGERS:
        info = np.iinfo(DTYPES[datatype])
        values = [info.min, info.max, 0, 1, info.max - 1, 7, 2, 3, 100, info.min + 1, 5, 6]
    elif datatype in FLOATS:
        values = [0.5, -1.25, 0.1, math.nan, math.inf, -math.inf, -0.0, 65504.0, 1e-3, 3.0,
                  2.5, -7.75]
    elif datatype == "BOOL":
        values = [True, False, True, True, False, False, True, False, False, True, True, False]
    else:
        values = [b"a", b"", "\u00e9".encode(), b"\xffbad", b"x y", b"\x00", b"q", b"{}",
                  b"[1]", b"tab\t", b"\xe2\x82\xac", b"z"]
    dtype = DTYPES[datatype]
    array = np.empty(12, dtype=object) if dtype.kind == "O" else np.empty(12, dtype=dtype)
    array[:] = values
    return array.reshape(3, 2, 2)


def expected(array: np.ndarray):
    """What the JSON must hold: ``array.tolist()`` with BYTES as text, NaN and infinities as
    null, and FP16/FP32 values as the shortest text that reads back as the same FP32 value."""
    def element(value):
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace")
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, float) and array.dtype.itemsize < 8:
            return float(str(np.float32(value)))
        return value

    def walk(value):
        return [walk(item) for item in value] if isinstance(value, list) else element(value)

    return walk(array.tolist())


def rows(outputs: dict[str, np.ndarray]):
    return orjson.loads(codecs_v1.encode_predict(outputs, "instances"))["predictions"]


def columns(outputs: dict[str, np.ndarray]):
    return orjson.loads(codecs_v1.encode_predict(outputs, "inputs"))["outputs"]


def ranked(array: np.ndarray, rank: int) -> np.ndarray:
    """``array`` cut to ``rank`` (0 to 3), keeping three rows where it has a dim 0."""
    return {0: array[1:2, 1, 0].reshape(()), 1: array[:, 0, 1], 2: array[:, 1], 3: array}[rank]


# ---------------------------------------------------------------- one output


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("datatype", ALL)
def test_one_output_rows_are_its_rows(datatype, rank):
    array = ranked(sample(datatype), rank)
    assert rows({"out": array}) == expected(array)
    assert len(rows({"out": array})) == 3


@pytest.mark.parametrize("datatype", ALL)
def test_one_scalar_output_is_one_row(datatype):
    array = ranked(sample(datatype), 0)
    assert array.ndim == 0
    assert rows({"out": array}) == [expected(array)]


@pytest.mark.parametrize("rank", [0, 1, 2, 3])
@pytest.mark.parametrize("datatype", ALL)
def test_columns_give_each_output_whole(datatype, rank):
    array = ranked(sample(datatype), rank)
    assert columns({"out": array}) == expected(array)
    other = sample("FP32")[:, 0]
    assert columns({"out": array, "other": other}) == {"out": expected(array),
                                                       "other": expected(other)}


# ---------------------------------------------------------------- several outputs


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("datatype", ALL)
def test_several_outputs_give_one_object_per_row(datatype, rank):
    """As skl2onnx's classifiers: a 1-D label next to a [N, classes] probability matrix."""
    array = ranked(sample(datatype), rank)
    scores = sample("FP32")[:, 0]
    flags = sample("BOOL")[:, 1, 0]
    want = [{"out": expected(array)[i], "scores": expected(scores)[i],
             "flags": expected(flags)[i]} for i in range(3)]
    assert rows({"out": array, "scores": scores, "flags": flags}) == want


@pytest.mark.parametrize("datatype", ALL)
def test_every_datatype_as_onnx_runtime_types_it(datatype):
    """ONNX Runtime returns INT64 as numpy.longlong and UINT64 as numpy.ulonglong, types equal
    to int64/uint64 that orjson does not write as scalars: the 1-D output of a classifier."""
    ort_type = {"INT64": np.longlong, "UINT64": np.ulonglong}.get(datatype)
    array = sample(datatype)[:, 0, 0]
    if ort_type:
        array = array.astype(ort_type)
        assert array.dtype.type is ort_type
    scores = sample("FP32")[:, 0]
    assert rows({"label": array, "scores": scores}) == [
        {"label": expected(array)[i], "scores": expected(scores)[i]} for i in range(3)]
    assert columns({"label": array, "scores": scores}) == {"label": expected(array),
                                                           "scores": expected(scores)}


def test_floats_read_the_same_in_every_form_and_in_v2():
    """A 1-D FP32 output next to another is written element by element: the same text as
    a whole array (v1 one output, v1 columns and v2)."""
    values = np.array([0.1, 1 / 3, 2.0e-8], dtype=np.float32)
    several = rows({"v": values, "w": values[:, None]})
    alone = rows({"v": values})
    v2, _ = encode_response("m", "1", None, [(RequestedOutput("v", False), values)])
    assert [row["v"] for row in several] == alone == columns({"v": values})
    assert alone == orjson.loads(v2)["outputs"][0]["data"]
    assert np.array(alone, dtype=np.float32).tolist() == values.tolist()


def test_zipmap_outputs_are_json_text_next_to_the_label():
    """A skl2onnx classifier with ZipMap: label INT64 [N] and one JSON text per row."""
    probabilities = [{"0": 0.25, "1": 0.75}, {"0": 1.0, "1": 0.0}]
    label = np.array([1, 0], dtype=np.longlong)
    zipped = np.array([orjson.dumps(p) for p in probabilities], dtype=object)
    got = rows({"output_label": label, "output_probability": zipped})
    assert [row["output_label"] for row in got] == label.tolist()
    assert [orjson.loads(row["output_probability"]) for row in got] == probabilities
    assert columns({"output_probability": zipped}) == [p.decode() for p in zipped.tolist()]


def test_odd_layouts_are_written_by_value():
    """Byte-swapped, transposed and sliced arrays, and empty ones."""
    base = np.arange(12, dtype=np.int64).reshape(3, 4)
    for array in (base.astype(">i8"), base.T, base[:, ::2], base.astype(">f4")):
        assert rows({"a": array, "b": array[:, :1]}) == [
            {"a": expected(array)[i], "b": expected(array[:, :1])[i]} for i in range(len(array))]
    assert rows({"a": np.zeros((0, 3)), "b": np.zeros(0, np.int64)}) == []
    assert rows({"a": np.zeros((2, 0))}) == [[], []]


def test_iris_through_onnx_runtime():
    """The project's own example: label INT64 [N] and probabilities FP32 [N, 3]."""
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(IRIS), providers=["CPUExecutionProvider"])
    features = np.array([[5.1, 3.5, 1.4, 0.2], [7.0, 3.2, 4.7, 1.4], [6.3, 3.3, 6.0, 2.5]],
                        dtype=np.float32)
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(names, {"features": features})))
    got = rows(outputs)
    assert [row["label"] for row in got] == outputs["label"].tolist() == [0, 1, 2]
    assert [row["probabilities"] for row in got] == expected(outputs["probabilities"])
    assert columns(outputs) == {name: expected(array) for name, array in outputs.items()}


# ---------------------------------------------------------------- outputs that are not rows


@pytest.mark.parametrize("outputs, words", [
    ({"p": np.zeros(2), "q": np.zeros(3)}, "output 'q' has 3 rows (shape [3]) but 'p' has 2"),
    ({"p": np.zeros((2, 4)), "q": np.zeros((5, 2), np.int64)},
     "output 'q' has 5 rows (shape [5, 2]) but 'p' has 2 (shape [2, 4])"),
    ({"p": np.zeros(2), "n": np.array(7, np.int64)}, "output 'n' is a scalar (shape [])"),
    ({"n": np.array(7, np.int64), "p": np.zeros(2)}, "output 'n' is a scalar (shape [])"),
])
def test_rows_of_outputs_without_a_shared_batch_are_a_400(outputs, words):
    """TF Serving answers INVALID_ARGUMENT (400) "Tensor name: q has inconsistent batch size";
    mserve says which output, why, and that the columnar form works."""
    with pytest.raises(BadRequest) as info:
        codecs_v1.encode_predict(outputs, "instances")
    assert info.value.status == 400
    assert words in info.value.message and "batch dimension" in info.value.message
    assert '{"inputs": ...}' in info.value.message
    assert set(columns(outputs)) == set(outputs)  # the way out works


def test_json_ready_leaves_v2_answers_unchanged():
    """numpy.longlong and int64 arrays, and the same values byte-swapped: the same v2 bytes."""
    for char, native in (("q", np.int64), ("Q", np.uint64)):
        values = np.array([[0, 1], [2, np.iinfo(native).max]], dtype=native)
        answers = {encode_response("m", "1", None, [(RequestedOutput("y", False), array)])[0]
                   for array in (values, values.astype(char), values.astype(values.dtype
                                                                           .newbyteorder()))}
        assert len(answers) == 1


# ---------------------------------------------------------------- large requests (issue 13)

WIDE = [TensorSpec("x", "FP32", (-1, 4))]


def refused(doc, specs=WIDE, **kwargs) -> str:
    with pytest.raises(BadRequest) as info:
        codecs_v1.parse_predict(orjson.dumps(doc), specs, **kwargs)
    return info.value.message


def test_large_instances_of_the_wrong_shape_are_refused_before_converting(monkeypatch):
    def converted(*args, **kwargs):
        raise AssertionError("the rows were converted")
    monkeypatch.setattr(codecs_v1, "array_from_json", converted)
    rows = [[0, 0, 0]] * 20000
    assert refused({"instances": rows}) == "input 'x': dimension 1 must be 4, got 3"
    assert refused({"inputs": {"x": [[0, 0, 0, 0]] * 20000}}, max_elements=50000) == \
        "input 'x': 80000 elements is more than the limit of 50000"


@pytest.fixture
def slices(monkeypatch):
    """Slices of 8 rows or elements, and pieces of 8 numbers written per call."""
    for module in (tensors, codecs_v1):
        monkeypatch.setattr(module, "SLICE_ELEMENTS", 8)
    monkeypatch.setattr(bigjson, "PIECE_ELEMENTS", 8)


def test_large_instances_by_slices(slices):
    rows = [[index, 0.5, -1, 2] for index in range(50)]
    arrays, form = codecs_v1.parse_predict(orjson.dumps({"instances": rows}), WIDE)
    np.testing.assert_array_equal(arrays["x"], np.array(rows, dtype=np.float32))
    named = [{"a": index, "s": ["t"]} for index in range(50)]
    arrays, _ = codecs_v1.parse_predict(orjson.dumps({"instances": named}), [
        TensorSpec("a", "INT64", (-1,)), TensorSpec("s", "BYTES", (-1, 1))])
    assert arrays["a"].tolist() == list(range(50)) and arrays["s"].shape == (50, 1)


def test_a_mix_of_rows_in_a_later_slice_is_found(slices):
    specs = [TensorSpec("x", "FP32", (-1, 4))]
    mixed = [[0, 0, 0, 0]] * 20 + [{"x": [0, 0, 0, 0]}]
    assert "not a mix" in refused({"instances": mixed}, specs)
    named = [{"x": [0, 0, 0, 0]}] * 20 + [[0, 0, 0, 0]]
    assert "not a mix" in refused({"instances": named}, specs)


@pytest.mark.parametrize("form", ["instances", "inputs"])
def test_large_answers_are_written_in_pieces_as_before(slices, form):
    outputs = {"p": np.arange(60, dtype=np.float32).reshape(20, 3),
               "q": np.arange(20) % 3 == 0}
    doc = orjson.loads(codecs_v1.encode_predict(outputs, form))
    if form == "instances":
        assert doc == {"predictions": [{"p": outputs["p"][i].tolist(), "q": bool(outputs["q"][i])}
                                       for i in range(20)]}
    else:
        assert doc == {"outputs": {name: array.tolist() for name, array in outputs.items()}}
    one = orjson.loads(codecs_v1.encode_predict({"p": outputs["p"]}, form))
    assert one == {"predictions" if form == "instances" else "outputs": outputs["p"].tolist()}
