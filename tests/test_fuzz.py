"""Property-based fuzzing (hypothesis) of the request codecs and of a live worker.

Pure part: whatever bytes arrive, ``codecs.parse_request`` + ``check_inputs``/``check_outputs``
and ``codecs_v1.parse_predict`` either decode them into arrays that match the model's inputs or
raise ``BadRequest``, never anything else. Live part: the same kinds of bodies (JSON and binary,
with random Inference-Header-Content-Length headers) against a real worker never get a 5xx,
every 4xx is ``{"error": "..."}``, and the worker process survives and keeps answering.

The strategies build both random JSON and *almost valid* requests: the right structure with
mutated datatypes, shapes (wrong rank, negative, oversized), data (wrong count, ragged,
out-of-range, wrong kinds), parameters and lying ``binary_data_size`` values.
"""

from __future__ import annotations

import json
import math
import os

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mserve.daemon.errors import BadRequest
from mserve.daemon.protocol import codecs, codecs_v1
from mserve.daemon.protocol.codecs import DTYPES, TensorSpec

# MSERVE_FUZZ_SCALE=20 multiplies the examples (a longer hunt than the suite's few seconds).
# No example database: a failing example is printed in full, to be pasted into a test.
SCALE = float(os.environ.get("MSERVE_FUZZ_SCALE") or 1)
PURE = settings(max_examples=int(300 * SCALE), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
LIVE = settings(max_examples=int(120 * SCALE), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])

INT_TYPES = [name for name, dtype in DTYPES.items() if dtype.kind in "iu"]
FLOAT_TYPES = ["FP16", "FP32", "FP64"]
MAX_GOOD_ELEMENTS = 48  # the "valid" shapes stay small so that their data can be generated

# Model signatures the pure tests check against: (inputs, outputs).
SPEC_SETS: dict[str, tuple[list[TensorSpec], list[TensorSpec]]] = {
    "mixed": ([TensorSpec("a", "FP32", (-1, 3)), TensorSpec("b", "INT64", (-1, 3))],
              [TensorSpec("sum", "FP32", (-1, 3)), TensorSpec("count", "INT64", (-1, 3))]),
    "affine": ([TensorSpec("x", "FP32", (-1, 4))], [TensorSpec("y", "FP32", (-1, 4))]),
    "fixed": ([TensorSpec("x", "FP32", (2, 3))], [TensorSpec("y", "FP32", (2, 3))]),
    "strings": ([TensorSpec("t", "BYTES", (-1,))], [TensorSpec("u", "BYTES", (-1,))]),
    "scalar": ([TensorSpec("s", "FP64", ())], [TensorSpec("r", "FP64", ())]),
    "all": ([TensorSpec(f"in_{dt}", dt, (-1, 2)) for dt in DTYPES],
            [TensorSpec(f"out_{dt}", dt, (-1, 2)) for dt in DTYPES]),
}
MIXED_INPUTS, MIXED_OUTPUTS = SPEC_SETS["mixed"]

# ---------------------------------------------------------------- generic JSON

KEYS = st.sampled_from(["inputs", "outputs", "name", "datatype", "shape", "data", "parameters",
                        "binary_data_size", "binary_data_output", "binary_data", "id",
                        "instances", "b64", "a", "b", "x", "sum", "count"]) | st.text(max_size=6)
TEXT = st.text(st.characters(codec="utf-8"), max_size=6)
LEAVES = (st.none() | st.booleans()
          | st.integers(-2**64 - 2, 2**64 + 2) | st.integers()
          | st.floats() | st.text(max_size=8) | TEXT
          | st.sampled_from(list(DTYPES) + ["FP8", "fp32", "", "INT128"]))
JSON_VALUES = st.recursive(
    LEAVES, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=40)


def dumps(doc) -> bytes:
    """Stdlib JSON: unlike orjson it writes ints past 64 bits and NaN/Infinity (both invalid for
    orjson), so the server sees those too."""
    return json.dumps(doc, separators=(",", ":"), allow_nan=True).encode()


def bad(draw, percent: int) -> bool:
    """True ``percent`` % of the time: the chance of one mutation (shrinks towards valid)."""
    return draw(st.integers(0, 99)) >= 100 - percent


