"""Dynamic batching in a real worker: concurrent requests share model runs and each gets
its own answer."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests import models

pytestmark = pytest.mark.e2e


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples over every label set."""
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
               if l.startswith((name + " ", name + "{")))


def test_concurrent_requests_are_batched_and_answered_correctly(shared, model_dir):
    path = models.affine(model_dir / "batched.onnx", scale=2.0, bias=0.5)
    url = shared.json("deploy", path, "--name", "batched", "--batch-delay-ms", "2")[
        "deployment"]["url"]

    def one(i: int):
        body = {"id": str(i), "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                          "data": [i, i, i, i]}]}
        with httpx.Client(timeout=20) as c:
            r = c.post(url + "/v2/models/batched/infer", json=body)
        return i, r

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(200)))
    for i, r in answers:
        assert r.status_code == 200, r.text
        assert r.json()["id"] == str(i) and r.json()["outputs"][0]["data"] == [2 * i + 0.5] * 4
    text = httpx.get(url + "/metrics").text
    runs, requests = metric(text, "mserve_batch_size_count"), metric(text, "mserve_batch_size_sum")
    assert requests == 200 and runs < requests, (runs, requests)
    shared.ok("undeploy", "batched")


def test_lone_requests_run_inline_only_on_size_bound_models(shared, model_dir):
    """Sequential requests on an affine model (Mul, Add) run on the event loop; on a
    model with a Loop (run time chosen by an input value) they never do."""
    quick = shared.json("deploy", models.affine(model_dir / "quick.onnx", scale=3.0),
                        "--name", "quick")["deployment"]["url"]
    looped = shared.json("deploy", models.slow(model_dir / "looped.onnx"),
                         "--name", "looped")["deployment"]["url"]
    x = {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
    n = {"name": "n", "datatype": "INT64", "shape": [], "data": [10]}
    with httpx.Client(timeout=20) as c:
        for _ in range(5):
            r = c.post(quick + "/v2/models/quick/infer", json={"inputs": [x]})
            assert r.json()["outputs"][0]["data"] == [3, 6, 9, 12]
            r = c.post(looped + "/v2/models/looped/infer", json={"inputs": [x, n]})
            assert r.json()["outputs"][0]["data"] == [1, 2, 3, 4]
        assert metric(c.get(quick + "/metrics").text, "mserve_inline_runs_total") >= 3
        assert metric(c.get(looped + "/metrics").text, "mserve_inline_runs_total") == 0
    shared.ok("undeploy", "quick")
    shared.ok("undeploy", "looped")


def test_graphscan_reads_the_operators_onnx_reads(model_dir):
    import onnx

    from mserve.daemon.worker import graphscan

    for build in (models.mixed, models.zipmap, models.slow, models.identities):
        path = build(model_dir / f"scan_{build.__name__}.onnx")
        graph = onnx.load(str(path)).graph
        assert graphscan.operators(path) == {(n.domain, n.op_type) for n in graph.node}
    assert graphscan.size_bound(model_dir / "scan_mixed.onnx")
    assert not graphscan.size_bound(model_dir / "scan_slow.onnx")
    (model_dir / "junk.onnx").write_bytes(b"\xff" * 64)
    assert not graphscan.size_bound(model_dir / "junk.onnx")
