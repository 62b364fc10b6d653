"""Unit tests for the v2 (Open Inference Protocol) and v1 (TF Serving) codecs: pure and fast."""

import base64
import time

import numpy as np
import orjson
import pytest

from mserve.daemon.errors import BadRequest, MserveError
from mserve.daemon.protocol import bigjson, codecs, codecs_v1, tensors
from mserve.daemon.protocol.codecs import (DTYPES, ORT_TYPES, InferRequest, RequestedOutput,
                                         TensorSpec, binary_bytes, check_inputs, check_outputs,
                                         datatype_of, encode_error, encode_response,
                                         json_ready, model_metadata, parse_request)

NUMERIC = ["UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
           "FP16", "FP32", "FP64"]
SAMPLES = {name: np.arange(6, dtype=DTYPES[name]).reshape(2, 3) for name in NUMERIC}
SAMPLES["BOOL"] = np.array([[True, False, True], [False, False, True]])
SAMPLES["BYTES"] = np.array([[b"a", b"", "é".encode()], [b"xyz", b"\x00\xff", b"q"]], dtype=object)


def body_of(inputs, **extra) -> bytes:
    return orjson.dumps({"inputs": inputs, **extra})


def one_input(name="x", datatype="FP32", shape=(2, 3), **fields) -> dict:
    return {"name": name, "datatype": datatype, "shape": list(shape), **fields}


def binary_body(doc: dict, *chunks: bytes) -> tuple[bytes, int]:
    header = orjson.dumps(doc)
    return header + b"".join(chunks), len(header)


def parse_error(body, header_length=None, **kwargs) -> str:
    with pytest.raises(BadRequest) as info:
        parse_request(body, header_length, **kwargs)
    return info.value.message


def split_response(body: bytes, headers: dict) -> tuple[dict, bytes]:
    length = int(headers["inference-header-content-length"])
    return orjson.loads(body[:length]), body[length:]


# ---------------------------------------------------------------- datatypes


def test_datatype_tables_are_consistent():
    assert set(ORT_TYPES.values()) == set(DTYPES)
    assert ORT_TYPES["tensor(float)"] == "FP32" and ORT_TYPES["tensor(string)"] == "BYTES"
    for name, dtype in DTYPES.items():
        assert datatype_of(np.zeros(2, dtype=dtype)) == name


def test_datatype_of_strings_and_byte_order():
    assert datatype_of(np.array(["a"])) == "BYTES"
    assert datatype_of(np.array([b"a"])) == "BYTES"
    assert datatype_of(np.zeros(2, dtype=">f4")) == "FP32"
    with pytest.raises(MserveError, match="complex128"):
        datatype_of(np.zeros(2, dtype=np.complex128))


# ---------------------------------------------------------------- JSON inputs


@pytest.mark.parametrize("datatype", NUMERIC + ["BOOL", "BYTES"])
def test_json_round_trip(datatype):
    sample = SAMPLES[datatype]
    data = sample.tolist()
    if datatype == "BYTES":
        data = [[item.decode("utf-8", "replace") for item in row] for row in data]
    request = parse_request(body_of([one_input(datatype=datatype, data=data)]), None)
    (item,) = request.inputs
    assert item.array.dtype == DTYPES[datatype] and item.array.shape == (2, 3)
    if datatype == "BYTES":
        assert item.array[1, 1] == "\x00\ufffd".encode() and item.array[0, 2] == "é".encode()
    else:
        np.testing.assert_array_equal(item.array, sample)
    body, headers = encode_response("m", "1", None, [(RequestedOutput("y", False), item.array)])
    assert headers == {"content-type": "application/json"}
    (out,) = orjson.loads(body)["outputs"]
    assert out["datatype"] == datatype and out["shape"] == [2, 3]
    assert out["data"] == [value for row in data for value in row]


def test_flat_and_nested_data_agree():
    flat = parse_request(body_of([one_input(data=[1, 2, 3, 4, 5, 6])]), None).inputs[0].array
    nested = parse_request(body_of([one_input(data=[[1, 2, 3], [4, 5, 6]])]), None).inputs[0].array
    other = parse_request(body_of([one_input(data=[[1, 2], [3, 4], [5, 6]])]), None).inputs[0].array
    np.testing.assert_array_equal(flat, nested)
    np.testing.assert_array_equal(flat, other)
    assert other.shape == (2, 3)


def test_scalar_and_empty_shapes():
    scalar = parse_request(body_of([one_input(shape=[], data=[7])]), None).inputs[0]
    assert scalar.array.shape == () and scalar.array == 7
    empty = parse_request(body_of([one_input(shape=[0, 3], data=[])]), None).inputs[0]
    assert empty.array.shape == (0, 3) and empty.array.dtype == np.float32
    words = parse_request(body_of([one_input(datatype="BYTES", shape=[0], data=[])]), None)
    assert words.inputs[0].array.shape == (0,)


