"""Triton's own HTTP tools against real workers: tritonclient.http and .aio read the model
configuration (derived from what mserve does: the batching decision, the sessions, the device)
and the repository index; load/unload say how mserve manages versions. Statistics give equal
compute counts (perf_analyzer checks), and concurrent requests over HTTP and gRPC are each
counted exactly once in /metrics, the statistics and the request log."""

from __future__ import annotations

import asyncio
import threading

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests.conftest import wait_for
from tests.test_batchcheck import gru, mlp

pytestmark = pytest.mark.e2e
MANAGED = "mserve manages versions itself: use 'mserve deploy' / 'mserve rollback'"
N = 48


@pytest.fixture(scope="module")
def served(shared, model_dir):
    """tmlp (a batchable MLP, versions 1 and 2) and tgru (a time-major GRU, which the batching
    check refuses): name -> its `mserve deploy` description."""
    out = {"tmlp": shared.json("deploy", mlp(model_dir / "tmlp1.onnx"), "--name", "tmlp",
                               "--batch-delay-ms", "1.5")["deployment"]}
    out["tmlp"] = shared.json("deploy", mlp(model_dir / "tmlp2.onnx"), "--name", "tmlp",
                              "--batch-delay-ms", "1.5")["deployment"]
    out["tgru"] = shared.json("deploy", gru(model_dir / "tgru.onnx", with_state=False),
                              "--name", "tgru")["deployment"]
    yield out
    for name in out:
        shared.run("undeploy", name)


def client(d: dict) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(d["url"].removeprefix("http://"))


def kind(shared, name: str) -> str:
    return "KIND_GPU" if shared.deployment(name)["device"] == "cuda" else "KIND_CPU"


def test_config_of_a_batchable_mlp(shared, served):
    c = client(served["tmlp"])
    config = c.get_model_config("tmlp")
    assert config["name"] == "tmlp" and config["platform"] == "onnxruntime_onnx"
    assert config["backend"] == "onnxruntime"
    assert config["max_batch_size"] == 64
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 1500
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("x", "TYPE_FP32", [8])]
    assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [
        ("y", "TYPE_FP32", [4])]
    group, = config["instance_group"]
    assert group["count"] == 1 and group["kind"] == kind(shared, "tmlp")
    assert config["version_policy"] == {"specific": {"versions": [1, 2]}}
    meta = c.get_model_metadata("tmlp")  # dims are the metadata's shape less the batch dim
    assert [i["shape"][1:] for i in meta["inputs"]] == [i["dims"] for i in config["input"]]
    assert c.get_model_config("tmlp", "1")["max_batch_size"] == 64
    with pytest.raises(InferenceServerException, match="version '9'"):
        c.get_model_config("tmlp", "9")
    with pytest.raises(InferenceServerException, match="not found"):
        c.get_model_config("other")
    c.close()


def test_config_of_a_gru_the_batching_check_refuses(shared, served):
    c = client(served["tgru"])
    config = c.get_model_config("tgru")
    assert config["max_batch_size"] == 0
    assert "dynamic_batching" not in config and "sequence_batching" not in config
    meta = c.get_model_metadata("tgru")
    assert [i["dims"] for i in config["input"]] == [i["shape"] for i in meta["inputs"]] == [
        [-1, -1, 8]]
    assert [o["dims"] for o in config["output"]] == [[-1, 1, -1, 4]]
    assert config["instance_group"][0]["kind"] == kind(shared, "tgru")
    assert c.get_model_config("tgru", "1") == config | {"version_policy": {
        "specific": {"versions": [1]}}}
    c.close()


def test_config_by_label_and_over_raw_http(shared, served):
    shared.ok("label", "tmlp", "old", "1")
    url = served["tmlp"]["url"]
    by_label = httpx.get(url + "/v2/models/tmlp/labels/old/config")
    assert by_label.status_code == 200 and by_label.json()["max_batch_size"] == 64
    assert by_label.headers["content-type"] == "application/json"
    assert httpx.get(url + "/v2/models/tmlp/labels/nope/config").status_code == 404


def test_aio_client_reads_config_and_index(served):
    async def main():
        c = triton_aio.InferenceServerClient(served["tgru"]["url"].removeprefix("http://"))
        try:
            config = await c.get_model_config("tgru")
            pinned = await c.get_model_config("tgru", "1")
            index = await c.get_model_repository_index()
            with pytest.raises(InferenceServerException, match="mserve manages versions"):
                await c.load_model("tgru")
        finally:
            await c.close()
        return config, pinned, index

    config, pinned, index = asyncio.run(main())
    assert config["max_batch_size"] == 0 and pinned["name"] == "tgru"
    assert index == [{"name": "tgru", "version": "1", "state": "READY", "reason": ""}]


def test_repository_index_lists_the_loaded_versions(served):
    c = client(served["tmlp"])
    assert c.get_model_repository_index() == [
        {"name": "tmlp", "version": "1", "state": "READY", "reason": ""},
        {"name": "tmlp", "version": "2", "state": "READY", "reason": ""}]
    c.close()
    url = served["tmlp"]["url"] + "/v2/repository/index"
    for body in ({}, {"ready": True}, {"ready": False}):
        assert [e["version"] for e in httpx.post(url, json=body).json()] == ["1", "2"]
    bad = httpx.post(url, json={"ready": 3})
    assert bad.status_code == 400 and "'ready'" in bad.json()["error"]
    assert httpx.post(url, content=b"[").status_code == 400


