"""Dynamic batching in a real worker: concurrent requests share model runs and each gets
its own answer."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests import models

pytestmark = pytest.mark.e2e


def metric(text: str, name: str) -> float:
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name + " "))


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