def test_request_fields():
    body = body_of([one_input(data=[0] * 6)], id="42",
                   parameters={"binary_data_output": True, "k": 1},
                   outputs=[{"name": "a"}, {"name": "b", "parameters": {"binary_data": False}}])
    request = parse_request(body, None)
    assert request.id == "42" and request.parameters["k"] == 1 and request.binary_output
    assert request.outputs == [RequestedOutput("a", True), RequestedOutput("b", False)]
    plain = parse_request(body_of([one_input(data=[0] * 6)], outputs=[]), None)
    assert plain.id is None and plain.outputs is None and not plain.binary_output


@pytest.mark.parametrize("datatype, data, fragment", [
    ("INT32", [1, 2.5], "must be integers"),
    ("INT8", [1, 300], "out of range for INT8"),
    ("UINT8", [-1, 0], "out of range for UINT8"),
    ("INT64", [-1, 2**63], "out of range for INT64"),
    ("UINT64", [1e20, 0], "out of range for UINT64"),
    ("FP16", [1e6, 0], "out of range for FP16"),
    ("FP32", [1e300, 0], "out of range for FP32"),
    ("FP32", ["1", "2"], "must be numbers, got strings"),
    ("INT32", [True, False], "must be numbers, got booleans"),
    ("FP64", [1, None], "must be numbers"),
    ("FP64", [{"a": 1}, 2], "must be numbers"),
    ("BOOL", [2, 0], "true/false or 0/1"),
    ("BOOL", ["true", "false"], "true/false or 0/1"),
    ("BYTES", [1, 2], "BYTES data must be strings"),
    ("BYTES", [{"b64": "AA=="}, "a"], "BYTES data must be strings"),
])
def test_bad_json_values(datatype, data, fragment):
    message = parse_error(body_of([one_input(datatype=datatype, shape=[2], data=data)]))
    assert fragment in message and "input 'x'" in message


def test_integral_floats_and_extremes_are_accepted():
    ints = parse_request(body_of([one_input(datatype="INT32", shape=[2], data=[1.0, -3])]), None)
    np.testing.assert_array_equal(ints.inputs[0].array, [1, -3])
    big = [2**64 - 1, 0]
    uints = parse_request(body_of([one_input(datatype="UINT64", shape=[2], data=big)]), None)
    assert uints.inputs[0].array[0] == 2**64 - 1
    low = [-(2**63), 2**63 - 1]
    assert parse_request(body_of([one_input(datatype="INT64", shape=[2], data=low)]),
                         None).inputs[0].array.tolist() == low
    bools = parse_request(body_of([one_input(datatype="BOOL", shape=[3], data=[1, 0, 1])]), None)
    assert bools.inputs[0].array.tolist() == [True, False, True]


@pytest.mark.parametrize("datatype, data", [
    ("FP32", [[1, 2], [3]]), ("FP32", [1, [2, 3]]), ("BYTES", [["a", "b"], ["c"]]),
    ("BYTES", ["a", ["b"]]), ("BOOL", [[True], [False, True]]),
])
def test_ragged_data(datatype, data):
    message = parse_error(body_of([one_input(datatype=datatype, shape=[3], data=data)]))
    assert "input 'x': data is ragged or not rectangular" in message


def test_element_count_must_match_shape():
    message = parse_error(body_of([one_input(data=[1, 2, 3, 4, 5])]))
    assert message == "input 'x': expected 6 elements for shape [2, 3], got 5"


def test_deeply_nested_json():
    assert "not valid JSON" in parse_error(b'{"inputs": ' + b"[" * 10000 + b"]" * 10000 + b"}")
    assert "not valid JSON" in parse_error(b"[" * 10000)
    data = [1]
    for _ in range(200):
        data = [data]
    assert "nested more than" in parse_error(body_of([one_input(shape=[1], data=data)]))
    ragged_deep = [[1], data]
    assert "input 'x'" in parse_error(body_of([one_input(shape=[2], data=ragged_deep)]))
    for datatype in ("BYTES", "BOOL"):
        deep = [one_input(datatype=datatype, shape=[1], data=data)]
        assert "nested" in parse_error(body_of(deep))


