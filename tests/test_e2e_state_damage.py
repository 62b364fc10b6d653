"""A damaged state.db through the real daemon: refused with one clear line (nothing touched),
restored from the automatic backup, never a reason for prune to delete models; and a full
disk, on which the daemon starts read-only and serves what it has."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys

import httpx
import pytest

from tests.conftest import wait_for

pytestmark = pytest.mark.e2e
ROWS = [[1.0, 2.0, 3.0, 4.0]]


def snapshot(home) -> dict[str, int]:
    """Every file under the model store and every state.db file, with its size."""
    found = {}
    for root, _, names in os.walk(home / "models"):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, home)] = os.path.getsize(path)
    for name in ("state.db", "state.db-wal"):
        if (home / name).exists():
            found[name] = (home / name).stat().st_size
    return found


def infer(url: str, name: str) -> dict:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": ROWS[0]}]}
    r = httpx.post(f"{url}/v2/models/{name}/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def kill_daemon(m) -> None:
    os.kill(m.daemon_pid(), signal.SIGKILL)
    wait_for(lambda: m.daemon_pid() is None, what="daemon to die")


def refused(m, *args: str) -> str:
    """The command fails with one clean line; no daemon is left running (one that a
    surviving worker starts is refused the same way)."""
    err = m.fail(*args)
    assert err.startswith("Error: ") and "Traceback" not in err, err
    wait_for(lambda: m.daemon_pid() is None, timeout=30, what="no daemon")
    return err


@pytest.mark.parametrize("damage", ["empty", "garbage"])
def test_a_damaged_state_db_is_refused_and_nothing_is_touched(mserve, affine_v1, damage):
    mserve.json("deploy", affine_v1, "--name", "recs")
    mserve.ok("daemon", "stop")
    db = mserve.home / "state.db"
    db.write_bytes(b"" if damage == "empty" else os.urandom(8192))
    before = snapshot(mserve.home)

    err = refused(mserve, "daemon", "start")
    assert f"{db} is damaged" in err
    assert ("empty (0 bytes)" if damage == "empty" else "not a SQLite database") in err
    assert "changed nothing" in err and "there is no backup" in err
    assert refused(mserve, "list").count("is damaged") == 1  # autostart says the same
    assert snapshot(mserve.home) == before  # the store and the file are as they were


def test_a_garbled_wal_is_refused_then_restored_from_the_backup(mserve, affine_v1, affine_v2):
    mserve.env["MSERVE_NO_AUTOSTART"] = "1"  # no worker left by kill -9 starts a daemon itself
    mserve.ok("daemon", "start")
    mserve.json("deploy", affine_v1, "--name", "recs")
    mserve.ok("daemon", "stop")
    mserve.ok("daemon", "start")  # backs the state up before writing to it
    assert len(list((mserve.home / "backups").glob("state-*.db"))) == 1
    assert mserve.json("deploy", affine_v2, "--name", "recs")["version"] == 2
    kill_daemon(mserve)
    wal = mserve.home / "state.db-wal"
    with open(wal, "r+b") as f:  # the first frame's page: later commits would be lost
        f.seek(32 + 24 + 64)
        f.write(b"\xff" * 64)
    before = snapshot(mserve.home)

    err = refused(mserve, "daemon", "start")
    assert "frame 1 of its write-ahead log state.db-wal is damaged" in err
    assert "mserve daemon start --restore-backup" in err and "(1 deployment)" in err
    assert snapshot(mserve.home) == before

    garbled = wal.read_bytes()
    out = mserve.ok("daemon", "start", "--restore-backup").stdout
    assert "Restored" in out and "(1 deployment)" in out and "Daemon started" in out
    assert "1 model in the store is not in this backup" in out  # v2's, deployed after it
    [d] = mserve.json("list")
    assert (d["name"], d["version"], d["status"]) == ("recs", 1, "ready")
    assert infer(d["url"], "recs")["model_version"] == "1"
    [aside] = (mserve.home / "backups").glob("replaced-*")
    assert (aside / "state.db-wal").read_bytes() == garbled  # kept aside as it was


def test_prune_deletes_nothing_when_the_state_looks_reset(mserve, affine_v1):
    mserve.json("deploy", affine_v1, "--name", "recs")
    mserve.ok("daemon", "stop")
    for name in ("state.db", "state.db-wal", "state.db-shm"):  # lost, or moved aside
        (mserve.home / name).unlink(missing_ok=True)
    assert mserve.json("list") == []
    before = snapshot(mserve.home)

    err = mserve.fail("prune")
    assert "refusing to prune" in err and "no version and no event" in err
    assert "no model was deleted" in err
    assert snapshot(mserve.home) == before


def test_a_full_disk_starts_read_only_and_serves(mserve, affine_v1, affine_v2, tmp_path):
    mserve.json("deploy", affine_v1, "--name", "recs")
    mserve.json("deploy", affine_v2, "--name", "recs")
    mserve.ok("daemon", "stop")

    def almost_no_space():  # below SQLite's 32 KiB -shm file: as good as a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (32_767, 32_767))

    log = tmp_path / "daemon.err"
    with open(log, "w") as out:
        daemon = subprocess.Popen([sys.executable, "-m", "mserve.daemon"], env=mserve.env,
                                  stdout=out, stderr=out, preexec_fn=almost_no_space,
                                  start_new_session=True)
    try:
        wait_for(lambda: daemon.poll() is not None
                 or mserve.run("daemon", "status", "--json").stdout.count("true"),
                 timeout=60, what="daemon")
        assert daemon.poll() is None, log.read_text()
        assert "opening" in log.read_text() and "read-only" in log.read_text()
        d = wait_for(lambda: (x := mserve.deployment("recs"))["status"] == "ready" and x,
                     timeout=60, what="recs ready")
        assert d["version"] == 2
        assert infer(d["url"], "recs")["model_version"] == "2"
        plain = tmp_path / "in.json"
        plain.write_text(json.dumps({"x": ROWS}))
        assert mserve.json("predict", "recs", plain)["model_version"] == "2"

        for change in (["rollback", "recs"], ["undeploy", "recs"],
                       ["deploy", affine_v1, "--name", "other"]):
            err = mserve.fail(*change)
            assert "the disk is full" in err and "cannot record changes" in err, err
        assert mserve.deployment("recs")["version"] == 2
        assert infer(d["url"], "recs")["model_version"] == "2"
        assert mserve.json("prune")["removed"] == []  # reading and freeing space still work
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)

    [d] = mserve.json("list")  # with space again: everything as it was, writable
    assert (d["version"], d["versions"]) == (2, 2)
    assert mserve.json("rollback", "recs")["version"] == 1
