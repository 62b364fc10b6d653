"""Canaries, traffic splits, stickiness, promotion, labels and retention through the real
daemon and workers."""

from __future__ import annotations

import math
import os
import signal
import threading
from collections import Counter

import httpx
import pytest

from tests import models
from tests.conftest import wait_for

pytestmark = pytest.mark.e2e
BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]}]}


@pytest.fixture(scope="module")
def versions(model_dir):
    """Seven models: version i multiplies by i."""
    return [models.affine(model_dir / f"r{i}" / "m.onnx", scale=float(i)) for i in range(1, 8)]


def served_by(client: httpx.Client, url: str, headers=None) -> str:
    r = client.post(url, json=BODY, headers=headers)
    assert r.status_code == 200, r.text
    version = r.json()["model_version"]
    assert r.headers["x-model-version"] == version
    assert r.json()["outputs"][0]["data"] == [float(version)] * 4  # the right model answered
    return version


def test_a_90_10_split_is_honoured(shared, versions):
    shared.json("deploy", versions[0], "--name", "split")
    d = shared.json("deploy", versions[1], "--name", "split", "--canary", "10")["deployment"]
    assert d["version"] == 1
    url = d["url"] + "/v2/models/split/infer"
    n = 2000
    with httpx.Client() as c:
        counts = Counter(served_by(c, url) for _ in range(n))
    # Binomial 99.9% interval for the canary's share: n p ± 3.29 sqrt(n p (1 - p)).
    low, high = (n * 0.1 + s * 3.29 * math.sqrt(n * 0.1 * 0.9) for s in (-1, 1))
    assert low <= counts["2"] <= high, counts
    assert counts["1"] + counts["2"] == n
    shown = shared.json("traffic", "split")
    assert [(s["version"], s["percent"]) for s in shown["split"]] == [(1, 90), (2, 10)]
    assert shown["split"][1]["requests"] == counts["2"]
    states = {v["version"]: v["state"] for v in shared.json("versions", "split")}
    assert states == {1: "active", 2: "canary"}
    shared.ok("undeploy", "split")


def test_a_canary_deployed_again_is_no_new_version(shared, versions):
    """CI runs `deploy new.onnx --canary 10` on every push: the same bytes again are the
    same canary (it made versions 3, 4, 5 of one sha256), another share moves its split."""
    shared.json("deploy", versions[0], "--name", "again")
    first = shared.json("deploy", versions[1], "--name", "again", "--canary", "10")
    assert first["changed"] and first["version"] == 2
    again = shared.json("deploy", versions[1], "--name", "again", "--canary", "10")
    assert not again["changed"] and again["version"] == 2, again
    assert "nothing changed" in shared.ok("deploy", versions[1], "--name", "again",
                                          "--canary", "10").stdout.lower()
    moved = shared.json("deploy", versions[1], "--name", "again", "--canary", "30")
    assert moved["changed"] and moved["version"] == 2, moved
    split = shared.json("traffic", "again")["split"]
    assert [(s["version"], s["percent"]) for s in split] == [(1, 70), (2, 30)]
    assert [v["version"] for v in shared.json("versions", "again")] == [1, 2]
    # new bytes as a canary are a new version, as before
    third = shared.json("deploy", versions[2], "--name", "again", "--canary", "10")
    assert third["changed"] and third["version"] == 3
    shared.ok("undeploy", "again")


def test_sticky_header_keeps_each_user_on_one_version_until_turned_off(shared, versions):
    shared.json("deploy", versions[0], "--name", "sticky")
    shared.json("deploy", versions[1], "--name", "sticky", "--canary", "50",
                "--sticky-header", "X-User-ID")
    url = shared.deployment("sticky")["url"] + "/v2/models/sticky/infer"
    seen = {}
    with httpx.Client() as c:
        for _ in range(4):
            for user in range(40):
                version = served_by(c, url, {"X-User-ID": f"user-{user}"})
                assert seen.setdefault(user, version) == version
    assert set(seen.values()) == {"1", "2"}
    # '' turns stickiness off: one user's requests now follow the 50/50 split
    answer = shared.json("traffic", "sticky", "--sticky-header", "")
    assert answer["sticky_header"] is None
    assert shared.json("traffic", "sticky")["sticky_header"] is None
    with httpx.Client() as c:
        versions_seen = {served_by(c, url, {"X-User-ID": "user-1"}) for _ in range(40)}
    assert versions_seen == {"1", "2"}  # all 40 on one version: 2 in 2**40
    shared.ok("undeploy", "sticky")