@pytest.mark.parametrize("body, fragment", [
    (b"", "request body is empty"),
    (b"{nope", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object, got an array"),
    (b"{}", "'inputs' must be a non-empty list"),
    (b'{"inputs": {}}', "'inputs' must be a non-empty list"),
    (b'{"inputs": []}', "'inputs' must be a non-empty list"),
    (b'{"inputs": [3]}', "inputs[0] must be an object"),
    (b'{"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}', "inputs[0]: 'name'"),
    (b'{"inputs": [{"name": 5, "datatype": "FP32", "shape": [1], "data": [1]}]}', "'name'"),
    (b'{"inputs": [{"name": "x", "shape": [1], "data": [1]}]}', "input 'x': unknown datatype"),
    (b'{"inputs": [{"name": "x", "datatype": ["FP32"], "shape": [1], "data": [1]}]}',
     "unknown datatype"),
    (b'{"inputs": [{"name": "x", "datatype": "FP128", "shape": [1], "data": [1]}]}', "'FP128'"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "data": [1]}]}', "input 'x': 'shape'"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": 3, "data": [1]}]}', "'shape'"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}',
     "input 'x': 'data' is missing"),
    (b'{"id": 5, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}',
     "'id' must be a string"),
    (b'{"parameters": [], "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], '
     b'"data": [1]}]}',
     "'parameters' must be an object"),
    (b'{"parameters": {"binary_data_output": 1}, "inputs": [{"name": "x", "datatype": "FP32", '
     b'"shape": [1], "data": [1]}]}', "'binary_data_output' must be true or false"),
])
def test_malformed_requests(body, fragment):
    assert fragment in parse_error(body)


def test_duplicate_input_and_bad_outputs():
    twice = [one_input(shape=[1], data=[1]), one_input(shape=[1], data=[2])]
    assert "input 'x' is given more than once" in parse_error(body_of(twice))
    base = [one_input(shape=[1], data=[1])]
    assert "'outputs' must be a list" in parse_error(body_of(base, outputs={"name": "y"}))
    assert "outputs[0]" in parse_error(body_of(base, outputs=[{"nom": "y"}]))
    assert "output 'y' is requested more than once" in parse_error(
        body_of(base, outputs=[{"name": "y"}, {"name": "y"}]))
    assert "output 'y': parameter 'binary_data'" in parse_error(
        body_of(base, outputs=[{"name": "y", "parameters": {"binary_data": "yes"}}]))


@pytest.mark.parametrize("shape, fragment", [
    ([2, -3], "non-negative integers"),
    ([2, 1.5], "non-negative integers"),
    ([True, 2], "non-negative integers"),
    (["2"], "non-negative integers"),
    ([10**12, 10**12], "more than the limit"),
    ([1] * 40, "rank 40"),
])
def test_bad_shapes(shape, fragment):
    message = parse_error(body_of([one_input(shape=shape, data=[1])]))
    assert fragment in message and message.startswith("input 'x'")


def test_enormous_shapes_are_refused_without_allocating():
    start = time.perf_counter()
    huge = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [0, 1%s], "data": []}]}' % (
        b"0" * 30)
    assert "non-negative integers" in parse_error(huge)  # orjson reads 10**30 as a float
    assert "more than the limit" in parse_error(body_of([one_input(shape=[0, 10**15], data=[])]))
    doc = {"inputs": [one_input(shape=[10**12, 10**12], parameters={"binary_data_size": 8})]}
    body, length = binary_body(doc, b"\0" * 8)
    assert "more than the limit" in parse_error(body, length)
    small_limit = parse_error(body_of([one_input(data=[0] * 6)]), max_elements=5)
    assert "[2, 3] has more than the limit of 5 elements" in small_limit
    assert time.perf_counter() - start < 1


# ---------------------------------------------------------------- binary inputs


@pytest.mark.parametrize("datatype", NUMERIC + ["BOOL", "BYTES"])
def test_binary_round_trip(datatype):
    sample = SAMPLES[datatype]
    raw = binary_bytes(sample)
    doc = {"inputs": [one_input(datatype=datatype, parameters={"binary_data_size": len(raw)})]}
    request = parse_request(*binary_body(doc, raw))
    array = request.inputs[0].array
    assert array.dtype == DTYPES[datatype] and array.shape == (2, 3)
    np.testing.assert_array_equal(array, sample)
    requested = RequestedOutput("y", True)
    body, headers = encode_response("m", "1", "7", [(requested, array)])
    assert headers["content-type"] == "application/octet-stream"
    header, rest = split_response(body, headers)
    assert header["id"] == "7" and rest == raw
    (out,) = header["outputs"]
    assert out == {"name": "y", "datatype": datatype, "shape": [2, 3],
                   "parameters": {"binary_data_size": len(raw)}}


def test_binary_layouts():
    assert binary_bytes(np.array([True, False])) == b"\x01\x00"
    assert binary_bytes(np.array([1.0], dtype=">f4")) == np.float32(1).tobytes()
    assert binary_bytes(np.array(["hé", b"x"], dtype=object)) == b"\x03\0\0\0h\xc3\xa9\x01\0\0\0x"
    assert binary_bytes(np.arange(4, dtype=np.int16).reshape(2, 2)[:, 0]) == b"\0\0\2\0"


def test_binary_and_json_inputs_mixed():
    first, second = np.arange(4, dtype=np.int32), np.array([b"hi", b"there"], dtype=object)
    raw1, raw2 = binary_bytes(first), binary_bytes(second)
    doc = {"inputs": [one_input("a", "INT32", [4], parameters={"binary_data_size": len(raw1)}),
                      one_input("j", "FP64", [1], data=[0.5]),
                      one_input("b", "BYTES", [2], parameters={"binary_data_size": len(raw2)})]}
    request = parse_request(*binary_body(doc, raw1, raw2))
    a, j, b = (item.array for item in request.inputs)
    assert a.tolist() == [0, 1, 2, 3] and j.tolist() == [0.5] and b.tolist() == [b"hi", b"there"]


