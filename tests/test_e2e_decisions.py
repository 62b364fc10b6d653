"""What a deploy decides and says, through the real daemon and worker: whether a version
batches (and why not), and whether its signature differs from the active version's."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from tests import test_batchcheck as shapes
from tests.conftest import wait_for
from tests.models import affine

pytestmark = pytest.mark.e2e


def _infer(url: str, name: str, x: np.ndarray, input_name: str = "input") -> httpx.Response:
    body = {"inputs": [{"name": input_name, "datatype": "FP32", "shape": list(x.shape),
                        "data": x.ravel().tolist()}]}
    with httpx.Client(timeout=30) as c:
        return c.post(f"{url}/v2/models/{name}/infer", json=body)


def test_a_time_major_gru_is_not_batched_and_answers_right(shared, model_dir):
    """PyTorch's default GRU layout under concurrent requests of two sequence lengths: each
    answer equals ONNX Runtime's on that request alone (batching joined time steps before)."""
    path = shapes.gru(model_dir / "gru_tm.onnx", with_state=False)
    answer = shared.json("deploy", path, "--name", "gru-tm", "--batch-delay-ms", "5")
    url = answer["deployment"]["url"]
    assert answer["deployment"]["batching"]["enabled"] is False
    reason = answer["deployment"]["batching"]["reason"]
    assert "differed when requests shared a run" in reason
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal((5 if i % 2 else 7, 1, 8)).astype(np.float32)
              for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda x: _infer(url, "gru-tm", x), inputs))
    wrong = 0
    for x, r in zip(inputs, answers):
        assert r.status_code == 200, r.text
        (expected,) = session.run(None, {"input": x})
        got = np.array(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(expected.shape)
        wrong += not np.allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert wrong == 0, f"{wrong} of 32 answers were wrong"
    status = shared.json("status", "gru-tm")
    assert status["batching"] == {"enabled": False, "reason": reason}
    assert [v["batching"]["enabled"] for v in status["versions_detail"]] == [False]
    assert shared.deployment("gru-tm")["batching"]["enabled"] is False
    assert f"batching:    off: {reason}" in shared.ok("status", "gru-tm").stdout
    shared.ok("undeploy", "gru-tm")


def test_an_empty_tensor_is_refused_and_the_worker_lives(shared, model_dir):
    """ONNX Runtime's GRU kernel aborts the whole process on a zero-length sequence or
    batch: such a request is a 400, and the worker keeps serving."""
    path = shapes.gru(model_dir / "gru_empty.onnx", with_state=True)
    d = shared.json("deploy", path, "--name", "gru-empty")["deployment"]
    for shape in ([0, 1, 8], [5, 0, 8]):
        r = _infer(d["url"], "gru-empty", np.zeros(shape, np.float32))
        assert r.status_code == 400 and "size 0" in r.json()["error"], r.text
    assert _infer(d["url"], "gru-empty", np.ones((2, 1, 8), np.float32)).status_code == 200
    after = shared.deployment("gru-empty")
    assert after["pid"] == d["pid"] and after["restarts"] == 0
    shared.ok("undeploy", "gru-empty")


def test_batching_on_and_off_are_the_users_call(shared, model_dir):
    path = shapes.gru(model_dir / "gru_on.onnx", with_state=False)
    forced = shared.json("deploy", path, "--name", "gru-on", "--batching", "on")
    assert forced["deployment"]["batching"] == {"enabled": True,
                                                "reason": "batching forced on (--batching on)"}
    off = shared.json("deploy", affine(model_dir / "off.onnx"), "--name", "aff-off",
                      "--batching", "off")["deployment"]
    assert off["batching"]["enabled"] is False and off["options"]["batching"] == "off"
    url = off["url"]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: _infer(url, "aff-off", np.ones((1, 4), np.float32), "x"),
                      range(64)))
    logged = wait_for(lambda: (lines := shared.json("logs", "aff-off", "-n", "100"))
                      and len(lines) >= 64 and lines, what="64 request-log lines")
    assert len(logged) == 64 and {line["batch"] for line in logged} == {1}
    assert "'maybe' is not one of" in shared.fail("deploy", path, "--name", "bad", "--batching",
                                            "maybe", code=2)
    shared.ok("undeploy", "gru-on")
    shared.ok("undeploy", "aff-off")


def test_a_changed_signature_is_said_and_guards_canaries(shared, model_dir):
    v1 = affine(model_dir / "sig1" / "m.onnx", scale=1.0)
    renamed = shapes.mlp(model_dir / "sig2.onnx")  # input 'x' [batch, 8], output 'y' [batch, 4]
    first = shared.json("deploy", v1, "--name", "sig")
    assert first["signature_changed"] == []
    refused = shared.fail("deploy", renamed, "--name", "sig", "--canary", "20")
    assert "--allow-signature-change" in refused and "input 'x' changed" in refused
    assert shared.deployment("sig")["version"] == 1
    assert [v["version"] for v in shared.json("versions", "sig")] == [1]
    canary = shared.json("deploy", renamed, "--name", "sig", "--canary", "20",
                         "--allow-signature-change")
    assert canary["signature_changed"] == ["input 'x' changed: FP32 [-1, 4] -> FP32 [-1, 8]"]
    assert canary["previous"] == 1
    shared.ok("rollback", "sig")
    plain = shared.run("deploy", affine(model_dir / "sig3" / "m.onnx", scale=3.0, width=6),
                       "--name", "sig")
    assert plain.returncode == 0, plain.stderr
    assert "Warning: the signature differs from version 1" in plain.stderr
    assert "input 'x' changed: FP32 [-1, 4] -> FP32 [-1, 6]" in plain.stderr
    events = [e["action"] for e in shared.json("history", "sig")]
    assert "deploy-refused" in events
    shared.ok("undeploy", "sig")
