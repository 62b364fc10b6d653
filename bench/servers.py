"""The other contenders' side: bench/.venv (FastAPI, uvicorn, ONNX Runtime, numpy, kserve, kept
apart from the project's venv), server subprocesses with readiness polling, the in-process loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

BENCH = Path(__file__).parent
VENV = BENCH / ".venv"
PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".bench-requirements"


class ServerError(RuntimeError):
    """A contender could not be started or never became ready."""


@dataclass
class BenchVenv:
    """bench/.venv, and why kserve is unusable there (None when it installed)."""

    python: Path
    kserve_error: str | None


def project_pins() -> list[str]:
    """onnxruntime and numpy at the project venv's versions, so every contender runs the
    same ONNX Runtime (the project has onnxruntime-gpu on x86-64 Linux: same CPU kernels)."""
    pins = []
    for dist in ("onnxruntime-gpu", "onnxruntime"):
        try:
            pins.append(f"onnxruntime=={metadata.version(dist)}")
            break
        except metadata.PackageNotFoundError:
            continue
    pins.append(f"numpy=={metadata.version('numpy')}")
    return pins


def _pip(*packages: str, python: Path = PYTHON, timeout: float | None = None) -> str | None:
    """pip install into bench/.venv (or ``python``'s venv); None on success, else the tail of
    pip's error."""
    cmd = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           *packages]
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"pip install did not finish in {timeout:.0f} s"
    if done.returncode == 0:
        return None
    lines = [line for line in done.stderr.splitlines() if not line.startswith("WARNING")]
    return " ".join(lines[-3:])[-400:] or f"pip exited {done.returncode}"


def ensure_venv() -> BenchVenv:
    """Create bench/.venv if needed and install the contenders' packages (once per set)."""
    base = ["fastapi", "uvicorn", *project_pins()]
    wanted = hashlib.sha256(json.dumps([base, "kserve"]).encode()).hexdigest()
    if PYTHON.exists() and STAMP.exists() and STAMP.read_text() == wanted:
        return BenchVenv(PYTHON, None)
    if not PYTHON.exists():
        print(f"creating {VENV.relative_to(BENCH.parent)} (contenders' packages) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    print(f"installing {' '.join(base)} kserve into bench/.venv ...", flush=True)
    error = _pip(*base)
    if error:
        raise ServerError(f"cannot install the baseline's packages into bench/.venv: {error}")
    kserve_error = _pip("kserve", *base)
    if kserve_error is None:
        STAMP.write_text(wanted)
    return BenchVenv(PYTHON, kserve_error and f"kserve did not install: {kserve_error}")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_ok(url: str) -> bool:
    """True when GET ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float, log: Path) -> float:
    """Poll ``url`` until it answers 200; seconds waited. Fails early if ``proc`` exits."""
    start = time.perf_counter()
    while not http_ok(url):
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"exited with {proc.returncode} before ready; "
                              f"log {log}: {_tail(log)}")
        if time.perf_counter() - start > timeout:
            raise ServerError(f"not ready after {timeout:.0f}s ({url}); log {log}: {_tail(log)}")
        time.sleep(0.05)
    return time.perf_counter() - start


def _tail(log: Path, chars: int = 600) -> str:
    """The end of a log file, on one line."""
    try:
        return " | ".join(log.read_text(errors="replace")[-chars:].splitlines())
    except OSError:
        return "(no log)"


class Server:
    """A contender server script from bench/ run by bench/.venv's python; a context manager
    that starts it, waits for ``ready_path`` and always kills its whole process group."""

    def __init__(self, script: str, model: Path, name: str, ready_path: str, logdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [str(PYTHON), str(BENCH / script), str(model), name, str(self.port)]
        self.ready_url = self.url + ready_path.format(name=name)
        self.log = logdir / f"{Path(script).stem}-{name}.log"
        self.proc: subprocess.Popen | None = None
        self.env: dict[str, str] | None = None  # the server's environment (None: ours)
        self.timeout = 120.0  # seconds to wait for ready_url

    def __enter__(self) -> Server:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env=self.env)
        try:
            wait_ready(self.ready_url, self.proc, timeout=self.timeout, log=self.log)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it after 10 s; returns once no process
        of the group is left (Triton's tritonserver and stubs outlive the PyTriton process)."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(wait)
                if _group_gone(self.proc.pid, wait):
                    return
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                return


def _group_gone(pgid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for process group ``pgid`` to have no process left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def run_inprocess(model: Path, features: int, seconds: float, warmup: float) -> dict:
    """bench/inprocess.py's result: calls, rps, p50_ms, p99_ms."""
    cmd = [str(PYTHON), str(BENCH / "inprocess.py"), str(model), str(features),
           str(seconds), str(warmup)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=seconds + warmup + 120)
    if done.returncode != 0:
        raise ServerError(f"inprocess.py failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def versions(python: Path) -> dict[str, str]:
    """Python and package versions inside bench/.venv."""
    code = ("import json, sys; from importlib import metadata as m\n"
            "v = {'python': sys.version.split()[0]}\n"
            "for d in ('onnxruntime', 'numpy', 'fastapi', 'uvicorn', 'pydantic', 'kserve'):\n"
            "    try: v[d] = m.version(d)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(v))")
    done = subprocess.run([str(python), "-c", code], check=False, capture_output=True,
                          text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {}
