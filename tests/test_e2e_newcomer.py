"""Issue 13, "from a newcomer's pass": bad usage exits 2, promoting the active version
changes nothing, a failed deploy names the user's file, and the daemon log tells the story."""

from __future__ import annotations

import os
import signal

import pytest

from tests.conftest import wait_for

pytestmark = pytest.mark.e2e


def _usage(stderr: str) -> None:
    assert stderr.startswith("Error: "), stderr


def test_bad_usage_exits_2_before_reaching_the_daemon(shared, affine_v1):
    shared.json("deploy", affine_v1, "--name", "usage")
    _usage(stderr := shared.fail("deploy", affine_v1, "--name", "Bad Name", code=2))
    assert "invalid deployment name 'Bad Name'" in stderr
    _usage(shared.fail("deploy", affine_v1, "--name", "-x", code=2))
    _usage(stderr := shared.fail("label", "usage", "Bad!", "1", code=2))
    assert "invalid label 'Bad!'" in stderr
    _usage(shared.fail("label", "usage", "9lives", "--delete", code=2))
    _usage(shared.fail("label", "usage", "stable", code=2))  # neither VERSION nor --delete
    _usage(stderr := shared.fail("logs", "usage", "--since", "yesterday", code=2))
    assert "--since 'yesterday'" in stderr
    _usage(shared.fail("logs", "--since", "10", code=2))
    _usage(shared.fail("traffic", "usage", "1:100", code=2))
    assert "version 1 is named twice" in shared.fail("traffic", "usage", "1=50", "01=50", code=2)
    assert shared.json("label", "usage", "stable", "1")["labels"] == {"stable": 1}
    shared.ok("logs", "usage", "--since", "10m")
    shared.ok("undeploy", "usage")


@pytest.mark.parametrize("variable, value, says", [
    ("MSERVE_START_TIMEOUT", "abc", "MSERVE_START_TIMEOUT must be a number, got 'abc'"),
    ("MSERVE_LOAD_TIMEOUT", "abc", "MSERVE_LOAD_TIMEOUT must be a number, got 'abc'"),
    ("MSERVE_DRAIN_TIMEOUT", "1s", "MSERVE_DRAIN_TIMEOUT must be a number, got '1s'"),
    ("MSERVE_HEALTH_FAILURES", "0", "MSERVE_HEALTH_FAILURES must be at least 1, got '0'")])
def test_a_bad_number_in_the_environment_is_named_not_a_traceback(tmp_path, variable, value,
                                                                   says):
    """SPEC: no traceback for a user error. A bad MSERVE_START_TIMEOUT was a traceback from
    the CLI's import, a bad MSERVE_LOAD_TIMEOUT an 'internal error in the daemon' at the
    first deploy, a bad MSERVE_DRAIN_TIMEOUT a daemon dead of a ValueError."""
    from tests.conftest import Mserve

    fresh = Mserve(tmp_path / "home")
    try:
        result = fresh.run("list", env={variable: value})
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("Error: ") and says in result.stderr, result.stderr
        # and no daemon was left running: the CLI's own setting is read before it spawns
        # one (a daemon was started, then left running past the test), and a daemon that
        # reads a bad one of its own ends before it is ready
        log = fresh.home / "logs" / "daemon.log"
        if variable == "MSERVE_START_TIMEOUT":
            assert not log.exists(), log.read_text()
        else:
            assert "daemon ready" not in log.read_text() and says in log.read_text()
        assert fresh.daemon_pid() is None
    finally:
        fresh.cleanup()


def test_what_a_deploy_or_rollback_did_is_what_it_says(shared, affine_v1, affine_v2):
    """Options changed on the same bytes said 'Deployed words version 1'; a rollback that
    stopped a canary said 'Rolled back words to version 1 (was 1)'."""
    shared.ok("deploy", affine_v1, "--name", "words")
    said = shared.ok("deploy", affine_v1, "--name", "words", "--max-queue", "77").stdout
    assert said.startswith("words stays at version 1; changed: max_queue"), said
    shared.ok("deploy", affine_v2, "--name", "words", "--canary", "10")
    said = shared.ok("deploy", affine_v2, "--name", "words", "--canary", "10").stdout
    assert said.startswith("words is already at canary version 2 with identical bytes"), said
    said = shared.ok("deploy", affine_v2, "--name", "words", "--canary", "30").stdout
    assert said.startswith("words: canary version 2 now takes 30% of traffic"), said
    said = shared.ok("rollback", "words").stdout
    assert said.startswith("Canary of words stopped: all traffic to version 1"), said
    shared.ok("undeploy", "words")


def test_bad_usage_starts_no_daemon(tmp_path, affine_v1):
    from tests.conftest import Mserve

    fresh = Mserve(tmp_path / "home")
    try:
        spaced = tmp_path / "my model.onnx"  # a name from it would be invalid: exit 2 too
        spaced.write_bytes(affine_v1.read_bytes())
        for args in (["deploy", affine_v1, "--name", "Bad Name"],
                     ["label", "x", "Bad!", "1"], ["logs", "x", "--since", "soon"],
                     ["deploy", spaced]):
            _usage(fresh.fail(*args, code=2))
        assert "choose one with --name" in fresh.fail("deploy", spaced, code=2)
        assert fresh.daemon_pid() is None and not (tmp_path / "home" / "state.db").exists()
    finally:
        fresh.cleanup()


