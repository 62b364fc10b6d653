"""`--threads N`: ONNX Runtime's intra-op threads per session, through the real daemon and
worker: the session really gets them, and status, model config and a redeploy show them."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.models import affine

pytestmark = pytest.mark.e2e


def _threads(pid: int) -> int:
    """The process's thread count, from the kernel."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no Threads line for pid {pid}")


def _config(url: str, name: str) -> dict:
    with httpx.Client(timeout=10) as c:
        return c.get(f"{url}/v2/models/{name}/config").json()


def test_threads_reach_the_session_and_are_shown(shared, model_dir):
    path = affine(model_dir / "threads" / "affine.onnx", scale=3.0)
    one = shared.json("deploy", path, "--name", "threads-one", "--threads", "1")
    four = shared.json("deploy", path, "--name", "threads-four", "--threads", "4")
    # ONNX Runtime starts threads-1 pool threads per session: the worker of 4 has 3 more
    # (allowing one for a thread another part of the worker happened to start)
    extra = _threads(four["deployment"]["pid"]) - _threads(one["deployment"]["pid"])
    assert extra >= 2, f"--threads 4 started {extra} more threads than --threads 1"
    assert shared.json("status", "threads-four")["threads"] == 4
    assert "threads=4" in shared.ok("status", "threads-four").stdout
    config = _config(four["deployment"]["url"], "threads-four")
    assert config["parameters"] == {"intra_op_thread_count": {"string_value": "4"}}

    # the same bytes would load nothing again: refused, and nothing changes
    refused = shared.fail("deploy", path, "--name", "threads-four", "--threads", "2")
    assert "--threads changes how a version is loaded" in refused
    assert shared.json("status", "threads-four")["threads"] == 4
    # a new version loads with the new count
    newer = affine(model_dir / "threads" / "v2" / "affine.onnx", scale=3.0, bias=0.5)
    again = shared.json("deploy", newer, "--name", "threads-four", "--threads", "2")
    assert again["version"] == 2
    assert shared.json("status", "threads-four")["threads"] == 2
    config = _config(again["deployment"]["url"], "threads-four")
    assert config["parameters"] == {"intra_op_thread_count": {"string_value": "2"}}
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    with httpx.Client(timeout=10) as c:
        answer = c.post(f"{again['deployment']['url']}/v2/models/threads-four/infer", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["data"] == [3.5, 6.5, 9.5, 12.5]
    for name in ("threads-one", "threads-four"):
        shared.ok("undeploy", name)


def test_default_threads_are_the_runtimes_own(shared, model_dir):
    path = affine(model_dir / "threads-default" / "affine.onnx")
    answer = shared.json("deploy", path, "--name", "threads-auto")
    assert answer["deployment"]["threads"] is None
    assert _config(answer["deployment"]["url"], "threads-auto")["parameters"] == {}
    shared.ok("undeploy", "threads-auto")


@pytest.mark.parametrize("value", ["0", "-1", "two", "5000"])
def test_bad_threads_are_bad_usage(shared, model_dir, value):
    path = affine(model_dir / "threads-bad" / "affine.onnx")
    done = shared.run("deploy", path, "--name", "threads-bad", "--threads", value)
    assert done.returncode == 2, done.stderr
    assert "--threads" in done.stderr and "Traceback" not in done.stderr