@st.composite
def mutated(draw, body: bytes) -> bytes:
    """Usually ``body`` itself; sometimes truncated, a byte replaced or junk appended."""
    if not bad(draw, 12) or not body:
        return body
    mode = draw(st.integers(0, 2))
    at = draw(st.integers(0, len(body) - 1))
    if mode == 0:
        return body[:at]
    if mode == 1:
        return body[:at] + bytes([draw(st.integers(0, 255))]) + body[at + 1:]
    return body + draw(st.binary(min_size=1, max_size=8))


# ---------------------------------------------------------------- almost-valid tensors


def elements(draw, datatype: str, v1: bool = False) -> st.SearchStrategy:
    """A strategy for the elements of one tensor: values that fit ``datatype``; for some tensors
    also out-of-range values or other JSON values (decided once per tensor)."""
    if datatype == "BOOL":
        good = st.booleans() | st.sampled_from([0, 1])
    elif datatype in INT_TYPES:
        info = np.iinfo(DTYPES[datatype])
        good = st.integers(int(info.min), int(info.max)) | st.integers(-128, 127).map(float)
        if bad(draw, 6):
            good = good | st.sampled_from([int(info.min) - 1, int(info.max) + 1, 2**64, 0.5])
    elif datatype in FLOAT_TYPES:
        width = {"FP16": 16, "FP32": 32, "FP64": 64}[datatype]
        good = (st.floats(width=width, allow_nan=False, allow_infinity=False)
                | st.integers(-2**53, 2**53))
        if bad(draw, 6):
            good = good | st.floats() | st.sampled_from([2**63, 2**64 - 1, 2**64, 65504.0,
                                                         65520.0, 3.5e38, 1e308])
    else:  # BYTES
        good = TEXT
        if v1:
            good = good | st.builds(lambda t: {"b64": t},
                                    st.sampled_from(["", "aGk=", "aGk", "!!", "é", "AAAA"]))
    return good | LEAVES if bad(draw, 6) else good


def nest(flat: list, shape: list[int]):
    """``flat`` (of exactly prod(shape) items) as nested lists of ``shape``."""
    if not shape:
        return flat[0]
    if len(shape) == 1:
        return flat
    step = math.prod(shape[1:])
    return [nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def small_valid(shape) -> bool:
    return (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
            and len(shape) <= 6 and math.prod(shape) <= MAX_GOOD_ELEMENTS)


@st.composite
def shape_near(draw, declared: tuple[int, ...]):
    """A shape for an input declared as ``declared``: mostly valid, sometimes wrong."""
    if not bad(draw, 10):  # valid: dynamic dims filled in
        return [d if d >= 0 else draw(st.integers(0, 3)) for d in declared]
    mode = draw(st.integers(7, 11))
    if mode == 7:  # any small rank and dims
        return draw(st.lists(st.integers(0, 4), max_size=5))
    if mode == 8:  # oversized
        shape = [d if d >= 0 else 1 for d in declared] or [1]
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.sampled_from(
            [2**24 + 1, 2**26 + 1, 2**31, 2**40, 2**63, 2**64 + 1, 10**30]))
        return shape
    if mode == 9:  # negative, bool, float or string dims
        return draw(st.lists(st.sampled_from([-1, -2**63, True, False, 1.0, 2.5, "2", None]) |
                             st.integers(0, 3), min_size=1, max_size=4))
    if mode == 10:  # very deep
        return [1] * draw(st.integers(30, 70))
    return draw(LEAVES | st.dictionaries(KEYS, LEAVES, max_size=2))


@st.composite
def tensor_data(draw, datatype: str, shape, v1: bool = False):
    """JSON data for a tensor of ``shape``: flat or nested, right or wrong count, or junk."""
    mode = draw(st.integers(6, 9)) if bad(draw, 10) else draw(st.integers(0, 5))
    count = math.prod(shape) if small_valid(shape) else draw(st.integers(0, 6))
    if mode == 7:
        count = max(0, count + draw(st.sampled_from([-1, 1, 2])))
    flat = draw(st.lists(elements(draw, datatype, v1), min_size=count, max_size=count))
    if mode <= 3 and small_valid(shape):
        return nest(flat, shape)
    if mode == 8:  # ragged
        return [flat, flat + [0]] if flat else [[], [1]]
    if mode == 9:
        return draw(JSON_VALUES)
    if mode == 6:  # deep nesting around the data
        depth = draw(st.integers(1, 40))
        for _ in range(depth):
            flat = [flat]
    return flat


