"""Every answer names the version that was chosen for it, errors included (SPEC.md, second
wave): `X-Model-Version` on HTTP error answers, `x-model-version` in the trailing metadata of a
gRPC error, through real workers; none when no version was chosen (404, 401)."""

from __future__ import annotations

import json
import uuid
from functools import partial

import grpc
import httpx
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests import models
from tests.conftest import wait_for

pytestmark = pytest.mark.e2e
ROW = [1.0, 1.0, 1.0, 1.0]


@pytest.fixture(scope="module")
def errs(shared, affine_v1, affine_v2) -> dict:
    """Versions 1 (standby, loaded) and 2 (active) of one deployment."""
    shared.json("deploy", affine_v1, "--name", "errs")
    yield shared.json("deploy", affine_v2, "--name", "errs")["deployment"]
    shared.run("undeploy", "errs")


# ---------------------------------------------------------------- bad requests of each kind


def wrong_name(url: str, name: str, base: str) -> httpx.Response:
    """A JSON request naming an input the model does not have."""
    body = {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 4], "data": ROW}]}
    return httpx.post(f"{url}/v2/models/{name}{base}/infer", json=body,
                      headers={"X-Request-ID": uuid.uuid4().hex})


def short_binary(url: str, name: str, base: str) -> httpx.Response:
    """The binary extension with 8 bytes where the input declares 16."""
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                     "parameters": {"binary_data_size": 16}}]}).encode()
    return httpx.post(f"{url}/v2/models/{name}{base}/infer", content=header + b"\0" * 8,
                      headers={"Inference-Header-Content-Length": str(len(header)),
                               "Content-Type": "application/octet-stream",
                               "X-Request-ID": uuid.uuid4().hex})


def wrong_width(url: str, name: str, base: str) -> httpx.Response:
    """A TF Serving row of 3 values for a model that takes 4."""
    return httpx.post(f"{url}/v1/models/{name}{base}:predict", json={"instances": [[1, 2, 3]]},
                      headers={"X-Request-ID": uuid.uuid4().hex})


BAD = {"json": (wrong_name, "unknown input 'z'"),
       "binary": (short_binary, "binary data"),
       "v1": (wrong_width, "dimension 1 must be 4")}


def refusal(kind: str, url: str, name: str, base: str = "") -> httpx.Response:
    """Send one bad request of ``kind``; its 400 answer, checked."""
    send, words = BAD[kind]
    r = send(url, name, base)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]
    assert r.headers["x-request-id"] == r.request.headers["x-request-id"]
    return r


def refused_by(kind: str, url: str, name: str, base: str = "") -> str:
    """The version a bad request's 400 names."""
    return refusal(kind, url, name, base).headers["x-model-version"]


@pytest.mark.parametrize("kind", BAD)
def test_a_400_names_the_version_unpinned_and_pinned(errs, kind):
    url = errs["url"]
    assert refused_by(kind, url, "errs") == "2"
    assert refused_by(kind, url, "errs", "/versions/1") == "1"
    assert refused_by(kind, url, "errs", "/versions/2") == "2"


def test_a_400_names_the_version_a_label_chose(errs, shared):
    shared.json("label", "errs", "old", "1")
    for kind in BAD:
        assert refused_by(kind, errs["url"], "errs", "/labels/old") == "1"


def test_a_model_that_could_not_run_names_its_version(shared, model_dir):
    path = models.lookup(model_dir / "lookup.onnx")
    url = shared.json("deploy", path, "--name", "errlookup")["deployment"]["url"]
    try:
        r = httpx.post(url + "/v2/models/errlookup/infer", json={"inputs": [
            {"name": "i", "datatype": "INT64", "shape": [2], "data": [0, 5]}]})
        assert r.status_code == 400 and "could not run" in r.json()["error"], r.text
        assert r.headers["x-model-version"] == "1"
        r = httpx.post(url + "/v1/models/errlookup:predict", json={"instances": [1, 7]})
        assert r.status_code == 400 and r.headers["x-model-version"] == "1", r.text
    finally:
        shared.run("undeploy", "errlookup")


