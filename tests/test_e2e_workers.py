"""``--workers N``: one deployment served by N processes sharing its HTTP and gRPC ports,
through the real daemon: both serve, a switch under load fails nothing and reaches every
process, a load refused by one process leaves all on the old version, figures are the
deployment's whichever process answers, a killed process comes back alone, a restarted
daemon adopts them all, and the count follows a redeploy."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
from collections import Counter

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as tpb

from tests import models
from tests.conftest import _alive, wait_for

pytestmark = pytest.mark.e2e
ROW = [1.0, 2.0, 3.0, 4.0]
BODY = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                               "data": ROW}]})


def fresh_infer(port: int, name: str) -> tuple[int, dict, str | None]:
    """One request on a new connection (the kernel picks the process): status, answer and
    X-Model-Version."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", f"/v2/models/{name}/infer", BODY,
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read()), response.getheader("X-Model-Version")
    finally:
        conn.close()


def fresh_get(port: int, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200, (path, response.status)
        return response.read().decode()
    finally:
        conn.close()


def counted(text: str) -> int:
    """Successful inference requests in a /metrics exposition."""
    return int(sum(s.value for family in text_string_to_metric_families(text)
                   for s in family.samples
                   if s.name == "mserve_requests_total" and s.labels["outcome"] == "success"))


def live(mserve, name: str) -> dict:
    return mserve.json("status", name)["live"]


class Load(threading.Thread):
    """Requests until stopped, each on a new connection, so every process gets some."""

    def __init__(self, port: int, name: str):
        super().__init__(daemon=True)
        self.port, self.name = port, name
        self.outcomes: Counter = Counter()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                status, answer, version = fresh_infer(self.port, self.name)
                self.outcomes[(status, version)] += 1
            except OSError as exc:
                self.outcomes[type(exc).__name__] += 1

    def stop(self) -> Counter:
        self.done.set()
        self.join(timeout=15)
        return self.outcomes


def test_two_processes_serve_one_deployment_and_figures_are_the_deployments(mserve, affine_v1):
    d = mserve.json("deploy", affine_v1, "--name", "pair", "--workers", "2")["deployment"]
    assert d["workers"] == 2 and len(set(d["pids"])) == 2 and all(map(_alive, d["pids"]))
    for _ in range(120):
        status, answer, version = fresh_infer(d["port"], "pair")
        assert status == 200 and version == "1"
        assert answer["outputs"][0]["data"] == ROW  # scale 1, bias 0
    processes = live(mserve, "pair")["processes"]
    assert sorted(p["pid"] for p in processes) == sorted(d["pids"])
    assert all(p["requests_1m"] > 0 for p in processes), processes  # both served
    assert sum(p["requests_1m"] for p in processes) == 120
    # gRPC shares its port the same way.
    request = tpb.ModelInferRequest(model_name="pair")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.array([ROW], dtype=np.float32).tobytes())
    for _ in range(10):
        with grpc.insecure_channel(d["grpc_url"]) as channel:
            raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(
                request.SerializeToString(), timeout=10)
        answer = tpb.ModelInferResponse.FromString(raw)
        assert np.frombuffer(answer.raw_output_contents[0], dtype=np.float32).tolist() == ROW
    # Whichever process a scrape reaches, it counts every process's requests.
    for _ in range(8):
        assert counted(fresh_get(d["port"], "/metrics")) == 130
        stats = json.loads(fresh_get(d["port"], "/v2/models/pair/stats"))["model_stats"][0]
        assert stats["inference_stats"]["success"]["count"] == 130, stats
    # One request log for the deployment, with lines from both processes.
    log = mserve.home / "logs" / "pair.requests.jsonl"
    wait_for(lambda: len(log.read_text().splitlines()) >= 130, what="the request log")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    writers = {line["id"].split("-")[0] for line in lines}
    assert writers == {f"{pid:x}" for pid in d["pids"]}, writers
    # and one worker log, each line saying which process wrote it
    worker_log = (mserve.home / "logs" / "pair.log").read_text()
    assert all(f"mserve.worker[{pid}]: " in worker_log for pid in d["pids"]), worker_log