def test_promoting_the_active_version_changes_nothing(shared, affine_v1, affine_v2):
    shared.json("deploy", affine_v1, "--name", "promo")
    shared.json("deploy", affine_v2, "--name", "promo")
    before = {v["version"]: v["state"] for v in shared.json("versions", "promo")}
    assert before == {1: "standby", 2: "active"}
    answer = shared.json("promote", "promo", "2")
    assert answer["changed"] is False and answer["version"] == 2
    assert "Nothing changed" in shared.ok("promote", "promo", "2").stdout
    rows = shared.json("versions", "promo")
    assert {v["version"]: v["state"] for v in rows} == before
    assert {v["version"]: v["loaded"] for v in rows} == {1: True, 2: True}
    assert shared.json("rollback", "promo")["version"] == 1  # the standby, still
    shared.ok("undeploy", "promo")


def test_promoting_the_active_version_during_a_canary_ends_it_and_keeps_the_standby(
        shared, affine_v1, affine_v2, model_dir):
    from tests import models

    v3 = models.affine(model_dir / "newcomer-v3" / "m.onnx", scale=3.0)
    shared.json("deploy", affine_v1, "--name", "promoc")
    shared.json("deploy", affine_v2, "--name", "promoc")
    shared.json("deploy", v3, "--name", "promoc", "--canary", "10")
    answer = shared.json("promote", "promoc", "2")
    assert answer["changed"] is True and answer["version"] == 2
    states = {v["version"]: v["state"] for v in shared.json("versions", "promoc")}
    assert states == {1: "standby", 2: "active", 3: "retired"}
    assert shared.json("traffic", "promoc")["split"][0]["percent"] == 100
    assert shared.json("rollback", "promoc")["version"] == 1
    shared.ok("undeploy", "promoc")


def test_a_failed_deploy_names_the_users_file(shared, affine_v1, model_dir):
    junk = model_dir / "newcomer" / "junk.onnx"
    junk.parent.mkdir(parents=True, exist_ok=True)
    junk.write_bytes(b"this is not an onnx model\n" * 10)
    # a first deploy (loaded by the worker)
    stderr = shared.fail("deploy", junk, "--name", "junkfirst")
    assert "'junk.onnx' is not a valid ONNX model" in stderr, stderr
    assert "model.onnx" not in stderr and "models/" not in stderr, stderr
    # a new version (loaded by the validation child)
    shared.json("deploy", affine_v1, "--name", "junknext")
    stderr = shared.fail("deploy", junk, "--name", "junknext")
    assert "'junk.onnx' is not a valid ONNX model" in stderr, stderr
    assert "model.onnx" not in stderr and "models/" not in stderr, stderr
    failed = [v for v in shared.json("versions", "junknext") if v["state"] == "failed"]
    assert len(failed) == 1 and "'junk.onnx'" in failed[0]["error"], failed
    assert shared.deployment("junknext")["version"] == 1
    shared.ok("undeploy", "junknext")


def test_the_daemon_log_tells_deploys_failures_changes_and_restarts(mserve, affine_v1,
                                                                    affine_v2, model_dir):
    junk = model_dir / "newcomer-log" / "junk.onnx"
    junk.parent.mkdir(parents=True, exist_ok=True)
    junk.write_bytes(b"garbage")
    first = mserve.json("deploy", affine_v1, "--name", "logged")
    second = mserve.json("deploy", affine_v2, "--name", "logged")
    mserve.fail("deploy", junk, "--name", "logged")
    mserve.json("rollback", "logged")
    mserve.json("promote", "logged", "2")
    mserve.json("traffic", "logged", "1=50", "2=50")
    mserve.json("label", "logged", "stable", "1")
    pid = mserve.deployment("logged")["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: (x := mserve.deployment("logged"))["status"] == "ready"
             and x["pid"] not in (None, pid), timeout=30, what="worker restart")
    log_path = mserve.home / "logs" / "daemon.log"
    text = wait_for(lambda: "restarted logged" in (t := log_path.read_text()) and t,
                    what="the restart line")
    out = mserve.ok("daemon", "logs").stdout + text
    lines = out.splitlines()

    def has(*parts: str) -> bool:
        return any(all(p in line for p in parts) for line in lines)

    assert has("INFO", "deployed logged version 1", first["sha256"][:12], str(affine_v1)), out
    assert has("INFO", "deployed logged version 2", second["sha256"][:12], str(affine_v2)), out
    assert has("deploy of logged failed", "'junk.onnx'", str(junk)), out
    assert has("rollback logged", "version 1 active", "was 2"), out
    assert has("promote logged", "version 2 active", "was 1"), out
    assert has("traffic logged", "1=50 2=50"), out
    assert has("label logged", "stable -> 1"), out
    assert has("worker of logged", f"pid {pid}", "exited", "SIGKILL"), out
    assert has("INFO", "restarted logged", "version 2", "SIGKILL"), out
    assert not has("restored logged")  # the daemon itself never restarted