def binary_error(doc: dict, *chunks: bytes) -> str:
    return parse_error(*binary_body(doc, *chunks))


def test_lying_binary_sizes():
    doc = {"inputs": [one_input(datatype="FP64", parameters={"binary_data_size": 48})]}
    assert binary_error(doc, b"\0" * 40) == \
        "binary data: inputs declare 48 bytes but the body has 40"
    doc = {"inputs": [one_input(datatype="FP64", parameters={"binary_data_size": 40})]}
    assert "binary_data_size is 40 but shape [2, 3] of FP64 needs 48 bytes" in \
        binary_error(doc, b"\0" * 40)
    doc = {"inputs": [one_input(parameters={"binary_data_size": 24})]}
    assert "no Inference-Header-Content-Length header" in parse_error(orjson.dumps(doc))
    for size in (-1, 1.5, "24", True):
        doc = {"inputs": [one_input(parameters={"binary_data_size": size})]}
        assert "binary_data_size must be a non-negative integer" in binary_error(doc, b"\0" * 24)
    doc = {"inputs": [one_input(data=[0] * 6, parameters={"binary_data_size": 24})]}
    assert "both 'data' and binary_data_size" in binary_error(doc, b"\0" * 24)


def test_header_length_bounds():
    body, length = binary_body({"inputs": [one_input(data=[0] * 6)]})
    assert parse_request(body, length).inputs[0].array.shape == (2, 3)
    for bad in (0, -1, length + 1):
        assert "Inference-Header-Content-Length" in parse_error(body, bad)
    assert "inputs declare 0 bytes but the body has 3" in parse_error(body + b"abc", length)
    assert "not valid JSON" in parse_error(body, length - 1)


def test_bool_binary_must_be_zero_or_one():
    doc = {"inputs": [one_input(datatype="BOOL", shape=[2], parameters={"binary_data_size": 2})]}
    assert "BOOL binary data must be bytes 0 or 1" in binary_error(doc, b"\x01\x02")


@pytest.mark.parametrize("shape, raw, fragment", [
    ([2], b"\x01\0\0\0a\x09\0\0\0bc", "BYTES element 1 claims 9 bytes but only 2 remain"),
    ([2], b"\x01\0\0\0a\x01\0\0\0bXYZ", "3 bytes left over after 2 BYTES elements"),
    ([2], b"\x06\0\0\0abc", "7 bytes of binary data cannot hold 2 BYTES elements"),
    ([3], b"\x05\0\0\0abcde\0\0\0", "ends inside the length of BYTES element 1"),
    ([2], b"\xff\xff\xff\xff" + b"\0" * 8, "element 0 claims 4294967295 bytes but only 8 remain"),
])
def test_lying_bytes_lengths(shape, raw, fragment):
    doc = {"inputs": [one_input(datatype="BYTES", shape=shape,
                                parameters={"binary_data_size": len(raw)})]}
    assert fragment in binary_error(doc, raw)


# ---------------------------------------------------------------- checks against the model

SPECS = [TensorSpec("x", "FP32", (-1, 3)), TensorSpec("y", "INT64", (2,))]


def request_with(*inputs) -> InferRequest:
    return parse_request(body_of(list(inputs)), None)


def test_check_inputs_accepts_dynamic_dims():
    arrays = check_inputs(request_with(one_input(data=[0] * 6),
                                       one_input("y", "INT64", [2], data=[1, 2])), SPECS)
    assert arrays["x"].shape == (2, 3) and arrays["y"].dtype == np.int64


@pytest.mark.parametrize("inputs, message", [
    ([one_input(data=[0] * 6), one_input("z", "INT64", [2], data=[1, 2])],
     "unknown input 'z'; the model's inputs are: x, y"),
    ([one_input(data=[0] * 6)], "missing input 'y'"),
    ([one_input("y", "INT64", [2], data=[1, 2])], "missing input 'x'"),
    ([one_input(datatype="FP64", data=[0] * 6), one_input("y", "INT64", [2], data=[1, 2])],
     "input 'x': datatype FP64 does not match the model's FP32"),
    ([one_input(shape=[3], data=[0] * 3), one_input("y", "INT64", [2], data=[1, 2])],
     "input 'x': expected rank 2 (shape [-1, 3]), got shape [3]"),
    ([one_input(shape=[3, 2], data=[0] * 6), one_input("y", "INT64", [2], data=[1, 2])],
     "input 'x': dimension 1 must be 3, got 2"),
])
def test_check_inputs_errors(inputs, message):
    with pytest.raises(BadRequest) as info:
        check_inputs(request_with(*inputs), SPECS)
    assert info.value.message == message


