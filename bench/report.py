"""The results as Markdown: the matrix with ratios to the FastAPI baseline, the targets with
PASS/MISS, the machine; and docs/benchmarks.md, whose results section is replaced."""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from loadgen import BUSY

DOC = Path(__file__).parent.parent / "docs" / "benchmarks.md"
MARKER = "<!-- Everything below is written by bench/run.py: edit the intro above only. -->"
BASELINE = "fastapi"
LABELS = {
    "inproc": "in-process `session.run`",
    "fastapi": "FastAPI + uvicorn (baseline)",
    "kserve": "KServe ModelServer",
    "mserve-json": "mserve, JSON",
    "mserve-bin": "mserve, binary tensors",
    "mserve-grpc": "mserve, gRPC (raw tensors; h2load)",
    "grpc-floor": "gRPC floor: bare grpc.aio, fixed answer, no model (h2load)",
}
INTRO = """# Benchmarks

How fast mserve serves a model compared with what a user would otherwise run, measured by
`bench/run.py` (`make bench`). Method:

- **Same machine, same run.** Every contender serves the same ONNX models (built by
  `bench/models.py` from fixed seeds) on 127.0.0.1 with the same ONNX Runtime version, and
  answers the same Open Inference Protocol request, `POST /v2/models/NAME/infer` with one
  `[1, F]` FP32 row; each answer is checked against numpy once before the load starts. The
  load generator (`wrk`, closed loop, keep-alive connections) runs on the same machine as the
  server: **client and server share the machine's cores** (2 on the reference machine), so
  req/s is what the pair achieves together, not what a server alone could do.
- **Ratios are against the baseline measured in the same run**: a FastAPI + uvicorn +
  onnxruntime server written the way a typical user writes one (`bench/fastapi_server.py`:
  pydantic request model, numpy, `session.run`, FastAPI's default JSON response, one uvicorn
  worker, default settings, so its access log is on; uvloop and httptools are installed, so
  uvicorn uses them, as mserve does). req/s ratio = contender / baseline (higher is better);
  latency ratio = contender / baseline (lower is better).
- KServe: `kserve.ModelServer` (one worker, gRPC off, defaults otherwise, so its per-request
  latency log line is on) serving a `kserve.Model` whose `predict` goes InferRequest -> numpy
  -> `session.run` -> InferResponse (`bench/kserve_server.py`). FastAPI and KServe run in their
  own venv, `bench/.venv`, with the project venv's onnxruntime and numpy versions.
- mserve is deployed through its own CLI (`mserve deploy`, default options) in a fresh
  `MSERVE_HOME`, and measured with JSON tensors and with Triton's binary tensor extension.
- gRPC (issue 7): mserve's gRPC service with raw tensors, driven by `h2load` (nghttp2's HTTP/2
  load generator, in C; Debian package nghttp2-client, installed by the harness when missing;
  `bench/grpc_load.py`). A unary gRPC call is an HTTP/2 POST with a length-prefixed protobuf
  body, which h2load sends on each stream (`-c C -m 1`: one connection per concurrent call,
  closed loop, like wrk); ghz itself does not install from this machine's registries. h2load
  sees HTTP statuses only, so one call is first checked with a real gRPC client against numpy,
  and the server's own failure counter is read before and after each run and added to the
  row's errors.
- gRPC floor: `bench/grpc_floor.py`, a bare `grpc.aio` server (uvloop, like mserve's worker)
  whose ModelInfer returns a fixed, pre-serialized answer: no model, no parsing, no batching,
  no accounting, under the same h2load. It shows what grpcio's asyncio server costs per call
  on this machine: no Python gRPC service built on it can answer faster.
- For each model every server is up; for each concurrency `c` (keep-alive connections) the
  contenders run back to back, each with a warm-up run then a measured run. wrk uses 1 thread
  at c=1 and 2 threads otherwise.
- The in-process row is `session.run` in a Python loop with no network: the physical limit
  for one thread. It is measured once (single thread) and shown at c=1 only (n/a at c≥32).
- **Noise from other processes.** During each measured run the harness accounts the CPU used
  by every process other than wrk, itself and the server under test. Each run first waits (up
  to 30 s) for a quiet machine; a run during which other processes used more than 20 % of the
  CPUs is repeated (up to twice) and the quietest kept; one still busy is flagged **⚠ busy
  machine** in the table, and its figures and ratios are not to be trusted.
"""


@dataclass
class Row:
    """One cell of the matrix. ``rps`` is None when the contender did not run (``note``)."""

    model: str
    conc: int
    contender: str
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0
    error_text: str = "0"
    note: str = ""
    background: float | None = None  # other processes' CPU share during the run (loadgen)

    def busy(self) -> bool:
        """True when other processes used more than BUSY of the CPUs during this cell."""
        return self.background is not None and self.background > BUSY


def fmt_ms(ms: float | None) -> str:
    """0.4123 -> '0.412 ms', 12.34 -> '12.3 ms'."""
    if ms is None or math.isnan(ms):
        return "n/a"
    return f"{ms:.3g} ms" if ms < 100 else f"{ms:.0f} ms"


def fmt_ratio(value: float | None, base: float | None) -> str:
    """value / base as '4.12×', or 'n/a'."""
    if value is None or not base or math.isnan(value) or math.isnan(base):
        return "n/a"
    ratio = value / base
    return f"{ratio:.3f}×" if ratio < 0.1 else f"{ratio:.2f}×"


def baseline(rows: list[Row], row: Row) -> Row | None:
    """The FastAPI row of the same model and concurrency, if it ran."""
    for other in rows:
        if (other.model, other.conc, other.contender) == (row.model, row.conc, BASELINE):
            return other if other.rps is not None else None
    return None


def table(rows: list[Row]) -> str:
    """The matrix as a Markdown table."""
    lines = ["| model | c | contender | req/s | × base | p50 | × base | p99 | × base | errors |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        label = LABELS[row.contender]
        if row.rps is None:
            lines.append(f"| {row.model} | {row.conc} | {label} | {row.note} "
                         "| | | | | | |")
            continue
        base = baseline(rows, row) or Row(row.model, row.conc, BASELINE)
        errors = row.error_text if not row.errors else f"**⚠ {row.error_text}**"
        errors = "–" if row.contender == "inproc" else errors
        if row.busy():
            errors += f" · **⚠ busy machine ({row.background:.0%} CPU)**"
        lines.append(
            f"| {row.model} | {row.conc} | {label} | {row.rps:,.0f} | {fmt_ratio(row.rps, base.rps)}"
            f" | {fmt_ms(row.p50_ms)} | {fmt_ratio(row.p50_ms, base.p50_ms)}"
            f" | {fmt_ms(row.p99_ms)} | {fmt_ratio(row.p99_ms, base.p99_ms)} | {errors} |")
    return "\n".join(lines)


def machine() -> str:
    """CPU model, logical CPUs, memory and OS, from /proc."""
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    cpus = len(os.sched_getaffinity(0))
    return (f"{cpu}, {cpus} logical CPUs (nproc), {mem_kb / 1024 ** 2:.1f} GiB RAM, "
            f"{platform.system()} {platform.release()}")


def write_doc(body: str) -> None:
    """Replace everything after MARKER in docs/benchmarks.md (keep the intro) with ``body``."""
    intro = INTRO
    if DOC.exists() and MARKER in DOC.read_text():
        intro = DOC.read_text().split(MARKER, 1)[0].rstrip("\n") + "\n"
    DOC.write_text(f"{intro}\n{MARKER}\n\n{body.rstrip()}\n")