def test_a_switch_under_load_fails_nothing_and_reaches_every_process(mserve, affine_v1,
                                                                    tmp_path):
    d = mserve.json("deploy", affine_v1, "--name", "swap", "--workers", "2")["deployment"]
    loads = [Load(d["port"], "swap") for _ in range(3)]
    for load in loads:
        load.start()
    try:
        mserve.json("deploy", models.affine(tmp_path / "v2.onnx", scale=2.0), "--name", "swap")
        wait_for(lambda: sum(n for load in loads for (s, v), n in load.outcomes.items()
                             if v == "2") > 20, what="answers from version 2")
        mserve.json("rollback", "swap")
        mserve.json("rollback", "swap", "--to", "2")
    finally:
        outcomes = sum((load.stop() for load in loads), Counter())
    assert {status for status, _ in outcomes} == {200}, outcomes
    assert {version for _, version in outcomes} == {"1", "2"}, outcomes
    for _ in range(40):  # every process switched: no fresh connection finds version 1
        status, answer, version = fresh_infer(d["port"], "swap")
        assert (status, version) == (200, "2")
        assert answer["outputs"][0]["data"] == [2 * v for v in ROW]
    assert mserve.deployment("swap")["pids"] == d["pids"]  # switched in place


def test_a_load_refused_by_one_process_leaves_all_on_the_old_version(mserve, affine_v1,
                                                                    tmp_path):
    mserve.env["MSERVE_TEST_REFUSE"] = "load@1"  # process 1 refuses every later load
    d = mserve.json("deploy", affine_v1, "--name", "half", "--workers", "2")["deployment"]
    error = mserve.fail("deploy", models.affine(tmp_path / "v2.onnx", scale=2.0),
                        "--name", "half")
    assert "refused" in error, error
    for _ in range(40):
        assert fresh_infer(d["port"], "half")[2] == "1"
    after = mserve.deployment("half")
    assert after["version"] == 1 and after["pids"] == d["pids"]