def test_check_inputs_names_every_missing_input():
    specs = SPECS + [TensorSpec("w", "BOOL", (1,))]
    with pytest.raises(BadRequest, match="missing inputs 'y', 'w'"):
        check_inputs(request_with(one_input(data=[0] * 6)), specs)


def test_check_outputs():
    outputs = [TensorSpec("p", "FP32", (-1,)), TensorSpec("q", "BYTES", (-1,))]
    base = [one_input(data=[0] * 6)]
    everything = parse_request(body_of(base, parameters={"binary_data_output": True}), None)
    assert check_outputs(everything, outputs) == [RequestedOutput("p", True),
                                                   RequestedOutput("q", True)]
    chosen = parse_request(body_of(base, outputs=[{"name": "q"}]), None)
    assert check_outputs(chosen, outputs) == [RequestedOutput("q", False)]
    unknown = parse_request(body_of(base, outputs=[{"name": "r"}]), None)
    with pytest.raises(BadRequest, match="unknown output 'r'; the model's outputs are: p, q"):
        check_outputs(unknown, outputs)


# ---------------------------------------------------------------- responses


def test_json_response_shapes_and_special_values():
    outputs = [(RequestedOutput("f", False), np.array([[np.nan, 1.5]], dtype=np.float32)),
               (RequestedOutput("h", False), np.array([0.5, 2], dtype=np.float16)),
               (RequestedOutput("t", False), np.arange(6, dtype=">i4").reshape(2, 3)[:, ::2]),
               (RequestedOutput("s", False), np.array([b"ok", b"\xff"], dtype=object)),
               (RequestedOutput("u", False), np.array(["hé"])),
               (RequestedOutput("b", False), np.array(True))]
    body, headers = encode_response("m", "3", None, outputs, parameters={"p": 1})
    doc = orjson.loads(body)
    assert headers == {"content-type": "application/json"} and "id" not in doc
    assert doc["model_name"] == "m" and doc["model_version"] == "3"
    assert doc["parameters"] == {"p": 1}
    data = {out["name"]: out["data"] for out in doc["outputs"]}
    assert data == {"f": [None, 1.5], "h": [0.5, 2.0], "t": [0, 2, 3, 5], "s": ["ok", "\ufffd"],
                    "u": ["hé"], "b": [True]}
    assert [out["shape"] for out in doc["outputs"]] == [[1, 2], [2], [2, 2], [2], [1], []]


def test_mixed_binary_and_json_response():
    outputs = [(RequestedOutput("a", True), np.array([1, 2], dtype=np.int64)),
               (RequestedOutput("b", False), np.array([3], dtype=np.uint8)),
               (RequestedOutput("c", True), np.array([], dtype=np.float32))]
    body, headers = encode_response("m", "1", "r", outputs)
    header, rest = split_response(body, headers)
    assert rest == np.array([1, 2], dtype=np.int64).tobytes()
    a, b, c = header["outputs"]
    assert a["parameters"] == {"binary_data_size": 16} and "data" not in a
    assert b["data"] == [3] and "parameters" not in b
    assert c["parameters"] == {"binary_data_size": 0} and c["shape"] == [0]


def test_error_and_metadata():
    assert orjson.loads(encode_error("input 'x': bad")) == {"error": "input 'x': bad"}
    spec = TensorSpec("x", "FP32", (-1, 3))
    assert spec.to_json() == {"name": "x", "datatype": "FP32", "shape": [-1, 3]}
    assert model_metadata("m", ["1", "2"], [spec], []) == {
        "name": "m", "versions": ["1", "2"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}], "outputs": []}


# ---------------------------------------------------------------- NVIDIA's client


def test_tritonclient_request_and_response():
    http = pytest.importorskip("tritonclient.http")
    arrays = {"f": np.arange(6, dtype=np.float32).reshape(2, 3), "h": SAMPLES["FP16"],
              "b": SAMPLES["BOOL"], "s": np.array([b"one", b"", b"three"], dtype=object),
              "j": np.array([[1, -2]], dtype=np.int64)}
    inputs = []
    for name, array in arrays.items():
        item = http.InferInput(name, list(array.shape), datatype_of(array))
        inputs.append(item.set_data_from_numpy(array, binary_data=name != "j"))
    outputs = [http.InferRequestedOutput("y", binary_data=True),
               http.InferRequestedOutput("z", binary_data=False)]
    body, json_size = http.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, request_id="abc")
    request = parse_request(body, json_size)
    assert request.id == "abc"
    assert request.outputs == [RequestedOutput("y", True), RequestedOutput("z", False)]
    for item in request.inputs:
        np.testing.assert_array_equal(item.array, arrays[item.name])
        assert item.array.dtype == arrays[item.name].dtype

    pairs = [(RequestedOutput(name, name != "j"), array) for name, array in arrays.items()]
    body, headers = encode_response("m", "1", "abc", pairs)
    result = http.InferenceServerClient.parse_response_body(
        body, header_length=int(headers["inference-header-content-length"]))
    for name, array in arrays.items():
        np.testing.assert_array_equal(result.as_numpy(name), array)