def test_metadata_readiness_and_config_name_the_version_that_answered(errs, shared):
    """SPEC: X-Model-Version on every answer for which a version was chosen: a pinned (or
    labelled) GET chooses one as an inference does; an unpinned one describes the active."""
    url, active = errs["url"], str(shared.deployment("errs")["version"])
    shared.json("label", "errs", "meta", "1")
    for base, version in (("", active), ("/versions/1", "1"), ("/labels/meta", "1")):
        for op in ("", "/ready", "/config"):
            r = httpx.get(f"{url}/v2/models/errs{base}{op}")
            assert r.status_code == 200 and r.headers["x-model-version"] == version, \
                (base, op, r.headers)
    assert "x-model-version" not in httpx.get(f"{url}/v2/models/errs/versions/9").headers


def test_no_version_chosen_no_header(errs, shared, affine_v1):
    url = errs["url"]
    for r in (httpx.post(url + "/v2/models/errs/versions/9/infer", json={"inputs": []}),
              httpx.post(url + "/v1/models/errs/versions/9:predict", json={"instances": [ROW]}),
              httpx.post(url + "/v2/models/errs/labels/nope/infer", json={"inputs": []}),
              httpx.post(url + "/v2/models/other/infer", json={"inputs": []}),
              httpx.post(url + "/v2/nowhere", json={})):
        assert r.status_code == 404 and "x-model-version" not in r.headers, r.text
    d = shared.json("deploy", affine_v1, "--name", "errtok", "--token", "s3cret")["deployment"]
    try:
        r = wrong_name(d["url"], "errtok", "")
        assert r.status_code == 401 and "x-model-version" not in r.headers, r.text
        auth = {"Authorization": "Bearer s3cret"}
        body = {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 4], "data": ROW}]}
        r = httpx.post(d["url"] + "/v2/models/errtok/infer", json=body, headers=auth)
        assert r.status_code == 400 and r.headers["x-model-version"] == "1", r.text
    finally:
        shared.run("undeploy", "errtok")


# ---------------------------------------------------------------- gRPC


def grpc_refusal(grpc_url: str, version: str = "", model: str = "errs") -> grpc.RpcError:
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    tensor = request.inputs.add(name="z", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend(ROW)
    with grpc.insecure_channel(grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=10)
    return info.value


def trailer(error: grpc.RpcError) -> str | None:
    return dict(error.trailing_metadata() or ()).get("x-model-version")


def test_grpc_errors_carry_the_version_in_trailing_metadata(errs):
    error = grpc_refusal(errs["grpc_url"])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown input 'z'" in error.details() and trailer(error) == "2"
    assert trailer(grpc_refusal(errs["grpc_url"], "1")) == "1"
    missing = grpc_refusal(errs["grpc_url"], "9")
    assert missing.code() == grpc.StatusCode.NOT_FOUND and trailer(missing) is None
    other = grpc_refusal(errs["grpc_url"], model="other")
    assert other.code() == grpc.StatusCode.NOT_FOUND and trailer(other) is None


# ---------------------------------------------------------------- a 50/50 split


def test_during_a_split_each_refusal_names_the_version_that_refused(shared, affine_v1,
                                                                    affine_v2):
    shared.json("deploy", affine_v1, "--name", "errsplit")
    d = shared.json("deploy", affine_v2, "--name", "errsplit")["deployment"]
    try:
        shared.json("traffic", "errsplit", "1=50", "2=50")
        named: dict[str, str] = {}  # request id -> the version its answer named
        for kind in BAD:
            until_both_named(partial(split_refusal, kind, d["url"], named), kind)
        until_both_named(lambda: trailer(grpc_refusal(d["grpc_url"], model="errsplit")), "gRPC")
        assert_logged_versions(shared, "errsplit", named)
    finally:
        shared.run("undeploy", "errsplit")


def split_refusal(kind: str, url: str, named: dict[str, str]) -> str:
    r = refusal(kind, url, "errsplit")
    named[r.headers["x-request-id"]] = r.headers["x-model-version"]
    return r.headers["x-model-version"]


def until_both_named(refuse, what: str) -> None:
    """Call ``refuse`` (one bad request: the version its error names) until both were named."""
    seen: set[str] = set()

    def both() -> bool:
        seen.add(refuse())
        assert seen <= {"1", "2"}, seen
        return seen == {"1", "2"}

    wait_for(both, timeout=30, interval=0, what=f"both versions refusing ({what})")


def assert_logged_versions(shared, name: str, named: dict[str, str]) -> None:
    """The request log (written by the version that handled each request) agrees."""
    def logged() -> dict[str, str] | None:
        entries = shared.json("logs", name, "-n", "0")
        found = {e["id"]: str(e["version"]) for e in entries if e["id"] in named}
        return found if len(found) == len(named) else None

    assert wait_for(logged, what="the request log") == named