def queued_then_killed(port: int, name: str, victim: int, count: int = 24) -> Counter:
    """Stop ``victim`` (one of the processes on ``port``), open ``count`` fresh connections
    (the kernel completes the handshake for a stopped process too, so about half wait in its
    queue), send a request on each, kill it; each request's outcome."""
    os.kill(victim, signal.SIGSTOP)
    connected = threading.Semaphore(0)
    outcomes: Counter = Counter()

    def one() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.connect()
            connected.release()
            conn.request("POST", f"/v2/models/{name}/infer", BODY,
                         {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            outcomes[(response.status, response.getheader("X-Model-Version"))] += 1
        except OSError as exc:
            outcomes[type(exc).__name__] += 1
        finally:
            conn.close()

    clients = [threading.Thread(target=one, daemon=True) for _ in range(count)]
    for client in clients:
        client.start()
    for _ in clients:
        assert connected.acquire(timeout=10)
    os.kill(victim, signal.SIGKILL)
    for client in clients:
        client.join(timeout=40)
    return outcomes


def test_connections_a_killed_process_had_not_read_are_served_by_its_sibling(mserve, affine_v1):
    """They were reset with it (10 of 24 measured); now the daemon hands them to the other."""
    d = mserve.json("deploy", affine_v1, "--name", "queue", "--workers", "2")["deployment"]
    survivor, victim = d["pids"]
    outcomes = queued_then_killed(d["port"], "queue", victim)
    assert outcomes == Counter({(200, "1"): 24}), outcomes
    back = wait_for(lambda: (x := mserve.deployment("queue"))["status"] == "ready"
                    and victim not in x["pids"] and None not in x["pids"] and x,
                    timeout=30, what="the killed process to come back")
    assert back["pids"][0] == survivor
    for _ in range(40):  # and its replacement holds its share of the port again
        assert fresh_infer(d["port"], "queue")[0] == 200
    assert all(p["requests_1m"] > 0 for p in live(mserve, "queue")["processes"])


def test_a_killed_process_comes_back_alone_while_the_other_serves(mserve, affine_v1):
    d = mserve.json("deploy", affine_v1, "--name", "kill", "--workers", "2")["deployment"]
    survivor, victim = d["pids"]
    load = Load(d["port"], "kill")
    load.start()
    try:
        wait_for(lambda: sum(load.outcomes.values()) > 20, what="traffic")
        os.kill(victim, signal.SIGKILL)
        back = wait_for(lambda: (x := mserve.deployment("kill"))["status"] == "ready"
                        and victim not in x["pids"] and None not in x["pids"] and x,
                        timeout=30, what="the killed process to come back")
        before = sum(load.outcomes.values())
        wait_for(lambda: sum(load.outcomes.values()) > before + 20, what="traffic after")
    finally:
        outcomes = load.stop()
    failed = {k: n for k, n in outcomes.items() if k != (200, "1")}
    assert sum(failed.values()) <= 1, outcomes  # at most the one in flight when it died
    assert back["pids"][0] == survivor and back["restarts"] == 1
    events = [e["action"] for e in mserve.json("history", "kill")]
    assert "worker-exit" in events and "restart" in events


def test_a_restarted_daemon_adopts_every_process(mserve, affine_v1):
    d = mserve.json("deploy", affine_v1, "--name", "adopt", "--workers", "2")["deployment"]
    os.kill(mserve.daemon_pid(), signal.SIGKILL)
    for _ in range(20):  # no daemon: both keep serving
        assert fresh_infer(d["port"], "adopt")[0] == 200
    after = wait_for(lambda: (x := mserve.deployment("adopt"))["status"] == "ready" and x,
                     timeout=30, what="a daemon")
    assert after["pids"] == d["pids"]
    fresh_infer(d["port"], "adopt")
    assert counted(fresh_get(d["port"], "/metrics")) == 21  # still asking each other


def test_the_count_follows_a_redeploy_of_the_same_bytes(mserve, affine_v1):
    d = mserve.json("deploy", affine_v1, "--name", "grow")["deployment"]
    assert d["workers"] == 1 and len(d["pids"]) == 1
    load = Load(d["port"], "grow")
    load.start()
    try:
        grown = mserve.json("deploy", affine_v1, "--name", "grow", "--workers", "3")
        assert grown["options_changed"] == ["workers"]
        pids = grown["deployment"]["pids"]
        assert len(set(pids)) == 3 and pids[0] == d["pids"][0]
        shrunk = mserve.json("deploy", affine_v1, "--name", "grow", "--workers", "2")
        assert shrunk["deployment"]["pids"] == pids[:2]
        wait_for(lambda: not _alive(pids[2]), what="the third process to leave")
    finally:
        outcomes = load.stop()
    assert set(outcomes) == {(200, "1")}, outcomes
    for _ in range(30):
        fresh_infer(d["port"], "grow")
    assert all(p["requests_1m"] > 0 for p in live(mserve, "grow")["processes"])


class Persistent(threading.Thread):
    """Back-to-back calls on one connection (an HTTP keep-alive connection, or a gRPC
    channel) until stopped: a process leaving the group must send such a client away
    without failing a call."""

    def __init__(self, d: dict, name: str, kind: str):
        super().__init__(daemon=True)
        self.d, self.name, self.kind = d, name, kind
        self.outcomes: Counter = Counter()
        self.done = threading.Event()

    def run(self) -> None:
        if self.kind == "grpc":
            import tritonclient.grpc as tg

            client = tg.InferenceServerClient(f"127.0.0.1:{self.d['grpc_port']}")
            x = tg.InferInput("x", [1, 4], "FP32")
            x.set_data_from_numpy(np.array([ROW], np.float32))
            call = lambda: client.infer(self.name, [x]).as_numpy("y") is not None  # noqa: E731
            close = client.close
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.d["port"], timeout=10)

            def call() -> bool:
                nonlocal conn
                conn.request("POST", f"/v2/models/{self.name}/infer", BODY)
                response = conn.getresponse()
                response.read()
                if response.getheader("Connection") == "close":  # told to go: a new one
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.d["port"], timeout=10)
                return response.status == 200

            def close() -> None:
                conn.close()
        try:
            while not self.done.is_set():
                try:
                    self.outcomes["ok" if call() else "refused"] += 1
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    self.outcomes[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
        finally:
            close()

    def stop(self) -> Counter:
        self.done.set()
        self.join(timeout=15)
        return self.outcomes


def test_leaving_the_group_fails_no_call_of_a_persistent_client(mserve, affine_v1):
    """Scaling 2 -> 1: the leaving process's keep-alive HTTP clients get Connection: close
    on an answer instead of a reset, and its gRPC clients a GOAWAY in two steps with every
    call they had sent served; before, calls got UNAVAILABLE 'shutting down' (17 in a run)
    and keep-alive clients 'disconnected without sending a response'."""
    d = mserve.json("deploy", affine_v1, "--name", "leave", "--workers", "2")["deployment"]
    clients = [Persistent(d, "leave", kind) for kind in ("http", "http", "grpc", "grpc",
                                                          "grpc", "grpc")]
    for client in clients:
        client.start()
    try:
        wait_for(lambda: all(c.outcomes["ok"] > 10 for c in clients), what="calls")
        shrunk = mserve.json("deploy", affine_v1, "--name", "leave", "--workers", "1")
        gone = d["pids"][1]
        assert shrunk["deployment"]["pids"] == d["pids"][:1]
        wait_for(lambda: not _alive(gone), what="the second process to leave")
        counts = [sum(c.outcomes.values()) for c in clients]
        wait_for(lambda: all(sum(c.outcomes.values()) > n + 10
                             for c, n in zip(clients, counts)), what="calls afterwards")
    finally:
        outcomes = [client.stop() for client in clients]
    http_failed = sum((o for o in outcomes[:2]), Counter())
    grpc_failed = sum((o for o in outcomes[2:]), Counter())
    assert set(http_failed) == {"ok"}, http_failed
    assert not any("shutting down" in k for k in grpc_failed), grpc_failed
    # one call may still meet a connection the kernel queued just as the listener closed
    assert sum(n for k, n in grpc_failed.items() if k != "ok") <= 1, grpc_failed


@pytest.mark.parametrize("value", ["0", "-1", "lots", "1.5", "257"])
def test_a_bad_count_is_bad_usage(mserve, affine_v1, value):
    error = mserve.fail("deploy", affine_v1, "--name", "bad", "--workers", value, code=2)
    assert "--workers must be auto or a whole number from 1 to 256" in error, error


def test_splits_labels_and_tokens_reach_every_process(mserve, affine_v1, tmp_path):
    """A canary's split, a label and a token set on a deployment of two processes hold on
    every connection, whichever process the kernel gives it."""
    d = mserve.json("deploy", affine_v1, "--name", "rules", "--workers", "2",
                    "--token", "s3cret")["deployment"]
    mserve.json("deploy", models.affine(tmp_path / "v2.onnx", scale=2.0), "--name", "rules",
                "--canary", "50")
    mserve.json("label", "rules", "stable", "1")
    seen: Counter = Counter()
    for _ in range(80):
        conn = http.client.HTTPConnection("127.0.0.1", d["port"], timeout=10)
        conn.request("POST", "/v2/models/rules/infer", BODY, {"Authorization": "Bearer s3cret"})
        response = conn.getresponse()
        response.read()
        seen[(response.status, response.getheader("X-Model-Version"))] += 1
        conn.close()
        assert fresh_infer(d["port"], "rules")[0] == 401  # no token: refused by either
        conn = http.client.HTTPConnection("127.0.0.1", d["port"], timeout=10)
        conn.request("POST", "/v2/models/rules/labels/stable/infer", BODY,
                     {"Authorization": "Bearer s3cret"})
        response = conn.getresponse()
        response.read()
        assert (response.status, response.getheader("X-Model-Version")) == (200, "1")
        conn.close()
    assert set(seen) == {(200, "1"), (200, "2")} and min(seen.values()) > 15, seen
    mserve.json("deploy", affine_v1, "--name", "rules", "--token", "n3w")  # a new token
    for _ in range(40):
        for token, status in (("s3cret", 401), ("n3w", 200)):
            conn = http.client.HTTPConnection("127.0.0.1", d["port"], timeout=10)
            conn.request("POST", "/v2/models/rules/labels/stable/infer", BODY,
                         {"Authorization": f"Bearer {token}"})
            assert conn.getresponse().status == status, token
            conn.close()