def test_tritonclient_default_asks_for_binary_outputs():
    http = pytest.importorskip("tritonclient.http")
    item = http.InferInput("x", [2], "INT32").set_data_from_numpy(np.array([1, 2], dtype=np.int32),
                                                                   binary_data=False)
    body, json_size = http.InferenceServerClient.generate_request_body([item])
    request = parse_request(body, json_size)
    assert json_size is None and request.binary_output and request.outputs is None


# ---------------------------------------------------------------- V1 predict

V1_ONE = [TensorSpec("x", "FP32", (-1, 2))]
V1_TWO = [TensorSpec("a", "INT64", (-1,)), TensorSpec("s", "BYTES", (-1, 1))]


def predict(doc, specs=V1_ONE, **kwargs):
    return codecs_v1.parse_predict(orjson.dumps(doc), specs, **kwargs)


def predict_error(doc, specs=V1_ONE, **kwargs) -> str:
    with pytest.raises(BadRequest) as info:
        predict(doc, specs, **kwargs)
    return info.value.message


def test_v1_rows_single_input():
    arrays, form = predict({"instances": [[1, 2], [3, 4], [5, 6]]})
    assert form == "instances" and arrays["x"].dtype == np.float32 and arrays["x"].shape == (3, 2)
    named, _ = predict({"instances": [{"x": [1, 2]}, {"x": [3, 4]}]})
    np.testing.assert_array_equal(named["x"], [[1, 2], [3, 4]])


def test_v1_rows_several_inputs_with_b64():
    rows = [{"a": 1, "s": [{"b64": base64.b64encode(b"\x00\x01").decode()}]},
            {"a": 2, "s": ["text"]}]
    arrays, form = predict({"instances": rows}, V1_TWO)
    assert form == "instances" and arrays["a"].tolist() == [1, 2]
    assert arrays["s"].tolist() == [[b"\x00\x01"], [b"text"]]


def test_v1_columns():
    arrays, form = predict({"inputs": [[1, 2]]})
    assert form == "inputs" and arrays["x"].tolist() == [[1.0, 2.0]]
    arrays, _ = predict({"inputs": {"a": [1, 2, 3], "s": [["p"]]}}, V1_TWO)
    assert arrays["a"].shape == (3,) and arrays["s"].shape == (1, 1)
    single_bytes = [TensorSpec("s", "BYTES", ())]
    arrays, _ = predict({"inputs": {"b64": base64.b64encode(b"hi").decode()}}, single_bytes)
    assert arrays["s"].shape == () and arrays["s"].item() == b"hi"


@pytest.mark.parametrize("doc, specs, fragment", [
    ({}, V1_ONE, "exactly one of 'instances'"),
    ({"instances": [[1, 2]], "inputs": [[1, 2]]}, V1_ONE, "exactly one of 'instances'"),
    ({"instances": []}, V1_ONE, "'instances' must be a non-empty list"),
    ({"instances": {"x": 1}}, V1_ONE, "'instances' must be a non-empty list"),
    ({"instances": [[1, 2], {"x": [1, 2]}]}, V1_ONE, "not a mix"),
    ({"instances": [{"x": [1, 2]}, {"y": [1, 2]}]}, V1_ONE, "instances[1] has inputs y"),
    ({"instances": [{"z": [1, 2]}]}, V1_ONE, "unknown input 'z'; the model's inputs are: x"),
    ({"instances": [[1, 2]]}, V1_TWO, "keyed by input name"),
    ({"inputs": [1, 2, 3]}, V1_TWO, "keyed by input name"),
    ({"instances": [{"a": 1}]}, V1_TWO, "missing input 's'"),
    ({"inputs": {"a": [1], "s": [["x"]], "q": 1}}, V1_TWO, "unknown input 'q'"),
    ({"instances": [[1, 2, 3]]}, V1_ONE, "input 'x': dimension 1 must be 2, got 3"),
    ({"instances": [1, 2]}, V1_ONE, "input 'x': expected rank 2 (shape [-1, 2]), got shape [2]"),
    ({"instances": [[1, 2], [3]]}, V1_ONE, "input 'x': data is ragged"),
    ({"instances": [["1", "2"]]}, V1_ONE, "input 'x': FP32 data must be numbers, got strings"),
    ({"inputs": {"a": [1.5], "s": [["x"]]}}, V1_TWO, "input 'a': INT64 data must be integers"),
    ({"inputs": {"a": [1], "s": [[{"b64": "***"}]]}}, V1_TWO, "input 's': a 'b64' value is not"),
    ({"inputs": {"a": [1], "s": [[3]]}}, V1_TWO, "input 's': BYTES data must be strings or"),
])
def test_v1_errors(doc, specs, fragment):
    assert fragment in predict_error(doc, specs)


