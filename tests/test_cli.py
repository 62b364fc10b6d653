"""The CLI as a user meets it: help, usage errors, plain errors, light start-up."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests import models
from tests.conftest import CLI

COMMANDS = ["deploy", "list", "versions", "predict", "rollback", "undeploy", "daemon"]


def test_help_lists_every_command():
    out = subprocess.run(CLI + ["--help"], capture_output=True, text=True).stdout
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("command", COMMANDS + ["daemon start", "daemon stop", "daemon status",
                                                "daemon run", "daemon logs"])
def test_every_command_has_help(command):
    result = subprocess.run(CLI + command.split() + ["--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "Usage" in result.stdout


def test_version():
    from importlib.metadata import version

    out = subprocess.run(CLI + ["--version"], capture_output=True, text=True).stdout
    assert out.strip() == f"mserve {version('mserve')}"


@pytest.mark.parametrize("args, says", [
    (["deploy"], "Missing argument"), (["list", "--bogus"], "No such option: --bogus"),
    (["deploy", "x.onnx", "--port", "notaport"], "'--port'"),
    (["deploy", "x.onnx", "--port", "99999"], "'--port'"),
    (["deploy", "x.onnx", "--batching", "maybe"], "'--batching'"),
    (["daemon", "bogus"], "No such command 'bogus'")])
def test_usage_errors_exit_2_with_one_error_line(args, says):
    """SPEC: errors go to stderr as one line starting 'Error:' (plus an optional hint line):
    Click's own usage errors too, not Typer's box with a usage line."""
    result = subprocess.run(CLI + args, capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0].startswith("Error: ") and says in lines[0], result.stderr
    assert len(lines) == 2 and lines[1].startswith("Hint: see 'mserve"), result.stderr


def test_no_command_prints_the_help_and_exits_2():
    result = subprocess.run(CLI, capture_output=True, text=True)
    assert result.returncode == 2 and "Usage" in result.stdout and "deploy" in result.stdout
    assert result.stdout.count("Usage") == 1


HEAVY = ("numpy", "onnxruntime", "uvicorn", "rich", "starlette", "httpx", "grpc",
         "google.protobuf", "yaml", "pydantic")


def test_list_imports_nothing_heavy(shared, affine_v1):
    """`mserve list` must start fast: the real entry point (which builds only the command
    run) imports none of the heavy libraries, and neither does any command module."""
    shared.json("deploy", affine_v1, "--name", "light")
    code = (
        "import sys\n"
        "from mserve.cli.main import COMMANDS, run\n"
        "sys.argv = ['mserve', 'list', '--json']\n"
        "try:\n"
        "    run()\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(repr([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)\n"
        "import importlib\n"
        "for module, _, _ in COMMANDS.values():\n"
        "    importlib.import_module('mserve.cli.commands.' + module)\n"
        f"print(repr([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=shared.env)
    assert [d["name"] for d in json.loads(result.stdout)] == ["light"]
    assert result.stderr.strip().splitlines()[-2:] == ["[]", "[]"], result.stderr
    shared.ok("undeploy", "light")


@pytest.mark.e2e
@pytest.mark.parametrize("args, words", [
    (["versions", "nosuch"], "deployment 'nosuch' not found"),
    (["rollback", "nosuch"], "deployment 'nosuch' not found"),
    (["undeploy", "nosuch"], "deployment 'nosuch' not found"),
    (["predict", "nosuch", "-"], "deployment 'nosuch' not found"),
    (["deploy", "/no/such/model.onnx", "--name", "x"], "does not exist"),
    (["deploy", "{tmp}", "--name", "x"], "has no model.onnx"),
    (["deploy", "{model}", "--name", "../x"], "invalid deployment name"),
    (["deploy", "{model}", "--name", "has space"], "invalid deployment name"),
    (["deploy", "{model}", "--name", "x" * 200], "invalid deployment name"),
])
def test_user_mistakes_are_one_line_errors(shared, affine_v1, tmp_path, args, words):
    args = [a.format(tmp=tmp_path, model=affine_v1) for a in args]
    code = 2 if "invalid deployment name" in words else 1  # bad usage exits 2
    err = shared.fail(*args, input='{"x": [[1, 2, 3, 4]]}', code=code)
    assert err.startswith("Error: ") and words in err, err


@pytest.mark.e2e
def test_predict_input_mistakes(shared, affine_v1, tmp_path):
    shared.json("deploy", affine_v1, "--name", "inputs")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "not valid JSON" in shared.fail("predict", "inputs", bad)
    assert "cannot read input file" in shared.fail("predict", "inputs", tmp_path / "none.json")
    assert "unknown input 'q'" in shared.fail("predict", "inputs", "-", input='{"q": [[1]]}')
    err = shared.fail("predict", "inputs", "-", input='{"x": [[1, 2]]}')
    assert "dimension 1 must be 4" in err
    assert "no previous version" in shared.fail("rollback", "inputs")
    assert "version 5 of 'inputs' not found" in shared.fail("rollback", "inputs", "--to", "5")
    shared.ok("undeploy", "inputs")


def test_a_plain_mapping_may_name_an_input_inputs(shared, model_dir):
    """{"inputs": [[...]]} for a model whose input is named "inputs" is a plain mapping
    (it was taken for an OIP request: 'inputs[0] must be an object, got an array')."""
    shared.json("deploy", models.keras_style(model_dir / "keras.onnx"), "--name", "keras")
    try:
        for flag in ([], ["--grpc"]):
            answer = shared.json("predict", "keras", "-", *flag,
                                 input='{"inputs": [[1, 2, 3, 4]]}')
            assert answer["outputs"][0]["data"] == [2.0, 4.0, 6.0, 8.0], answer
        oip = {"inputs": [{"name": "inputs", "datatype": "FP32", "shape": [1, 4],
                           "data": [1, 1, 1, 1]}]}
        assert shared.json("predict", "keras", "-", input=json.dumps(oip))["outputs"][0][
            "data"] == [2.0] * 4
    finally:
        shared.ok("undeploy", "keras")


@pytest.mark.e2e
@pytest.mark.parametrize("option, what", [("--port", "port"), ("--grpc-port", "gRPC port")])
def test_busy_port_is_a_clean_error(shared, affine_v1, option, what):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        err = shared.fail("deploy", affine_v1, "--name", "porty", option, port)
    assert f"{what} {port} is already in use" in err
    assert all(d["name"] != "porty" for d in shared.json("list"))
