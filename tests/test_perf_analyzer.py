"""Triton's perf_analyzer drives a live deployment for a few seconds over HTTP and gRPC, through
bench/perf_analyzer.py, and measures throughput on both. `make test` installs perf_analyzer
into .venv-pa first when it can be downloaded (`make perf-analyzer-tools`); this test skips,
saying why, only when it could not be."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import models

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "perf_analyzer.py"
_spec = importlib.util.spec_from_file_location("bench_perf_analyzer", SCRIPT)
pa = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pa)


def _why_not() -> str | None:
    exe = pa.binary()
    if exe is None:
        return (f"perf_analyzer is not installed in {pa.VENV.name}/: run `make perf-analyzer` "
                "(it installs tritonclient 2.45.0's bin/perf_analyzer there)")
    if missing := pa.missing_libraries(exe):
        return f"perf_analyzer cannot load {', '.join(missing)}"
    return None


WHY_NOT = _why_not()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))]
ROW = re.compile(r"^\| (?P<model>\S+) \| (?P<protocol>http|grpc) \| (?P<conc>\d+) \| "
                 r"(?P<rate>[\d,.]+) \|", re.M)


@pytest.fixture(scope="module")
def deployed(shared, model_dir):
    d = shared.json("deploy", models.affine(model_dir / "pa.onnx", scale=3.0), "--name",
                    "paffine")["deployment"]
    assert d["batching"]["enabled"], d["batching"]  # so its config has every dim fixed
    yield d
    shared.run("undeploy", "paffine")


def test_perf_analyzer_measures_a_deployment_over_http_and_grpc(deployed):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", "paffine",
         "--http-url", deployed["url"].split("://", 1)[1], "--grpc-url", deployed["grpc_url"],
         "--concurrency", "1:8:7", "--interval-ms", "500",
         "--", "--stability-percentage", "100", "--max-trials", "6"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Perf Analyzer Version 2.45" in done.stdout
    measured = {(m["protocol"], int(m["conc"])): float(m["rate"].replace(",", ""))
                for m in ROW.finditer(done.stdout)}
    assert set(measured) == {("http", 1), ("http", 8), ("grpc", 1), ("grpc", 8)}, done.stdout
    assert all(rate > 0 for rate in measured.values()), done.stdout
