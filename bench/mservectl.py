"""mserve as its users drive it: the project venv's ``mserve`` CLI with ``MSERVE_HOME`` set to
a fresh short temp dir (the control socket path must stay short), timed from outside."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parent.parent
BIN = Path(os.environ.get("MSERVE_BIN") or ROOT / ".venv" / "bin")  # another venv's (GPU)
MSERVE = BIN / "mserve"


class MserveError(RuntimeError):
    """An mserve command failed."""


class Mserve:
    """One private mserve installation (its own home, daemon and workers)."""

    def __init__(self) -> None:
        if not MSERVE.exists():
            raise MserveError(f"{MSERVE} is missing: run `make install` first")
        self.home = Path(tempfile.mkdtemp(prefix="msb-", dir="/tmp"))
        self.env = {**os.environ, "MSERVE_HOME": str(self.home)}

    def cli(self, *args: str, timeout: float = 180) -> tuple[object, float]:
        """Run ``mserve ARGS --json``; (parsed stdout, wall seconds)."""
        start = time.perf_counter()
        done = subprocess.run([str(MSERVE), *args, "--json"], check=False, env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise MserveError(f"`mserve {' '.join(args)}` exited {done.returncode}: "
                              f"{done.stderr.strip()[-600:]}")
        return json.loads(done.stdout), seconds

    def deploy(self, model: Path, name: str) -> tuple[dict, float]:
        """Deploy ``model`` as ``name``; (deploy JSON, wall seconds until it returned ready)."""
        return self.cli("deploy", str(model), "--name", name)

    def rollback(self, name: str) -> tuple[dict, float]:
        """Roll ``name`` back to its previous version; (rollback JSON, wall seconds)."""
        return self.cli("rollback", name)

    def deployment(self, name: str) -> dict:
        """``name``'s element of ``mserve list --json``."""
        rows, _ = self.cli("list")
        for row in rows:
            if row["name"] == name:
                return row
        raise MserveError(f"no deployment {name!r} in `mserve list`")

    def rss_mb(self, name: str) -> float:
        """Resident memory (VmRSS) of ``name``'s worker process, in MB (10^6 bytes)."""
        pid = self.deployment(name)["pid"]
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
        raise MserveError(f"no VmRSS for worker pid {pid}")

    def close(self, logdir: Path) -> None:
        """``mserve daemon stop``, keep the logs under ``logdir``, delete the home."""
        try:
            self.cli("daemon", "stop", timeout=120)
        finally:
            if (self.home / "logs").is_dir():
                shutil.rmtree(logdir, ignore_errors=True)
                shutil.copytree(self.home / "logs", logdir)
            shutil.rmtree(self.home, ignore_errors=True)


def _wall(cmd: list[str], env: dict) -> float:
    """Wall seconds of one run of ``cmd`` (which must succeed)."""
    start = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def cli_startup(mserve: Mserve, runs: int = 20) -> dict:
    """Median wall time of ``mserve list --json`` (daemon running) and of
    ``python -c "import typer"``, ``runs`` each, alternated."""
    listing = [str(MSERVE), "list", "--json"]
    typer = [str(BIN / "python"), "-c", "import typer"]
    _wall(listing, mserve.env), _wall(typer, mserve.env)  # warm the page cache
    times: dict[str, list[float]] = {"list": [], "typer": []}
    for _ in range(runs):
        times["list"].append(_wall(listing, mserve.env))
        times["typer"].append(_wall(typer, mserve.env))
    result = {key: statistics.median(values) for key, values in times.items()}
    result["ratio"] = result["list"] / result["typer"]
    result["runs"] = runs
    return result


def log_problems(logdir: Path) -> dict[str, str]:
    """Per mserve log file, its first line that reports a crash or an error (none: absent)."""
    signs = ("Traceback", "Fatal Python error", " ERROR ", "Segmentation fault")
    found = {}
    for log in sorted(logdir.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if any(sign in line for sign in signs):
                found[log.name] = line.strip()[:160]
                break
    return found