def test_split_changes_promotion_and_rollback_under_load_fail_nothing(mserve, versions):
    mserve.json("deploy", versions[0], "--name", "live")
    url = mserve.deployment("live")["url"] + "/v2/models/live/infer"
    stop, lock = threading.Event(), threading.Lock()
    outcomes: Counter = Counter()

    def client():
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                try:
                    key = served_by(c, url)
                except (AssertionError, httpx.HTTPError) as exc:
                    key = f"FAILED {exc!r}"[:200]
                with lock:
                    outcomes[key] += 1

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        mserve.json("deploy", versions[1], "--name", "live", "--canary", "20")
        mserve.json("traffic", "live", "1=50", "2=50")
        assert mserve.json("rollback", "live")["canary_stopped"] is True
        mserve.json("deploy", versions[2], "--name", "live", "--canary", "30")
        mserve.json("promote", "live")
        mserve.json("traffic", "live", "1=10", "3=90")
        mserve.json("promote", "live", "1")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not [k for k in outcomes if k.startswith("FAILED")], outcomes
    assert {"1", "2", "3"} <= set(outcomes) and sum(outcomes.values()) > 50
    actions = [e["action"] for e in mserve.json("history", "live")]
    assert actions == ["deploy", "deploy-canary", "traffic", "rollback", "deploy-canary",
                       "promote", "traffic", "promote"]


def test_split_and_labels_survive_kill_9(mserve, versions):
    for path in versions[:3]:
        mserve.json("deploy", path, "--name", "keep")
    mserve.json("traffic", "keep", "3=70", "1=30")
    mserve.json("label", "keep", "stable", "2")
    os.kill(mserve.daemon_pid(), signal.SIGKILL)
    wait_for(lambda: mserve.daemon_pid() is None, what="daemon death")
    shown = mserve.json("traffic", "keep")  # a new daemon, restored from SQLite
    assert [(s["version"], s["percent"]) for s in shown["split"]] == [(1, 30), (3, 70)]
    url = mserve.deployment("keep")["url"]
    with httpx.Client() as c:
        assert served_by(c, url + "/v2/models/keep/labels/stable/infer") == "2"
        assert {served_by(c, url + "/v2/models/keep/infer") for _ in range(60)} == {"1", "3"}
        r = c.post(url + "/v1/models/keep/labels/stable:predict", json={"instances": [[1] * 4]})
        assert r.json()["predictions"] == [[2.0] * 4]
        assert c.get(url + "/v2/models/keep/labels/nope").status_code == 404


def test_retention_prunes_old_artifacts_but_never_protected_ones(mserve, versions):
    for path in versions[:3]:
        mserve.json("deploy", path, "--name", "old", "--keep", "3")
    mserve.json("label", "old", "golden", "1")
    answer = None
    for path in versions[3:6]:
        answer = mserve.json("deploy", path, "--name", "old")
    assert answer["pruned"] == [4]
    rows = {v["version"]: v for v in mserve.json("versions", "old")}
    assert rows[1]["on_disk"] and rows[1]["loaded"]  # labelled: protected
    assert [n for n, v in rows.items() if v["state"] == "pruned"] == [2, 3, 4]
    assert not any(rows[n]["on_disk"] for n in (2, 3, 4))
    assert rows[6]["state"] == "active" and rows[5]["state"] == "standby"
    assert "pruned" in mserve.fail("rollback", "old", "--to", "3")
    mserve.json("deploy", versions[6], "--name", "other")
    mserve.ok("undeploy", "other")
    freed = mserve.json("prune")
    assert len(freed["removed"]) == 1 and freed["freed_bytes"] > 0
    assert mserve.json("prune")["removed"] == []


@pytest.mark.parametrize("args, words, code", [
    (["traffic", "bad", "1=50", "2=40"], "add up to 100", 1),
    (["traffic", "bad", "1=50", "9=50"], "version 9 of 'bad' not found", 1),
    (["traffic", "bad", "x=100"], "VERSION=PERCENT", 2),
    (["promote", "bad"], "no canary", 1),
    (["label", "bad", "Stable", "1"], "invalid label", 2),
    (["label", "bad", "stable"], "--delete", 2),
])
def test_rollout_mistakes_are_clear_errors(shared, versions, args, words, code):
    if not any(d["name"] == "bad" for d in shared.json("list")):
        shared.json("deploy", versions[0], "--name", "bad")
        shared.json("deploy", versions[1], "--name", "bad")
    assert words in shared.fail(*args, code=code)  # 2: bad usage