def binary_chunk(datatype: str, shape, raw: bytes) -> bytes:
    """Bytes of the right size for ``shape`` (random content), Triton layout."""
    if datatype not in DTYPES or not small_valid(shape):
        return raw
    count = math.prod(shape)
    if datatype == "BYTES":
        parts = [raw[i:i + 3] for i in range(count)]
        return b"".join(len(p).to_bytes(4, "little") + p for p in parts)
    need = count * DTYPES[datatype].itemsize
    return (raw * (need // max(1, len(raw)) + 1))[:need] if raw else bytes(need)


@st.composite
def v2_input(draw, spec: TensorSpec, names: list[str]):
    """One entry of ``inputs`` and its binary chunk (b"" when it carries JSON data)."""
    name = draw(st.sampled_from(names + ["", "zz", "A"]) | LEAVES) if bad(draw, 4) else spec.name
    datatype = (draw(st.sampled_from(list(DTYPES) + ["fp32", "FP8"]) | LEAVES)
                if bad(draw, 5) else spec.datatype)
    shape = draw(shape_near(spec.shape))
    entry = {"name": name, "datatype": datatype, "shape": shape}
    if draw(st.booleans()):  # binary
        raw = draw(st.binary(max_size=16))
        chunk = binary_chunk(datatype, shape, raw)
        if bad(draw, 6):
            lie = draw(st.integers(0, 2))
            if lie == 0:
                chunk = chunk[:-1] if chunk else b"\x00"
            elif lie == 1:
                chunk = chunk + b"\x01\x00\x00\x00"
        size = len(chunk)
        if bad(draw, 5):  # the declared size itself lies or is not an integer
            size = draw(st.sampled_from([-1, size + 1, max(0, size - 1), 2**63, float(size),
                                         str(size), None, True]))
        entry["parameters"] = {"binary_data_size": size}
        if bad(draw, 3):
            entry["data"] = [1]  # both data and binary_data_size
        return entry, chunk
    if not bad(draw, 4):
        entry["data"] = draw(tensor_data(datatype if datatype in DTYPES else spec.datatype,
                                         shape))
    elif draw(st.booleans()):
        entry["parameters"] = draw(JSON_VALUES)  # and no data
    if bad(draw, 4):
        entry[draw(KEYS)] = draw(LEAVES)
    return entry, b""


@st.composite
def v2_bodies(draw, set_name: str | None = None):
    """(spec set name, body, header_length) of an almost-valid v2 request."""
    set_name = set_name or draw(st.sampled_from(sorted(SPEC_SETS)))
    inputs, outputs = SPEC_SETS[set_name]
    names = [s.name for s in inputs]
    chosen = list(draw(st.permutations(inputs)))
    if bad(draw, 5):
        chosen = chosen[:-1]
    if chosen and bad(draw, 4):
        chosen.append(chosen[0])  # a duplicate
    entries, chunks = [], []
    for spec in chosen:
        entry, chunk = draw(v2_input(spec, names))
        entries.append(entry)
        chunks.append(chunk)
    doc: dict = {"inputs": entries}
    if bad(draw, 4):
        doc["inputs"] = draw(JSON_VALUES)
    if draw(st.booleans()):
        doc["id"] = draw(LEAVES) if bad(draw, 10) else draw(st.text(max_size=8))
    if draw(st.booleans()):
        flag = draw(LEAVES) if bad(draw, 10) else draw(st.booleans())
        doc["parameters"] = draw(LEAVES) if bad(draw, 5) else {"binary_data_output": flag}
    if draw(st.booleans()):
        out_names = [s.name for s in outputs]
        junk = bad(draw, 15)
        doc["outputs"] = draw(st.lists(st.fixed_dictionaries(
            {"name": st.sampled_from(out_names + ["nope", ""]) | LEAVES if junk
             else st.sampled_from(out_names)},
            optional={"parameters": st.fixed_dictionaries(
                {}, optional={"binary_data": st.booleans() | LEAVES if junk else st.booleans()})
                | (LEAVES if junk else st.nothing())}), max_size=3, unique_by=str))
    header = dumps(doc)
    binary = b"".join(chunks)
    body = draw(mutated(header + binary))
    if bad(draw, 10):
        header_length = draw(st.none() | st.integers(-2, len(body) + 2))
    else:
        header_length = len(header) if binary or draw(st.booleans()) else None
    return set_name, body, header_length


@st.composite
def v1_bodies(draw, set_name: str | None = None):
    """(spec set name, body) of an almost-valid TF Serving / KServe V1 predict request."""
    set_name = set_name or draw(st.sampled_from(sorted(SPEC_SETS)))
    inputs, _ = SPEC_SETS[set_name]
    mode = draw(st.integers(0, 8)) if not bad(draw, 8) else 9
    rows = draw(st.integers(1, 3)) if not bad(draw, 5) else 0

    row_shapes: dict[str, object] = {}

    def row(spec):  # one instance's value: the shape without its batch dim, the same each row
        if spec.name not in row_shapes or bad(draw, 5):
            row_shapes[spec.name] = draw(shape_near(spec.shape[1:]))
        return draw(tensor_data(spec.datatype, row_shapes[spec.name], v1=True))

    def column(spec):
        shape = draw(shape_near(spec.shape))
        return draw(tensor_data(spec.datatype, shape, v1=True))

    chosen = list(draw(st.permutations(inputs)))
    if bad(draw, 5):
        chosen = chosen[:-1]
    extra = {draw(st.sampled_from(["zz", "a", "x"])): [1]} if bad(draw, 5) else {}
    if mode <= 3:  # rows keyed by input name
        doc = {"instances": [{**{s.name: row(s) for s in chosen}, **extra}
                             for _ in range(rows)]}
    elif mode <= 5:  # bare rows (right for one-input models)
        doc = {"instances": [row(inputs[0]) for _ in range(rows)]}
    elif mode <= 7:  # columns
        doc = {"inputs": {**{s.name: column(s) for s in chosen}, **extra}}
    elif mode == 8:  # bare column
        doc = {"inputs": column(inputs[0])}
    else:
        doc = draw(st.dictionaries(st.sampled_from(["instances", "inputs", "x"]), JSON_VALUES,
                                   max_size=2))
    if bad(draw, 4):
        doc["instances" if "inputs" in doc else "inputs"] = []  # both forms
    return set_name, draw(mutated(dumps(doc)))


# ---------------------------------------------------------------- the properties


def decode_v2(body: bytes, header_length, set_name: str) -> None:
    """Decode like the worker does; on success check the arrays against the model."""
    inputs, outputs = SPEC_SETS[set_name]
    try:
        request = codecs.parse_request(body, header_length)
        arrays = codecs.check_inputs(request, inputs)
        codecs.check_outputs(request, outputs)
    except BadRequest as exc:
        assert isinstance(exc.message, str) and exc.message
        return
    by_name = {item.name: item for item in request.inputs}
    assert_match(arrays, inputs)
    for name, array in arrays.items():
        assert array.shape == by_name[name].shape


def decode_v1(body: bytes, set_name: str) -> None:
    inputs, _ = SPEC_SETS[set_name]
    try:
        arrays, form = codecs_v1.parse_predict(body, inputs)
    except BadRequest as exc:
        assert isinstance(exc.message, str) and exc.message
        return
    assert form in codecs_v1.FORMS
    assert_match(arrays, inputs)


def assert_match(arrays: dict[str, np.ndarray], specs: list[TensorSpec]) -> None:
    """Decoded arrays are exactly the model's inputs, of its dtypes, ranks and fixed dims."""
    assert sorted(arrays) == sorted(s.name for s in specs)
    for spec in specs:
        array = arrays[spec.name]
        assert array.dtype == DTYPES[spec.datatype], (spec, array.dtype)
        assert array.ndim == len(spec.shape), (spec, array.shape)
        assert all(w < 0 or w == g for w, g in zip(spec.shape, array.shape)), (spec, array.shape)


@PURE
@given(v2_bodies())
def test_v2_codec_almost_valid_requests(case):
    set_name, body, header_length = case
    decode_v2(body, header_length, set_name)


@PURE
@given(st.sampled_from(sorted(SPEC_SETS)), JSON_VALUES, st.none() | st.integers(-2, 64))
def test_v2_codec_random_json(set_name, doc, header_length):
    body = dumps(doc)
    decode_v2(body, header_length if header_length is None else min(header_length, len(body) + 1),
              set_name)
    decode_v2(dumps({"inputs": doc}), None, set_name)


@PURE
@given(st.sampled_from(sorted(SPEC_SETS)), st.binary(max_size=200),
       st.none() | st.integers(-2, 210))
def test_v2_codec_random_bytes(set_name, body, header_length):
    decode_v2(body, header_length, set_name)


@PURE
@given(v1_bodies())
def test_v1_codec_almost_valid_requests(case):
    set_name, body = case
    decode_v1(body, set_name)


@PURE
@given(st.sampled_from(sorted(SPEC_SETS)), JSON_VALUES | st.binary(max_size=100).map(bytes))
def test_v1_codec_random_json_and_bytes(set_name, doc):
    if isinstance(doc, bytes):
        decode_v1(doc, set_name)
        return
    decode_v1(dumps(doc), set_name)
    decode_v1(dumps({"instances": doc}), set_name)
    decode_v1(dumps({"inputs": doc}), set_name)


def test_the_valid_path_is_reached():
    """The strategies are not all noise: the plain valid requests decode."""
    body = dumps({"inputs": [
        {"name": "a", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
        {"name": "b", "datatype": "INT64", "shape": [1, 3], "parameters": {"binary_data_size": 24}},
    ]})
    request = codecs.parse_request(body + np.arange(3, dtype="<i8").tobytes(), len(body))
    assert_match(codecs.check_inputs(request, MIXED_INPUTS), MIXED_INPUTS)
    arrays, _ = codecs_v1.parse_predict(b'{"instances": [{"a": [1, 2, 3], "b": [1, 2, 3]}]}',
                                        MIXED_INPUTS)
    assert_match(arrays, MIXED_INPUTS)


# ---------------------------------------------------------------- live worker

NAME = "fuzz-mixed"
GOOD = {"inputs": [{"name": "a", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
                   {"name": "b", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]}]}
HEADER_JUNK = st.sampled_from(["", "abc", "-1", "0", "1e3", "0x10", "+5", "1 2", "1_0", "12a",
                               "9" * 30, "9" * 5000, "3.0"])
REQUEST_IDS = st.none() | st.from_regex(r"[!-~]{0,60}", fullmatch=True)  # X-Request-ID values


@pytest.fixture(scope="module")
def live(shared, model_dir):
    """The mixed model (a FP32 [N,3], b INT64 [N,3]) on the shared daemon, and an httpx client."""
    from tests import models

    path = models.mixed(model_dir / "fuzz" / "mixed.onnx")
    url = shared.json("deploy", path, "--name", NAME)["deployment"]["url"]
    before = shared.deployment(NAME)
    with httpx.Client(base_url=url, timeout=30) as client:
        yield {"client": client, "pid": before["pid"], "restarts": before["restarts"],
               "shared": shared}
    shared.run("undeploy", NAME)


def check_answer(response: httpx.Response) -> None:
    """No 5xx; every error is a JSON object with an "error" string."""
    assert response.status_code < 500, (response.status_code, response.content[:300])
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body, dict) and isinstance(body.get("error"), str), response.content


def assert_survived(live) -> None:
    """Same worker process, no restart, and a good request still succeeds."""
    now = live["shared"].deployment(NAME)
    assert (now["pid"], now["restarts"]) == (live["pid"], live["restarts"]), now
    response = live["client"].post(f"/v2/models/{NAME}/infer", json=GOOD)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
    assert outputs == {"sum": [2.0, 4.0, 6.0], "count": [2, 4, 6]}


@pytest.mark.e2e
def test_live_v2_infer_never_5xx(live):
    client = live["client"]

    @LIVE
    @given(v2_bodies("mixed"), HEADER_JUNK | st.none(), st.integers(0, 9), REQUEST_IDS)
    def fuzz(case, junk_header, pick, request_id):
        _, body, header_length = case
        headers = {} if request_id is None else {"x-request-id": request_id}
        if pick == 0 and junk_header is not None:
            headers["inference-header-content-length"] = junk_header
        elif header_length is not None:
            headers["inference-header-content-length"] = str(header_length)
        check_answer(client.post(f"/v2/models/{NAME}/infer", content=body, headers=headers))

    fuzz()
    assert_survived(live)


@pytest.mark.e2e
def test_live_v2_infer_random_json_and_bytes(live):
    client = live["client"]

    @LIVE
    @given(JSON_VALUES.map(dumps) | st.binary(max_size=200), st.none() | st.integers(-1, 210))
    def fuzz(body, header_length):
        headers = {} if header_length is None else \
            {"inference-header-content-length": str(header_length)}
        check_answer(client.post(f"/v2/models/{NAME}/infer", content=body, headers=headers))

    fuzz()
    assert_survived(live)


@pytest.mark.e2e
def test_live_v1_predict_never_5xx(live):
    client = live["client"]

    @LIVE
    @given(v1_bodies("mixed") | st.tuples(st.just("mixed"), JSON_VALUES.map(dumps)))
    def fuzz(case):
        _, body = case
        check_answer(client.post(f"/v1/models/{NAME}:predict", content=body))

    fuzz()
    assert_survived(live)