def test_v1_limits_and_bad_json():
    assert "more than the limit of 3" in predict_error({"inputs": [[1, 2], [3, 4]]}, max_elements=3)
    with pytest.raises(BadRequest, match="not valid JSON"):
        codecs_v1.parse_predict(b"[" * 5000, V1_ONE)
    with pytest.raises(BadRequest, match="must be a JSON object"):
        codecs_v1.parse_predict(b'"x"', V1_ONE)


def test_encode_predict_rows():
    scores = np.array([[0.5, 1.5], [2.5, 3.5]], dtype=np.float16)
    assert orjson.loads(codecs_v1.encode_predict({"p": scores}, "instances")) == {
        "predictions": [[0.5, 1.5], [2.5, 3.5]]}
    labels = np.array([b"cat", b"\xffdog"], dtype=object)
    doc = orjson.loads(codecs_v1.encode_predict({"p": scores[:, :1], "l": labels}, "instances"))
    assert doc == {"predictions": [{"p": [0.5], "l": "cat"}, {"p": [2.5], "l": "\ufffddog"}]}
    assert orjson.loads(codecs_v1.encode_predict({"p": np.array(4.0)}, "instances")) == {
        "predictions": [4.0]}
    with pytest.raises(MserveError, match="batch dimension"):
        codecs_v1.encode_predict({"p": np.zeros(2), "q": np.zeros(3)}, "instances")


def test_encode_predict_columns():
    flags = np.array([True, False])
    assert orjson.loads(codecs_v1.encode_predict({"f": flags}, "inputs")) == {
        "outputs": [True, False]}
    doc = orjson.loads(codecs_v1.encode_predict({"f": flags, "n": np.array(7, np.int8)}, "inputs"))
    assert doc == {"outputs": {"f": [True, False], "n": 7}}
    with pytest.raises(ValueError, match="unknown predict form"):
        codecs_v1.encode_predict({"f": flags}, "rows")


# ---------------------------------------------------------------- large requests (issue 13)

FP32_X = [TensorSpec("x", "FP32", (-1, 4))]


@pytest.fixture
def no_decoding(monkeypatch):
    """Every way of reading tensor data fails the test: a check must refuse the request first."""
    def touched(*args, **kwargs):
        raise AssertionError("tensor data was decoded")
    for name in ("_bytes_from_binary", "_convert", "_by_slices"):
        monkeypatch.setattr(tensors, name, touched)


