"""The load generator: wrk (found on PATH, or installed with apt when running as root), driven
by post.lua, and a parser for its ``--latency`` report."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from payloads import Body

LUA = Path(__file__).with_name("post.lua")
BUSY = 0.2  # other processes' share of the CPUs above which a measurement is flagged
UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


class LoadgenError(RuntimeError):
    """wrk is missing and cannot be installed, or a wrk run failed."""


@dataclass
class WrkResult:
    """One measured wrk run. Latencies in milliseconds."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        """Non-2xx/3xx responses plus socket errors (connect, read, write, timeout)."""
        return self.non2xx + sum(self.socket_errors.values())

    def error_text(self) -> str:
        """'0', or what went wrong, e.g. 'non-2xx 12, timeout 3'."""
        parts = [f"non-2xx {self.non2xx}"] if self.non2xx else []
        parts += [f"{kind} {n}" for kind, n in self.socket_errors.items() if n]
        return ", ".join(parts) or "0"


def ensure_wrk() -> str:
    """Path of wrk; installs the Debian package when missing and running as root."""
    return shutil.which("wrk") or apt_install("wrk", "wrk")


def apt_install(package: str, binary: str) -> str:
    """Install Debian ``package`` (as root, with apt-get) and return the path of ``binary``."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise LoadgenError(f"{binary} is not on PATH: install it (Debian/Ubuntu: "
                           f"`sudo apt-get install -y {package}`) and run again")
    print(f"{binary} not found: apt-get update && apt-get install -y {package}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
        done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise LoadgenError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-500:]}")
    found = shutil.which(binary)
    if not found:
        raise LoadgenError(f"apt-get installed {package} but {binary} is still not on PATH")
    return found


def threads_for(connections: int) -> int:
    """1 wrk thread for one connection, 2 otherwise (the machine has 2 cores)."""
    return 1 if connections <= 1 else 2


def run_wrk(wrk: str, url: str, body: Body, connections: int, seconds: float) -> WrkResult:
    """POST ``body`` to ``url`` with ``connections`` keep-alive connections for ``seconds``."""
    cmd = [wrk, "--latency", "--timeout", "10s", "-t", str(threads_for(connections)),
           "-c", str(connections), "-d", f"{max(1, round(seconds))}s", "-s", str(LUA), url]
    env = {**os.environ, "BENCH_BODY": str(body.path), "BENCH_CONTENT_TYPE": body.content_type,
           "BENCH_HEADER_LEN": "" if body.header_len is None else str(body.header_len)}
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True,
                          timeout=seconds + 60)
    if done.returncode != 0:
        raise LoadgenError(f"wrk failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return parse_wrk(done.stdout)


def _latency_ms(text: str) -> float:
    """'412.00us' -> 0.412, '1.23ms' -> 1.23, '2.00s' -> 2000.0."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not match:
        raise LoadgenError(f"unreadable wrk latency {text!r}")
    return float(match.group(1)) * UNITS_MS[match.group(2)]


def parse_wrk(out: str) -> WrkResult:
    """Read req/s, the 50%/99% latency lines and the error counts from wrk's output."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.MULTILINE)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE)
    total = re.search(r"^\s+(\d+) requests in", out, re.MULTILINE)
    if not (rps and total):
        raise LoadgenError(f"unreadable wrk output:\n{out}")
    result = WrkResult(rps=float(rps.group(1)), requests=int(total.group(1)),
                       p50_ms=_latency_ms(p50.group(1)) if p50 else float("nan"),
                       p99_ms=_latency_ms(p99.group(1)) if p99 else float("nan"))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    result.non2xx = int(non2xx.group(1)) if non2xx else 0
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                        out)
    if sockets:
        kinds = ("connect", "read", "write", "timeout")
        result.socket_errors = dict(zip(kinds, map(int, sockets.groups())))
    return result


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs together, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime + stime jiffies) for every process, from /proc/PID/stat."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return table


def _tree_jiffies(roots: list[int]) -> int:
    """CPU jiffies used so far by the processes ``roots`` and all their descendants."""
    table = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [pid for pid in roots if pid in table]
    while todo:
        pid = todo.pop()
        total += table[pid][1]
        todo += children.get(pid, [])
    return total


class CpuWatch:
    """Measures, over a ``with`` block, the share of all CPUs used by processes other than
    this harness, its children (wrk) and the server ``pids`` (with their descendants)."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.foreign: float | None = None

    def _ours(self) -> int:
        tick = os.sysconf("SC_CLK_TCK")
        mine = os.times()
        own = (mine.user + mine.system + mine.children_user + mine.children_system) * tick
        return int(own) + _tree_jiffies(self.pids)

    def __enter__(self) -> CpuWatch:
        self.start = (*_cpu_times(), self._ours())
        return self

    def __exit__(self, *exc) -> None:
        busy, total, ours = (*_cpu_times(), self._ours())
        foreign = (busy - self.start[0]) - (ours - self.start[2])
        self.foreign = max(0.0, foreign / max(1, total - self.start[1]))


def background_load(seconds: float = 0.5) -> float:
    """Share (0..1) of all CPUs busy during ``seconds`` while this harness sits idle."""
    busy0, total0 = _cpu_times()
    time.sleep(seconds)
    busy1, total1 = _cpu_times()
    return (busy1 - busy0) / max(1, total1 - total0)


def wait_quiet(max_wait: float) -> float:
    """Sample the background load until it is under BUSY or ``max_wait`` seconds have passed;
    the last sample."""
    deadline = time.monotonic() + max_wait
    load = background_load()
    while load > BUSY and time.monotonic() < deadline:
        load = background_load()
    return load
