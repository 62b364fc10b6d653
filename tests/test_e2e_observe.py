"""What operators see: Prometheus metrics, Triton statistics, request logs, live list,
status and history, through real workers."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families

from tests import models
from tests.conftest import wait_for

pytestmark = pytest.mark.e2e
GOOD = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [31415.926] * 8}]}
BAD = {"inputs": [{"name": "x", "datatype": "FP64", "shape": [2, 4], "data": [31415.926] * 8}]}


@pytest.fixture(scope="module")
def observed(shared, model_dir):
    """A deployment that answered 5 good requests (2 rows each) and 2 bad ones."""
    path = models.affine(model_dir / "observed.onnx", scale=3.0)
    url = shared.json("deploy", path, "--name", "observed")["deployment"]["url"]
    with httpx.Client(base_url=url) as c:
        for i in range(5):
            r = c.post("/v2/models/observed/infer", json=GOOD, headers={"X-Request-ID": f"g{i}"})
            assert r.status_code == 200 and r.headers["x-request-id"] == f"g{i}"
        for _ in range(2):
            assert c.post("/v2/models/observed/infer", json=BAD).status_code == 400
    yield url
    shared.run("undeploy", "observed")


def samples(url: str) -> dict:
    families = text_string_to_metric_families(httpx.get(url + "/metrics").text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in families for s in f.samples}


def test_prometheus_metrics_count_what_was_sent(observed):
    got = samples(observed)
    ok = (("code", "200"), ("model", "observed"), ("outcome", "success"), ("version", "1"))
    bad = (("code", "400"), ("model", "observed"), ("outcome", "failure"), ("version", "1"))
    v1 = (("model", "observed"), ("version", "1"))
    assert got[("mserve_requests_total", ok)] == 5
    assert got[("mserve_requests_total", bad)] == 2
    assert got[("mserve_request_duration_seconds_count", v1)] == 5
    assert got[("mserve_batch_size_sum", v1)] == 5
    assert got[("mserve_queue_duration_seconds_count", v1)] == 5
    assert got[("mserve_inference_duration_seconds_count", v1)] >= 1
    assert got[("mserve_queue_depth", v1)] == 0
    assert got[("mserve_model_load_seconds", v1)] > 0
    assert got[("mserve_process_resident_memory_bytes", ())] > 10e6
    documented = (Path(__file__).parent.parent / "docs" / "metrics.md").read_text()
    for name, _ in got:
        family = name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
        family = family.removesuffix("_bucket").removesuffix("_created")
        assert family in documented or family.startswith("mserve_process_"), name


def test_triton_statistics_with_the_real_client(observed):
    client = triton.InferenceServerClient(observed.removeprefix("http://"))
    stats = client.get_inference_statistics("observed")["model_stats"]
    assert len(stats) == 1 and stats[0]["version"] == "1"
    s = stats[0]
    assert s["inference_stats"]["success"]["count"] == 5
    assert s["inference_stats"]["fail"]["count"] == 2
    assert s["inference_count"] == 10  # rows
    assert 1 <= s["execution_count"] <= 5
    assert client.get_inference_statistics("observed", "1")["model_stats"][0]["name"] == \
        "observed"
    client.close()


def test_request_log_and_logs_command(shared, observed):
    def lines():
        result = shared.run("logs", "observed", "--json", "--since", "10m")
        return result.returncode == 0 and json.loads(result.stdout)

    entries = wait_for(lambda: (e := lines()) and len(e) == 7 and e, what="request log")
    assert [e["id"] for e in entries[:5]] == [f"g{i}" for i in range(5)]
    assert {e["status"] for e in entries} == {200, 400}
    first = entries[0]
    assert first["version"] == 1 and first["bytes_in"] > 0 and first["bytes_out"] > 0
    assert first["batch"] >= 1 and first["latency_ms"] > 0 and first["client"]
    assert "31415" not in json.dumps(entries)  # never tensor contents
    assert "g4" in shared.ok("logs", "observed", "-n", "3").stdout
    assert "bad" not in shared.fail("logs", "observed", "--since", "soon", code=2)
    # the daemon log (the shared daemon logs every deploy, so its start may be long ago)
    daemon_log = shared.ok("logs", "-n", "1000000").stdout
    assert "daemon ready" in daemon_log and "deployed observed version 1" in daemon_log


def test_list_status_and_history(shared, observed, model_dir):
    row = next(d for d in shared.json("list") if d["name"] == "observed")
    assert row["live"]["requests_1m"] == 7 and row["live"]["errors_1m"] == 2
    assert row["live"]["p50_ms_1m"] > 0 and row["live"]["rss_bytes"] > 10e6
    assert "REQ/MIN" in shared.ok("list").stdout
    shared.json("deploy", models.affine(model_dir / "observed2.onnx", scale=4.0),
                "--name", "observed")
    shared.json("rollback", "observed")
    detail = shared.json("status", "observed")
    assert detail["loaded"] == [1, 2] and detail["version"] == 1
    assert [e["action"] for e in detail["events"]] == ["deploy", "deploy", "rollback"]
    human = shared.ok("status", "observed").stdout
    assert "version 1 ready" in human and "rollback" in human
    history = shared.json("history", "observed")
    assert [(e["action"], e["version"]) for e in history] == [
        ("deploy", 1), ("deploy", 2), ("rollback", 1)]
    assert all(e["time"] and e["actor"] for e in history)
    assert "deployment 'ghost' not found" in shared.fail("history", "ghost")


def test_deploy_progress_is_streamed_in_phases(shared, model_dir):
    from mserve.cli.client import DaemonClient

    path = models.affine(model_dir / "progress.onnx", scale=5.0)
    client = DaemonClient(str(shared.home / "mserve.sock"))
    steps: list[dict] = []
    first = client.stream("POST", "/v1/deployments", {"path": str(path), "name": "progress"},
                          steps.append)
    assert first["version"] == 1 and [s["step"] for s in steps][-1] == "load"
    copies = [s for s in steps if s["step"] == "copy"]
    assert copies[-1]["done"] == copies[-1]["total"] == path.stat().st_size
    steps.clear()
    path2 = models.affine(model_dir / "progress2.onnx", scale=6.0)
    client.stream("POST", "/v1/deployments", {"path": str(path2), "name": "progress"},
                  steps.append)
    assert [s["step"] for s in steps if s["step"] != "copy"] == ["validate", "load", "switch"]
    from mserve.daemon.errors import MserveError

    with pytest.raises(MserveError, match="does not exist"):
        client.stream("POST", "/v1/deployments", {"path": "/nope.onnx", "name": "progress"},
                      steps.append)
    shared.ok("undeploy", "progress")


def test_log_payloads_writes_bodies_only_when_asked(shared, model_dir):
    path = models.affine(model_dir / "payloads.onnx", scale=7.0)
    url = shared.json("deploy", path, "--name", "payloads", "--log-payloads")[
        "deployment"]["url"]
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [271828] * 4}]}
    assert httpx.post(url + "/v2/models/payloads/infer", json=body).status_code == 200

    def entries():
        result = shared.run("logs", "payloads", "--json")
        return result.returncode == 0 and json.loads(result.stdout)

    entry = wait_for(lambda: (e := entries()) and e[-1], what="request log")
    assert "271828" in entry["request"]["text"] and entry["request"]["bytes"] > 0
    assert "1902796" in entry["response"]["text"]  # 271828 * 7
    shared.json("deploy", models.affine(model_dir / "payloads2.onnx", scale=8.0),
                "--name", "payloads", "--no-log-payloads")
    assert httpx.post(url + "/v2/models/payloads/infer", json=body).status_code == 200
    last = wait_for(lambda: (e := entries()) and len(e) == 2 and e[-1], what="second line")
    assert "request" not in last and "response" not in last
    shared.ok("undeploy", "payloads")