def test_a_datatype_mismatch_is_refused_before_the_bytes_are_split(no_decoding):
    count = 4 * 2**20
    doc = {"inputs": [one_input(datatype="BYTES", shape=[count // 4, 4],
                                parameters={"binary_data_size": 4 * count})]}
    start = time.perf_counter()
    message = parse_error(*binary_body(doc, bytes(4 * count)), inputs=FP32_X)
    assert message == "input 'x': datatype BYTES does not match the model's FP32"
    assert time.perf_counter() - start < 1  # splitting 4 M elements took seconds


@pytest.mark.parametrize("inputs, outputs, message", [
    ([one_input("z", shape=[1, 4], data=[0] * 4)], None, "unknown input 'z'"),
    ([one_input(shape=[1, 3], data=[0] * 3)], None, "dimension 1 must be 4, got 3"),
    ([one_input(shape=[2], data=[0] * 2)], None, "expected rank 2"),
    ([one_input(shape=[1, 4], data=[0] * 4), one_input("w", shape=[1], data=[1])], None,
     "unknown input 'w'"),
    ([one_input(shape=[1, 4], parameters={"binary_data_size": 12})], None,
     "binary_data_size is 12 but shape [1, 4] of FP32 needs 16 bytes"),
    ([one_input(datatype="BYTES", shape=[1, 4], parameters={"binary_data_size": 12})], None,
     "datatype BYTES does not match"),
    ([one_input(shape=[1, 4], data=[0] * 4)], [{"name": "nope"}], "unknown output 'nope'"),
])
def test_what_the_header_declares_is_checked_first(no_decoding, inputs, outputs, message):
    binary = sum(item.get("parameters", {}).get("binary_data_size", 0) for item in inputs)
    doc = {"inputs": inputs, **({"outputs": outputs} if outputs else {})}
    found = parse_error(*binary_body(doc, b"\0" * binary), inputs=FP32_X,
                        outputs=[TensorSpec("y", "FP32", (-1, 4))])
    assert message in found


def test_what_is_wrong_with_a_given_input_is_said_before_what_is_missing():
    specs = FP32_X + [TensorSpec("w", "INT64", (1,))]
    bad = body_of([one_input(shape=[1, 4], data=[0, 0, "a", 0])])
    assert "must be numbers" in parse_error(bad, inputs=specs)
    request = parse_request(body_of([one_input(shape=[1, 4], data=[0] * 4)]), None, inputs=specs)
    with pytest.raises(BadRequest, match="missing input 'w'"):
        check_inputs(request, specs)


def test_large_json_of_the_wrong_count_is_refused_before_converting(no_decoding):
    rows = [[0.5] * 4] * 20000
    message = parse_error(body_of([one_input(shape=[30000, 4], data=rows)]), inputs=FP32_X)
    assert message == "input 'x': expected 120000 elements for shape [30000, 4], got 80000"


@pytest.fixture
def slices(monkeypatch):
    """Slices of 8 elements: small data takes the path of millions of elements."""
    monkeypatch.setattr(tensors, "SLICE_ELEMENTS", 8)
    monkeypatch.setattr(codecs, "SLICE_ELEMENTS", 8)
    monkeypatch.setattr(tensors, "PAUSE_EVERY_S", 0.0)


@pytest.mark.parametrize("datatype", NUMERIC + ["BOOL", "BYTES"])
def test_large_json_is_converted_by_slices_to_the_same_array(slices, datatype):
    if datatype == "BYTES":
        values = np.array([f"é{index}".encode() for index in range(60)], dtype=object)
    else:
        values = np.resize(SAMPLES[datatype].reshape(-1), 60)
    for shape in [(60,), (5, 3, 4), (1, 60)]:
        expected = values.reshape(shape)
        data = json_ready(expected).tolist() if datatype != "BYTES" else json_ready(expected)
        request = parse_request(body_of([one_input(datatype=datatype, shape=shape,
                                                   data=data)]), None)
        array = request.inputs[0].array
        assert array.dtype == DTYPES[datatype] and array.shape == shape
        np.testing.assert_array_equal(array, expected)


@pytest.mark.parametrize("data, fragment", [
    ([[1, 2]] * 10 + [[3]], "ragged"),
    ([[1, 2]] * 10 + [[[3, 4]]], "ragged"),
    ([[1, 2]] * 10 + [[3, "x"]], "must be numbers, got strings"),
    ([[1, 2]] * 10 + [[3, 1e300]], "out of range for FP32"),
])
def test_an_error_in_a_later_slice_is_found(slices, data, fragment):
    count = len(data) * 2
    message = parse_error(body_of([one_input(shape=[count], data=data)]))
    assert fragment in message and message.startswith("input 'x'")


def test_large_json_responses_are_written_in_pieces_as_before(monkeypatch):
    monkeypatch.setattr(bigjson, "PIECE_ELEMENTS", 8)
    arrays = [np.arange(100, dtype=np.float32).reshape(25, 4), np.arange(30) % 2 == 0,
              np.arange(40, dtype=np.int64)]
    outputs = [(RequestedOutput(f"o{index}", False), array) for index, array in enumerate(arrays)]
    outputs.append((RequestedOutput("raw", True), arrays[0]))
    body, headers = encode_response("m", "1", "r", outputs)
    header, rest = split_response(body, headers)
    assert rest == arrays[0].tobytes()
    assert [out["data"] for out in header["outputs"][:3]] == [a.reshape(-1).tolist()
                                                               for a in arrays]


def test_bytes_of_one_length_are_split_by_numpy_exactly():
    for values in ([b"\x00a\x00", b"b\x00\x00", b"\x00\x00\x00", b"xyz"] * 5, [b""] * 7,
                   [b"ab", b"cd", b"e"]):
        sample = np.array(values, dtype=object)
        raw = binary_bytes(sample)
        doc = {"inputs": [one_input(datatype="BYTES", shape=[len(values)],
                                    parameters={"binary_data_size": len(raw)})]}
        array = parse_request(*binary_body(doc, raw)).inputs[0].array
        assert array.tolist() == values and all(type(item) is bytes for item in array)


def test_bytes_are_encoded_a_slice_at_a_time_in_triton_layout():
    """More than one slice, fixed-width and mixed slices, text and bytes, null bytes kept:
    every element is its 4-byte little-endian length, then its bytes, in row-major order."""
    from mserve.daemon.protocol.tensors import SLICE_ELEMENTS

    rng = np.random.default_rng(7)
    fixed = [b"\x00a\x00"] * SLICE_ELEMENTS
    mixed = [bytes(rng.integers(0, 256, size=int(n), dtype=np.uint8))
             for n in rng.integers(0, 9, size=SLICE_ELEMENTS + 5)]
    values = fixed + ["hé"] * 3 + mixed + [b""]
    sample = np.array(values, dtype=object).reshape(-1, 1)
    text = [v.encode("utf-8") if isinstance(v, str) else v for v in values]
    expected = b"".join(len(v).to_bytes(4, "little") + v for v in text)
    assert binary_bytes(sample) == expected
    assert binary_bytes(np.array(["ab", "c"])) == b"\x02\0\0\0ab\x01\0\0\0c"
    assert binary_bytes(np.array([], dtype=object)) == b""
