"""The whole life of a deployment through the real CLI, daemon and worker."""

from __future__ import annotations

import json
import os
import shutil
import signal

import httpx
import pytest

from mserve.cli.client import DaemonClient
from tests import models
from tests.conftest import wait_for

pytestmark = pytest.mark.e2e
ROWS = [[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0]]


def infer(url: str, name: str, rows=ROWS, version: int | None = None) -> dict:
    path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/infer"
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [len(rows), 4], "data": rows}]}
    r = httpx.post(url + path, json=body, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_deploy_predict_version_rollback_undeploy(mserve, affine_v1, affine_v2, tmp_path):
    first = mserve.json("deploy", affine_v1, "--name", "recs")
    assert first["changed"] and first["version"] == 1
    d = mserve.deployment("recs")
    assert d["status"] == "ready" and d["version"] == 1 and d["device"] == "cpu"
    assert d["url"] == f"http://127.0.0.1:{d['port']}" and d["versions"] == 1

    plain = tmp_path / "in.json"
    plain.write_text(json.dumps({"x": ROWS}))
    from_file = mserve.json("predict", "recs", plain)
    assert from_file["model_version"] == "1"
    assert from_file["outputs"][0]["data"] == [v for row in ROWS for v in row]
    request = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": ROWS[0]}]}
    from_stdin = mserve.json("predict", "recs", "-", input=json.dumps(request))
    assert from_stdin["outputs"][0]["shape"] == [1, 4]

    second = mserve.json("deploy", affine_v2, "--name", "recs")
    assert second["version"] == 2 and second["deployment"]["port"] == d["port"]
    assert infer(d["url"], "recs")["outputs"][0]["data"][:2] == [3.0, 5.0]  # 2x + 1
    pinned = infer(d["url"], "recs", version=1)
    assert pinned["model_version"] == "1" and pinned["outputs"][0]["data"][:2] == [1.0, 2.0]

    back = mserve.json("rollback", "recs")
    assert back["changed"] and back["version"] == 1 and back["previous"] == 2
    assert infer(d["url"], "recs")["model_version"] == "1"
    states = {v["version"]: v["state"] for v in mserve.json("versions", "recs")}
    assert states == {1: "active", 2: "standby"}
    assert mserve.json("rollback", "recs", "--to", "2")["version"] == 2

    assert mserve.json("undeploy", "recs")["removed"] is True
    assert mserve.json("list") == []
    with pytest.raises(httpx.TransportError):
        httpx.get(d["url"] + "/v2/health/live", timeout=2)
    assert "deployment 'recs' not found" in mserve.fail("versions", "recs")



def test_a_plain_rollback_goes_back_to_the_previous_active_version(shared, model_dir,
                                                                    affine_v1, affine_v2):
    """SPEC: rollback "makes the previous active version (or V) active again": after
    `rollback --to 1` from 3, a plain rollback is back to 3, not "no version before 1"."""
    v3 = models.affine(model_dir / "rb3" / "affine.onnx", scale=3.0, bias=0.0)
    for path in (affine_v1, affine_v2, v3):
        shared.json("deploy", path, "--name", "rb")
    url = shared.deployment("rb")["url"]
    assert shared.json("rollback", "rb", "--to", "1")["version"] == 1
    back = shared.json("rollback", "rb")
    assert back["changed"] and (back["version"], back["previous"]) == (3, 1)
    assert infer(url, "rb")["model_version"] == "3"
    assert shared.json("rollback", "rb")["version"] == 1  # and again: the one before that
    states = {v["version"]: v["state"] for v in shared.json("versions", "rb")}
    assert states == {1: "active", 2: "retired", 3: "standby"}
    shared.ok("undeploy", "rb")

def test_identical_redeploy_is_a_no_op(shared, affine_v1, tmp_path):
    copy = tmp_path / "same.onnx"
    shutil.copy(affine_v1, copy)
    assert shared.json("deploy", affine_v1, "--name", "idem")["changed"]
    again = shared.json("deploy", copy, "--name", "idem")
    assert again["changed"] is False and again["version"] == 1
    assert "nothing changed" in shared.ok("deploy", affine_v1, "--name", "idem").stdout
    assert len(shared.json("versions", "idem")) == 1
    shared.ok("undeploy", "idem")


def test_editing_the_source_after_deploy_changes_nothing(shared, tmp_path):
    path = models.affine(tmp_path / "m.onnx", scale=3.0)
    shared.json("deploy", path, "--name", "edited")
    models.affine(path, scale=5.0)  # the user's file changes; the stored copy must not
    url = shared.deployment("edited")["url"]
    assert infer(url, "edited", [[1, 1, 1, 1]])["outputs"][0]["data"] == [3.0] * 4
    path.unlink()
    assert infer(url, "edited", [[1, 1, 1, 1]])["outputs"][0]["data"] == [3.0] * 4
    shared.ok("undeploy", "edited")


def test_bad_models_fail_and_the_old_version_keeps_serving(shared, affine_v1, tmp_path):
    shared.json("deploy", affine_v1, "--name", "sturdy")
    url = shared.deployment("sturdy")["url"]
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a model\n" * 10)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(affine_v1.read_bytes()[: affine_v1.stat().st_size // 2])
    for bad in (junk, truncated):
        err = shared.fail("deploy", bad, "--name", "sturdy")
        assert err.startswith("Error: ") and len(err.strip().splitlines()) <= 2, err
        assert "onnxruntime" not in err.lower() or "ONNXRuntimeError" not in err
        d = shared.deployment("sturdy")
        assert d["version"] == 1 and d["status"] == "ready"
        assert infer(url, "sturdy")["model_version"] == "1"
    states = [v["state"] for v in shared.json("versions", "sturdy")]
    assert states == ["active", "failed", "failed"]
    shared.ok("undeploy", "sturdy")


def test_first_deploy_of_a_bad_model_leaves_nothing(shared, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01garbage")
    assert "not a valid ONNX model" in shared.fail("deploy", junk, "--name", "never")
    assert all(d["name"] != "never" for d in shared.json("list"))


def test_killed_daemon_restores_everything(mserve, affine_v1, affine_v2):
    mserve.json("deploy", affine_v1, "--name", "alpha")
    mserve.json("deploy", affine_v2, "--name", "alpha")
    mserve.json("deploy", affine_v2, "--name", "beta")
    before = {d["name"]: (d["port"], d["version"]) for d in mserve.json("list")}
    os.kill(mserve.daemon_pid(), signal.SIGKILL)
    wait_for(lambda: mserve.daemon_pid() is None, what="daemon to die")
    after = mserve.json("list")  # autostarts the daemon; it restores before answering
    assert {d["name"]: (d["port"], d["version"]) for d in after} == before
    assert all(d["status"] == "ready" for d in after)
    for d in after:
        assert infer(d["url"], d["name"])["model_version"] == str(d["version"])
    assert infer(after[0]["url"], "alpha", version=1)["model_version"] == "1"  # standby too


def test_killed_worker_is_restarted(mserve, affine_v1):
    mserve.json("deploy", affine_v1, "--name", "phoenix")
    d = mserve.deployment("phoenix")
    os.kill(d["pid"], signal.SIGKILL)
    back = wait_for(lambda: (x := mserve.deployment("phoenix"))["status"] == "ready"
                    and x["pid"] not in (None, d["pid"]) and x, what="worker restart")
    assert back["port"] == d["port"] and back["restarts"] == 1
    assert infer(back["url"], "phoenix")["model_version"] == "1"
    events = DaemonClient(str(mserve.home / "mserve.sock")).events("phoenix")
    assert [e["action"] for e in events][-2:] == ["worker-exit", "restart"]
    assert "SIGKILL" in events[-2]["detail"]
