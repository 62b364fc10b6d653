"""Tokens stay out of `ps` (issue 13, finding 12): every local user can read any process's
command line (/proc/PID/cmdline), so `--token-file` and `MSERVE_TOKEN` carry the token,
`--token` warns, and no process mserve starts holds the token or its hash in its argv."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import CLI, wait_for

pytestmark = pytest.mark.e2e
WARNING = ("Warning: --token is visible to other local users in ps; use --token-file or "
           "MSERVE_TOKEN\n")
BODY = json.dumps({"x": [[1, 2, 3, 4]]})
NUL = b"\0"


def new_token() -> str:
    return "tok-" + secrets.token_hex(12)


def token_file(folder: Path, token: str, name: str = "token") -> Path:
    path = folder / name
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def argv_holding(*needles: str) -> list[str]:
    """Every process whose command line holds one of ``needles``, as 'PID: argv'."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read()
        except OSError:  # gone meanwhile
            continue
        if any(n.encode() in argv for n in needles):
            found.append(f"{entry.name}: {argv.replace(NUL, b' ').decode(errors='replace')}")
    return found


def scan_while(proc: subprocess.Popen, *needles: str) -> list[str]:
    """Scan every process's argv for ``needles`` until ``proc`` exits; what was seen."""
    seen = []
    while proc.poll() is None:
        seen += argv_holding(*needles)
    return seen + argv_holding(*needles)


def model_status(d: dict, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{d['url']}/v2/models/{d['name']}", headers=headers).status_code


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_a_token_file_stays_out_of_every_command_line(shared, affine_v1, tmp_path):
    token = new_token()
    digest = hashlib.sha256(token.encode()).hexdigest()
    deploy = subprocess.Popen(CLI + ["deploy", str(affine_v1), "--name", "tokfile", "--json",
                                     "--token-file", str(token_file(tmp_path, token))],
                              env=shared.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    assert scan_while(deploy, token, digest) == []  # the CLI, the daemon, its workers
    out, err = deploy.communicate()
    assert deploy.returncode == 0, err
    assert "Warning" not in err
    d = json.loads(out)["deployment"]
    assert model_status(d, None) == 401 and model_status(d, token) == 200
    (tmp_path / "input.json").write_text(BODY)
    predict = subprocess.Popen(CLI + ["predict", "tokfile", str(tmp_path / "input.json"),
                                      "--json", "--token-file", str(token_file(tmp_path, token))],
                               env=shared.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    assert scan_while(predict, token) == []
    out, err = predict.communicate()
    assert predict.returncode == 0, err
    assert json.loads(out)["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]
    assert argv_holding(token, digest) == []  # the worker serving it, now
    shared.fail("predict", "tokfile", "-", input=BODY)  # no token: refused
    shared.ok("undeploy", "tokfile")


def test_token_on_the_command_line_still_works_and_warns(shared, affine_v1):
    token = new_token()
    result = shared.ok("deploy", affine_v1, "--name", "tokarg", "--json", "--token", token)
    assert result.stderr == WARNING
    d = json.loads(result.stdout)["deployment"]
    assert model_status(d, None) == 401 and model_status(d, token) == 200
    result = shared.ok("predict", "tokarg", "-", "--json", "--token", token, input=BODY)
    assert result.stderr == WARNING
    assert json.loads(result.stdout)["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]
    shared.ok("undeploy", "tokarg")


def test_mserve_token_for_deploy_and_predict(shared, affine_v1, affine_v2, tmp_path):
    token = new_token()
    env = {"MSERVE_TOKEN": token}
    result = shared.ok("deploy", affine_v1, "--name", "tokenv", "--json", env=env)
    assert "Warning" not in result.stderr
    d = json.loads(result.stdout)["deployment"]
    assert model_status(d, None) == 401 and model_status(d, token) == 200
    result = shared.ok("predict", "tokenv", "-", "--json", input=BODY, env=env)
    assert "Warning" not in result.stderr
    assert json.loads(result.stdout)["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]
    shared.fail("predict", "tokenv", "-", input=BODY, env={"MSERVE_TOKEN": "wrong"})
    # --token-file wins over MSERVE_TOKEN; '-' reads the token from stdin
    rotated = new_token()
    shared.ok("deploy", affine_v2, "--name", "tokenv", "--token-file", "-",
              input=rotated + "\n", env=env)
    assert model_status(d, token) == 401 and model_status(d, rotated) == 200
    shared.ok("predict", "tokenv", "-", "--token-file", token_file(tmp_path, rotated),
              input=BODY, env=env)
    shared.ok("undeploy", "tokenv")


COMMANDS = {"deploy": ["deploy", "model.onnx"], "predict": ["predict", "recs", "in.json"],
            "serve": ["serve", "model.onnx", "--host", "127.0.0.1"]}


@pytest.mark.parametrize("command", COMMANDS)
def test_token_usage_errors(mserve, tmp_path, command):
    """Checked before anything else happens: no daemon starts, no model is read."""
    args = COMMANDS[command]
    env = {"MSERVE_NO_AUTOSTART": "1"}
    good = token_file(tmp_path, "t")
    err = mserve.fail(*args, "--token", "t", "--token-file", good, code=2, env=env)
    assert err == "Error: use --token or --token-file, not both\n"
    assert mserve.fail(*args, "--token", "", code=2, env=env) == "Error: --token is empty\n"
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    assert mserve.fail(*args, "--token-file", empty, code=2, env=env) == \
        f"Error: the token file '{empty}' is empty\n"
    two = tmp_path / "two"
    two.write_text("a\nb\n")
    assert "more than one line" in mserve.fail(*args, "--token-file", two, code=2, env=env)
    missing = tmp_path / "missing"
    assert mserve.fail(*args, "--token-file", missing, code=1, env=env) == \
        f"Error: cannot read token file '{missing}': No such file or directory\n"
    assert mserve.fail(*args, code=2, env={**env, "MSERVE_TOKEN": " "}) == \
        "Error: MSERVE_TOKEN is empty\n"
    assert mserve.daemon_pid() is None


def test_predict_cannot_read_both_token_and_input_from_stdin(mserve):
    err = mserve.fail("predict", "recs", "--token-file", "-", code=2, input=BODY,
                      env={"MSERVE_NO_AUTOSTART": "1"})
    assert "--token-file - would read stdin, which holds the input" in err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_serve_with_a_token_file(affine_v1, tmp_path):
    """`mserve serve` runs the worker in its own process: its argv is the user's, no more."""
    token = new_token()
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(CLI + ["serve", str(affine_v1), "--host", "127.0.0.1",
                                       "--port", str(port), "--grpc-port", "0", "--token-file",
                                       str(token_file(tmp_path, token))],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=60, what="mserve serve ready")
        d = {"url": url, "name": "affine"}
        assert model_status(d, None) == 401 and model_status(d, token) == 200
        digest = hashlib.sha256(token.encode()).hexdigest()
        assert argv_holding(token, digest) == []
        assert "Warning" not in log.read_text()
    finally:
        proc.kill()
        proc.wait()