def test_load_and_unload_answer_how_mserve_manages_versions(served):
    c = client(served["tmlp"])
    for call in (c.load_model, c.unload_model):
        with pytest.raises(InferenceServerException) as info:
            call("tmlp")
        assert MANAGED in str(info.value)
    c.close()
    url = served["tmlp"]["url"]
    for op in ("load", "unload"):
        r = httpx.post(f"{url}/v2/repository/models/tmlp/{op}", json={})
        assert (r.status_code, r.json()) == (400, {"error": MANAGED})
    assert httpx.post(url + "/v2/repository/models/other/load").status_code == 404


def test_the_new_routes_need_the_token(shared, model_dir):
    d = shared.json("deploy", mlp(model_dir / "tlocked.onnx"), "--name", "tlocked",
                    "--token", "s3cret")["deployment"]
    try:
        url, auth = d["url"], {"Authorization": "Bearer s3cret"}
        for method, path in (("GET", "/v2/models/tlocked/config"),
                             ("POST", "/v2/repository/index"),
                             ("POST", "/v2/repository/models/tlocked/load")):
            assert httpx.request(method, url + path).status_code == 401
            assert httpx.request(method, url + path, headers=auth).status_code in (200, 400)
    finally:
        shared.run("undeploy", "tlocked")


def test_statistics_count_decode_run_and_encode_of_every_request(served):
    """compute_input, compute_infer and compute_output each count every answered request with
    a real time (perf_analyzer stops at 'compute counts must be the same'); a version that is
    not batched makes one inference per request, whatever its dim 0 (here: time steps)."""
    d = served["tgru"]
    x = np.ones((3, 1, 8), dtype=np.float32)
    c = client(d)
    first = c.get_inference_statistics("tgru", "1")["model_stats"][0]
    before = first["inference_stats"]
    for binary in (False, True):
        given = triton.InferInput("input", list(x.shape), "FP32")
        given.set_data_from_numpy(x, binary_data=binary)
        c.infer("tgru", [given])
    g = tg.InferenceServerClient(d["grpc_url"])
    given = tg.InferInput("input", list(x.shape), "FP32")
    given.set_data_from_numpy(x)
    g.infer("tgru", [given])
    g.close()
    body = {"instances": x.tolist()}
    assert httpx.post(d["url"] + "/v1/models/tgru:predict", json=body).status_code == 200
    last = c.get_inference_statistics("tgru", "1")["model_stats"][0]
    c.close()
    stats = last["inference_stats"]
    assert stats["success"]["count"] - before["success"]["count"] == 4
    assert last["inference_count"] - first["inference_count"] == 4  # not 4 x 3 time steps
    for key in ("compute_input", "compute_infer", "compute_output"):
        assert stats[key]["count"] == stats["success"]["count"], key
        assert stats[key]["ns"] > before[key]["ns"], key


def samples(url: str) -> dict:
    families = text_string_to_metric_families(httpx.get(url + "/metrics").text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in families for s in f.samples}


def http_together(url: str, n: int) -> list[int]:
    """``n`` requests from ``n`` connections, released at once: their statuses."""
    barrier, statuses = threading.Barrier(n), []
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": [1.0] * 8}]}

    def one():
        with httpx.Client(base_url=url, timeout=30) as c:
            c.get("/v2/health/live")  # connected before the barrier
            barrier.wait()
            statuses.append(c.post("/v2/models/tcount/infer", json=body).status_code)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def grpc_together(grpc_url: str, n: int) -> list:
    """``n`` calls in flight together on one tritonclient.grpc channel: their errors."""
    c = tg.InferenceServerClient(grpc_url)
    x = tg.InferInput("x", [1, 8], "FP32")
    x.set_data_from_numpy(np.ones((1, 8), dtype=np.float32))
    done, errors = threading.Semaphore(0), []

    def callback(result, error):
        errors.append(error)
        done.release()

    for _ in range(n):
        c.async_infer("tcount", [x], callback)
    for _ in range(n):
        assert done.acquire(timeout=30)
    c.close()
    return errors


def test_concurrent_requests_are_each_counted_once(shared, model_dir):
    d = shared.json("deploy", mlp(model_dir / "tcount.onnx"), "--name", "tcount")["deployment"]
    try:
        ok = (("code", "200"), ("model", "tcount"), ("outcome", "success"), ("version", "1"))
        c = client(d)
        for protocol, total in (("http", N), ("grpc", 2 * N)):
            if protocol == "http":
                assert http_together(d["url"], N) == [200] * N
            else:
                assert grpc_together(d["grpc_url"], N) == [None] * N
            assert samples(d["url"])["mserve_requests_total", ok] == total, protocol
            stats = c.get_inference_statistics("tcount")["model_stats"][0]
            assert stats["inference_stats"]["success"]["count"] == total, protocol
            assert stats["inference_count"] == total, protocol
            for key in ("compute_input", "compute_infer", "compute_output"):
                assert stats["inference_stats"][key]["count"] == total, (protocol, key)
            wait_for(lambda: len(shared.json("logs", "tcount", "-n", "0")) == total,
                     what=f"{total} lines in the request log")
        assert len(shared.json("logs", "tcount", "-n", "0")) == 2 * N  # and no more
        c.close()
    finally:
        shared.run("undeploy", "tcount")
