"""The data plane through real workers: tritonclient, every datatype, v1, errors, auth."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from tests import models

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def served(shared, model_dir):
    """Deploy the protocol test models once on the shared daemon: name -> url."""
    built = {
        "mixed": models.mixed(model_dir / "mixed.onnx"),
        "types": models.identities(model_dir / "types.onnx"),
        "zipmap": models.zipmap(model_dir / "zipmap.onnx"),
        "fixed": models.fixed(model_dir / "fixed.onnx"),
    }
    urls = {}
    for name, path in built.items():
        urls[name] = shared.json("deploy", path, "--name", name)["deployment"]["url"]
    yield urls
    for name in built:
        shared.run("undeploy", name)


def client(url: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url.removeprefix("http://"))


def test_tritonclient_health_metadata_and_inference(served):
    c = client(served["mixed"])
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("mixed")
    assert c.get_server_metadata()["name"] == "mserve"
    meta = c.get_model_metadata("mixed")
    assert meta["platform"] == "onnxruntime_onnx"
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "a": ("FP32", [-1, 3]), "b": ("INT64", [-1, 3])}
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    for binary in (False, True):
        inputs = [triton.InferInput("a", [2, 3], "FP32"), triton.InferInput("b", [2, 3], "INT64")]
        inputs[0].set_data_from_numpy(a, binary_data=binary)
        inputs[1].set_data_from_numpy(b, binary_data=binary)
        outputs = [triton.InferRequestedOutput("sum", binary_data=binary),
                   triton.InferRequestedOutput("count", binary_data=binary)]
        result = c.infer("mixed", inputs, outputs=outputs, request_id="r1")
        np.testing.assert_array_equal(result.as_numpy("sum"), a + b)
        np.testing.assert_array_equal(result.as_numpy("count"), b * 2)
        assert result.get_response()["id"] == "r1"
    c.close()


def test_every_datatype_round_trips(served):
    rng = np.random.default_rng(0)
    data = {name: rng.integers(0, 100, (3, 2)).astype(np.dtype(dt))
            for name, dt in [("INT8", "int8"), ("INT16", "int16"), ("INT32", "int32"),
                             ("INT64", "int64"), ("UINT8", "uint8"), ("UINT16", "uint16"),
                             ("UINT32", "uint32"), ("UINT64", "uint64"), ("FP16", "float16"),
                             ("FP32", "float32"), ("FP64", "float64")]}
    data["BOOL"] = np.array([[True, False]] * 3)
    data["BYTES"] = np.array([[b"a", b"bc"], [b"", b"\xc3\xa9"], [b"x", b"yz"]], dtype=object)
    c = client(served["types"])
    for binary in (False, True):
        inputs = []
        for dt, arr in data.items():
            i = triton.InferInput(f"in_{dt}", list(arr.shape), dt)
            i.set_data_from_numpy(arr, binary_data=binary or dt == "FP16")
            inputs.append(i)
        outputs = [triton.InferRequestedOutput(f"out_{dt}", binary_data=binary) for dt in data]
        result = c.infer("types", inputs, outputs=outputs)
        for dt, arr in data.items():
            got = result.as_numpy(f"out_{dt}")
            if dt == "BYTES" and not binary:  # JSON carries text; tritonclient gives str
                got = np.vectorize(lambda v: v.encode(), otypes=[object])(got)
            np.testing.assert_array_equal(got, arr, err_msg=f"{dt} binary={binary}")
    c.close()


def test_zipmap_outputs_are_json_objects(served):
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2],
                        "data": [0.25, 0.75, 0.9, 0.1]}]}
    r = httpx.post(served["zipmap"] + "/v2/models/zipmap/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["datatype"] == "BYTES" and out["shape"] == [2]
    got = [json.loads(s) for s in out["data"]]
    assert got == [{"0": 0.25, "1": 0.75}, {"0": pytest.approx(0.9), "1": pytest.approx(0.1)}]


def test_v1_predict_rows_and_columns(served):
    url = served["mixed"]
    rows = {"instances": [{"a": [1, 2, 3], "b": [1, 1, 1]}, {"a": [0, 0, 0], "b": [2, 2, 2]}]}
    r = httpx.post(url + "/v1/models/mixed:predict", json=rows)
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == [{"sum": [2.0, 3.0, 4.0], "count": [2, 2, 2]},
                                       {"sum": [2.0, 2.0, 2.0], "count": [4, 4, 4]}]
    cols = {"inputs": {"a": [[1, 2, 3]], "b": [[1, 1, 1]]}}
    r = httpx.post(url + "/v1/models/mixed/versions/1:predict", json=cols)
    assert r.json()["outputs"] == {"sum": [[2.0, 3.0, 4.0]], "count": [[2, 2, 2]]}
    status = httpx.get(url + "/v1/models/mixed").json()
    assert status["model_version_status"][0]["state"] == "AVAILABLE"


def _input(**fields) -> bytes:
    item = {"name": "a", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3], **fields}
    return json.dumps({"inputs": [item]}).encode()


@pytest.mark.parametrize("body, status, words", [
    (b"not json", 400, "json"),
    (b"", 400, ""),
    (b'{"outputs": []}', 400, "inputs"),
    (_input(shape=[3]), 400, "rank"),
    (_input(shape=[-1, 3]), 400, "shape"),
    (_input(shape=[10**9, 10**9], data=[1]), 400, "shape"),
    (_input(data=["a", "b", "c"]), 400, "number"),
    (_input(data=[[1, 2, 3], [4]], shape=[2, 3]), 400, "ragged"),
    (b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, ""),
    (b'{"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}',
     400, "'z'"),
    (b'{"inputs": [{"name": "a", "datatype": "FP64", "shape": [1, 3], "data": [1, 2, 3]}]}',
     400, "FP64"),
    (b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1, 3], "data": [1, 2]}]}',
     400, "'a'"),
    (b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}',
     400, "'b'"),
])
def test_bad_requests_get_4xx_and_the_worker_keeps_serving(served, body, status, words):
    url = served["mixed"]
    r = httpx.post(url + "/v2/models/mixed/infer", content=body)
    assert r.status_code == status and words.lower() in r.json()["error"].lower(), r.text
    good = {"inputs": [{"name": "a", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
                       {"name": "b", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]}]}
    assert httpx.post(url + "/v2/models/mixed/infer", json=good).status_code == 200


@pytest.mark.parametrize("header_length, declared, actual", [
    (10_000, 12, 12),  # header length longer than the body
    (None, 12, 8),     # binary_data_size larger than the bytes sent
    (None, 8, 12),     # ... or smaller
])
def test_binary_bodies_that_lie_are_400(served, header_length, declared, actual):
    header = json.dumps({"inputs": [
        {"name": "a", "datatype": "FP32", "shape": [1, 3],
         "parameters": {"binary_data_size": declared}},
        {"name": "b", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]}]}).encode()
    body = header + b"\0" * actual
    r = httpx.post(served["mixed"] + "/v2/models/mixed/infer", content=body, headers={
        "Inference-Header-Content-Length": str(header_length or len(header)),
        "Content-Type": "application/octet-stream"})
    assert r.status_code == 400 and r.json()["error"], r.text


def test_unknown_model_and_version_are_404(served):
    url = served["fixed"]
    assert httpx.get(url + "/v2/models/other").status_code == 404
    assert httpx.get(url + "/v2/models/fixed/versions/7/ready").status_code == 404
    r = httpx.post(url + "/v2/models/fixed/versions/9/infer", json={"inputs": []})
    assert r.status_code == 404 and "version '9'" in r.json()["error"]


def test_fixed_shapes_are_enforced(served):
    url = served["fixed"]
    assert httpx.get(url + "/v2/models/fixed").json()["inputs"][0]["shape"] == [2, 3]
    wrong = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 2], "data": [0] * 6}]}
    r = httpx.post(url + "/v2/models/fixed/infer", json=wrong)
    assert r.status_code == 400 and "dimension" in r.json()["error"]


def test_metrics_count_requests(served):
    url = served["fixed"]
    good = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [0] * 6}]}
    for _ in range(3):
        assert httpx.post(url + "/v2/models/fixed/infer", json=good).status_code == 200
    text = httpx.get(url + "/metrics").text
    line = next(l for l in text.splitlines()
                if l.startswith("mserve_requests_total{") and 'outcome="success"' in l)
    assert float(line.rsplit(" ", 1)[1]) >= 3
    assert "mserve_request_duration_seconds_bucket" in text


def test_body_limit_is_413(served):
    url = served["fixed"]
    r = httpx.post(url + "/v2/models/fixed/infer", content=b"x" * (65 * 2**20))
    assert r.status_code == 413


def test_token_protects_every_route_but_health(shared, model_dir):
    path = models.affine(model_dir / "secret.onnx", scale=4.0)
    d = shared.json("deploy", path, "--name", "secret", "--token", "s3cret")["deployment"]
    url = d["url"]
    assert httpx.get(url + "/v2/health/ready").status_code == 200
    assert httpx.get(url + "/v2/models/secret").status_code == 401
    bad = {"Authorization": "Bearer wrong"}
    assert httpx.get(url + "/v2/models/secret", headers=bad).status_code == 401
    good = {"Authorization": "Bearer s3cret"}
    assert httpx.get(url + "/v2/models/secret", headers=good).status_code == 200
    listing = shared.ok("list", "--json").stdout + shared.ok("versions", "secret").stdout
    assert "s3cret" not in listing
    out = shared.json("predict", "secret", "-", "--token", "s3cret",
                      input=json.dumps({"x": [[1, 1, 1, 1]]}))
    assert out["outputs"][0]["data"] == [4.0] * 4
    assert "401" not in shared.fail("predict", "secret", "-", input='{"x": [[1, 1, 1, 1]]}')
    path2 = models.affine(model_dir / "secret2.onnx", scale=5.0)
    shared.json("deploy", path2, "--name", "secret", "--token", "rotated")  # a new token
    assert httpx.get(url + "/v2/models/secret", headers=good).status_code == 401
    rotated = {"Authorization": "Bearer rotated"}
    assert httpx.get(url + "/v2/models/secret", headers=rotated).status_code == 200
    shared.ok("undeploy", "secret")
