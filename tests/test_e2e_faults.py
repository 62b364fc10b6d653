"""Faults through the real daemon and workers: kill -9 mid-deploy, SIGTERM with requests in
flight, models that hang or crash on load, a full disk, concurrent deploys, a worker that
keeps dying."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from mserve.cli.client import DaemonClient
from mserve.daemon.errors import DeployFailed
from tests import models
from tests.conftest import CLI, wait_for

pytestmark = pytest.mark.e2e


def log_has(m, text: str) -> bool:
    try:
        return text in (m.home / "logs" / "daemon.log").read_text()
    except FileNotFoundError:
        return False


def store_entries(m) -> list[str]:
    return sorted(os.listdir(m.home / "models"))


def big_model(path, seed: int = 0):
    """A MatMul with 256x256 weights (256 KiB): big enough for a file-size limit to bite."""
    w = numpy_helper.from_array(np.random.default_rng(seed).random((256, 256), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 256])], [w])
    return models._save(graph, path)


@pytest.mark.parametrize("point", ["during-copy", "after-copy"])
def test_kill_9_in_the_middle_of_a_deploy(mserve, affine_v1, tmp_path, point):
    mserve.json("deploy", affine_v1, "--name", "m")
    mserve.ok("daemon", "stop")
    new = big_model(tmp_path / "new.onnx")
    deploy = subprocess.Popen(CLI + ["deploy", str(new), "--name", "m"], text=True,
                              env={**mserve.env, "MSERVE_TEST_PAUSE": point},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: log_has(mserve, f"pausing at {point}"), timeout=60, what=point)
        os.kill(mserve.daemon_pid(), signal.SIGKILL)
        out, err = deploy.communicate(timeout=30)
    finally:
        deploy.kill()
    assert deploy.returncode == 1 and err.startswith("Error: ") and "Traceback" not in err
    assert "the daemon closed the connection before answering" in err, err  # was 'malformed'
    d = mserve.deployment("m")  # a fresh daemon, restored from SQLite
    assert d["version"] == 1 and d["status"] == "ready"
    versions = mserve.json("versions", "m")
    assert [(v["version"], v["state"]) for v in versions] == [(1, "active")]
    assert not any(e.startswith(".tmp-") for e in store_entries(mserve))
    for v in versions:
        assert (mserve.home / "models" / v["sha256"] / "model.onnx").is_file()
    r = httpx.post(d["url"] + "/v2/models/m/infer", json={"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
    assert r.json()["model_version"] == "1"


def test_sigterm_drains_requests_in_flight(mserve, tmp_path):
    url = mserve.json("deploy", models.slow(tmp_path / "slow.onnx"), "--name", "slow")[
        "deployment"]["url"]
    daemon = mserve.daemon_pid()
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]},
                       {"name": "n", "datatype": "INT64", "shape": [], "data": [2_000_000]}]}
    with ThreadPoolExecutor(2) as pool:
        pending = [pool.submit(httpx.post, url + "/v2/models/slow/infer", json=body, timeout=60)
                   for _ in range(2)]
        wait_for(lambda: 'mserve_queue_depth{model="slow",version="1"} 2.0' in httpx.get(url + "/metrics").text,
                 what="requests in flight")
        os.kill(daemon, signal.SIGTERM)
        answers = [f.result() for f in pending]
    assert [a.status_code for a in answers] == [200, 200]
    wait_for(lambda: mserve.daemon_pid() is None, timeout=30, what="daemon exit")
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/v2/health/live", timeout=2)
    assert mserve.deployment("slow")["status"] == "ready"  # the next start restores it


def test_a_model_that_hangs_on_load_fails_in_bounded_time(mserve, affine_v1, tmp_path):
    mserve.env["MSERVE_LOAD_TIMEOUT"] = "3"
    mserve.json("deploy", affine_v1, "--name", "steady")
    hang = models.hanging(tmp_path / "hang.onnx")
    err = mserve.fail("deploy", hang, "--name", "steady")
    assert "longer than 3 s" in err
    d = mserve.deployment("steady")
    assert d["version"] == 1 and d["status"] == "ready"
    err = mserve.fail("deploy", hang, "--name", "fresh")
    assert "within 3 s" in err
    assert [d["name"] for d in mserve.json("list")] == ["steady"]


def test_a_model_that_crashes_the_loader_is_a_clear_error(tmp_path):
    """The probe runs in its own process: a loader that dies by a signal is reported."""
    from mserve.daemon.deployments import Deployments
    from mserve.daemon.paths import Paths
    from mserve.daemon.state import State
    from mserve.daemon.store import Store

    crasher = tmp_path / "python"
    crasher.write_text("#!/bin/sh\nkill -SEGV $$\n")
    crasher.chmod(crasher.stat().st_mode | stat.S_IXUSR)
    paths = Paths(home=tmp_path, socket=tmp_path / "s")
    (tmp_path / "logs").mkdir()
    deployments = Deployments(paths, State(paths.db), Store(paths.models), python=str(crasher))
    with pytest.raises(DeployFailed, match="crashed ONNX Runtime"):
        asyncio.run(deployments.probe(str(tmp_path / "m.onnx"), "cpu"))


def test_a_full_disk_changes_nothing(mserve, affine_v1, tmp_path):
    mserve.json("deploy", affine_v1, "--name", "disk")
    mserve.ok("daemon", "stop")

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))

    daemon = subprocess.Popen([sys.executable, "-m", "mserve.daemon"], env=mserve.env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              preexec_fn=limit_file_size, start_new_session=True)
    try:
        wait_for(lambda: mserve.run("daemon", "status", "--json").stdout.count("true"),
                 what="daemon")
        err = mserve.fail("deploy", big_model(tmp_path / "big.onnx"), "--name", "disk")
        assert "no space left" in err and "nothing was changed" in err
        assert mserve.deployment("disk")["version"] == 1
        assert len(mserve.json("versions", "disk")) == 1
        assert not any(e.startswith(".tmp-") for e in store_entries(mserve))
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


def test_concurrent_deploys_are_serialized_per_name(mserve, tmp_path):
    paths = [models.affine(tmp_path / f"m{i}.onnx", scale=float(i + 1)) for i in range(4)]
    jobs = [("same", p) for p in paths[:3]] + [("other", paths[3]), ("third", paths[0])]
    mserve.ok("daemon", "start")
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: mserve.run("deploy", j[1], "--name", j[0], "--json"),
                                jobs))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert sorted(v["version"] for v in mserve.json("versions", "same")) == [1, 2, 3]
    ports = [d["port"] for d in mserve.json("list")]
    assert len(ports) == len(set(ports)) == 3


def test_a_worker_that_keeps_dying_is_shown_failed_then_comes_back(mserve, affine_v1):
    mserve.json("deploy", affine_v1, "--name", "flaky")
    client = DaemonClient(str(mserve.home / "mserve.sock"))
    seen = set()
    for crash in range(3):
        pid = wait_for(lambda: (d := client.deployment("flaky"))["status"] == "ready"
                       and d["pid"] not in seen and d["pid"], what="worker up")
        seen.add(pid)
        os.kill(pid, signal.SIGKILL)
    failed = wait_for(lambda: (d := client.deployment("flaky"))["status"] == "failed" and d,
                      timeout=10, what="failed status")
    assert "SIGKILL" in failed["error"]
    back = wait_for(lambda: (d := client.deployment("flaky"))["status"] == "ready" and d,
                    timeout=20, what="restart after backoff")
    assert back["restarts"] == 3 and back["error"] is None
    exits = [e for e in client.events("flaky") if e["action"] == "worker-exit"]
    assert len(exits) == 3
