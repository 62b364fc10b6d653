"""Deploying a new version and rolling back under continuous load fail no request."""

from __future__ import annotations

import threading
from collections import Counter

import httpx
import pytest

from tests import models

pytestmark = pytest.mark.e2e
CLIENTS = 4


def test_deploy_and_rollback_under_load_fail_no_request(mserve, affine_v1, tmp_path):
    mserve.json("deploy", affine_v1, "--name", "busy")
    url = mserve.deployment("busy")["url"] + "/v2/models/busy/infer"
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]}]}
    stop = threading.Event()
    outcomes: Counter = Counter()
    versions: Counter = Counter()
    lock = threading.Lock()

    def client():
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                try:
                    r = http.post(url, json=body)
                    key = r.status_code
                    version = r.json().get("model_version") if key == 200 else None
                except httpx.HTTPError as exc:
                    key, version = type(exc).__name__, None
                with lock:
                    outcomes[key] += 1
                    versions[version] += 1

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        for scale in (2.0, 3.0):
            mserve.json("deploy", models.affine(tmp_path / f"s{scale}.onnx", scale=scale),
                        "--name", "busy")
        mserve.json("rollback", "busy")
        mserve.json("rollback", "busy", "--to", "3")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert set(outcomes) == {200}, outcomes
    assert outcomes[200] > 50
    assert {"1", "2", "3"} <= set(versions), versions
