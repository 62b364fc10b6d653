"""The results as Markdown: the matrix with ratios to the FastAPI baseline, the targets with
PASS/MISS, the machine; and docs/benchmarks.md, whose results section is replaced."""

from __future__ import annotations

import math
import os
import platform
import statistics
from dataclasses import dataclass, field
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
    "triton-json": "Triton (PyTriton), JSON",
    "triton-bin": "Triton (PyTriton), binary tensors",
    "triton-grpc": "Triton (PyTriton), gRPC (raw tensors; h2load)",
    "mlserver-json": "MLServer, JSON",
    "mlserver-grpc": "MLServer, gRPC (raw tensors in; h2load)",
}
# The peer row each mserve row is compared with (same transport), for "× Triton", "× MLServer".
PEER_OF = {"mserve-json": ("triton-json", "mlserver-json"), "mserve-bin": ("triton-bin", None),
           "mserve-grpc": ("triton-grpc", "mlserver-grpc")}
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
  latency ratio = contender / baseline (lower is better). mserve's rows are also compared
  with the real peers below (`× Triton`, `× MLServer`: mserve's req/s over the peer's on the
  same transport; MLServer has no binary tensor extension, so `mserve, binary` has none).
- KServe: `kserve.ModelServer` (one worker, gRPC off, defaults otherwise, so its per-request
  latency log line is on) serving a `kserve.Model` whose `predict` goes InferRequest -> numpy
  -> `session.run` -> InferResponse (`bench/kserve_server.py`). FastAPI and KServe run in their
  own venv, `bench/.venv`, with the project venv's onnxruntime and numpy versions.
- **NVIDIA Triton through PyTriton** (`nvidia-pytriton`, in `bench/.venv-triton`): PyTriton
  starts the `tritonserver` it bundles (Triton's C++ HTTP and gRPC front ends, dynamic
  batcher and Prometheus metrics) and binds a Python function to it through Triton's Python
  backend: a `triton_python_backend_stub` process per model instance hands each batch over
  ZeroMQ to the PyTriton process, where a `@batch` function runs the same ONNX Runtime
  session (`bench/triton_server.py`). Settings, as PyTriton's docs recommend for production:
  `ModelConfig(batching=True, max_batch_size=64,
  batcher=DynamicBatcher(max_queue_delay_microseconds=100))`, one model instance, defaults
  otherwise. Measured with the same JSON body and the same binary-tensor body as mserve
  (wrk), and over gRPC (`inference.GRPCInferenceService/ModelInfer`, raw tensors, h2load as
  below; errors include Triton's `nv_inference_request_failure` except reason
  `CANCELED`, the calls h2load resets when its run ends, which mserve counts apart too).
  **Triton's native ONNX Runtime backend is not measured: it does not install here.** The
  PyTriton wheel's tritonserver carries the Python backend alone, and the ONNX Runtime
  backend is not on PyPI (NVIDIA ships it in its Triton containers, or it is built from
  source); so this is Triton's C++ front ends and batcher with a Python model, not
  Triton's C++ ONNX Runtime path. PyTriton 0.7 requires numpy < 2, so its venv has numpy
  1.26 (onnxruntime at the project's version).
  The Python backend stub links libpython: the harness points `LD_LIBRARY_PATH` at the venv
  interpreter's own library folder so the stub does not load another Python's.
- **Seldon MLServer** (`mlserver` 1.7, with `uvloop<0.22`, in `bench/.venv-mlserver`): a
  custom runtime, an `MLModel` whose `predict` decodes the request with MLServer's
  `NumpyCodec`, runs the same ONNX Runtime session and encodes the answer
  (`bench/mlserver_runtime.py`), started with `mlserver start` on a folder the harness writes.
  Adaptive batching on, as its docs recommend (`max_batch_size: 64`, `max_batch_time:
  0.0001` s in model-settings.json, the same 100 µs window as Triton's), and
  `parallel_workers` = one inference worker process per core (2 here), as its production
  docs advise; defaults otherwise. Measured over HTTP JSON (wrk) and gRPC (h2load, raw
  tensors in; MLServer answers with typed contents, which the gRPC check accepts).
- The peers are installed lazily, once per set of requirements (a stamp in each venv, as for
  `bench/.venv`); a peer that cannot install (the failure is recorded and not retried until
  its requirements change or its venv is deleted) or start is reported as n/a in the table
  with the reason, and the rest of the bench runs. Each peer's exact settings are printed
  under the table. `--only` names their rows like the others (`triton-json`, `triton-bin`,
  `triton-grpc`, `mlserver-json`, `mlserver-grpc`; `triton`, `mlserver`: all of a peer's).
- mserve is deployed through its own CLI (`mserve deploy`, default options) in a fresh
  `MSERVE_HOME`, and measured with JSON tensors and with Triton's binary tensor extension.
- gRPC (issue 7): gRPC services with raw tensors, driven by `h2load` (nghttp2's HTTP/2
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
- **Interleaved rounds.** For each model every server is up; for each concurrency `c`
  (keep-alive connections) the harness makes `--rounds` rounds (default 3; `--quick` 1), and
  in each round every contender runs once, back to back (the order rotated from one round to
  the next), each with a warm-up run then a measured run; so slow drifts of the machine hit
  every contender alike. The table shows req/s, p50 and p99 as min–median–max over the
  rounds; each ratio is computed within a round (contender and reference measured minutes
  apart at most) and the median of the per-round ratios is shown. wrk uses 1 thread at c=1
  and 2 threads otherwise.
- **Cost per request.** `server CPU µs/req`: the utime + stime (`/proc/PID/stat`) of the
  server's whole process tree (every thread of the server process and of its descendants:
  Triton's PyTriton process, `tritonserver` and its Python backend stubs; MLServer's main
  process and inference workers; mserve's worker; uvicorn for FastAPI and KServe), read
  before and after the measured run, divided by the requests answered in it. The load
  generator's CPU is not included. `mean batch`: requests per model run over the measured
  run, where the server reports it: mserve's `mserve_batch_size` histogram (sum / count
  delta, docs/metrics.md), Triton's `nv_inference_count` / `nv_inference_exec_count`
  (its Prometheus port), MLServer's successful requests (`model_infer_request_success`)
  / batches handed to its workers (`parallel_request_queue` observations); n/a for FastAPI,
  KServe and the floor. ONNX Runtime's intra-op thread pool spins while it waits for work
  (its default, kept for every contender), so on a server that is not saturated (c=1
  especially) this figure includes that spin, not only work done for the requests.
- The in-process row is `session.run` in a Python loop with no network: the physical limit
  for one thread. It is measured at c=1 once per round (single thread) and shown at c=1 only
  (n/a at c≥32).
- **Noise from other processes.** During each measured run the harness accounts the CPU used
  by every process other than wrk, itself and the server under test. Each run first waits (up
  to 30 s) for a quiet machine; a run during which other processes used more than 20 % of the
  CPUs is repeated (up to twice) and the quietest kept; a cell with a round still busy is
  flagged **⚠ busy machine** in the table, and its figures and ratios are not to be trusted.
  (The peers' servers stay up, idle, while the other contenders of their model run.)
"""


@dataclass
class Round:
    """One measured run of a cell (one round)."""

    rps: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int = 0
    error_text: str = "0"
    background: float | None = None  # other processes' CPU share during the run (loadgen)
    cpu_us: float | None = None  # server CPU per request (cost.py)
    batch: float | None = None  # mean requests per model run, where the server reports it


@dataclass
class Row:
    """One cell of the matrix: its rounds, and their medians in ``rps``, ``p50_ms``, ...
    ``rps`` is None when the contender did not run (``note``)."""

    model: str
    conc: int
    contender: str
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0
    error_text: str = "0"
    note: str = ""
    background: float | None = None  # the busiest round's foreign CPU share
    cpu_us: float | None = None
    batch: float | None = None
    rounds: list[Round] = field(default_factory=list)

    def add(self, run: Round) -> None:
        """Record one round; the row's figures become the medians over its rounds (errors
        summed, background the busiest round's)."""
        self.rounds.append(run)
        self.rps = _median([r.rps for r in self.rounds])
        self.p50_ms = _median([r.p50_ms for r in self.rounds])
        self.p99_ms = _median([r.p99_ms for r in self.rounds])
        self.cpu_us = _median([r.cpu_us for r in self.rounds])
        self.batch = _median([r.batch for r in self.rounds])
        self.errors = sum(r.errors for r in self.rounds)
        texts = [r.error_text for r in self.rounds if r.errors]
        self.error_text = "; ".join(texts) if texts else "0"
        loads = [r.background for r in self.rounds if r.background is not None]
        self.background = max(loads) if loads else None

    def busy(self) -> bool:
        """True when other processes used more than BUSY of the CPUs during a round."""
        return self.background is not None and self.background > BUSY


def _median(values: list) -> float | None:
    """Median of the values that are numbers, or None."""
    nums = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(nums) if nums else None


def spread(row: Row, attr: str, fmt) -> str:
    """'min–median–max' of ``attr`` over the row's rounds (one value for one round)."""
    values = sorted(v for r in row.rounds if (v := getattr(r, attr)) is not None)
    if len(values) < 2:
        return fmt(getattr(row, attr))
    parts = [fmt(v) for v in (values[0], statistics.median(values), values[-1])]
    if all(p.endswith(" ms") for p in parts):  # '0.41–0.45–0.52 ms'
        parts = [p[:-3] for p in parts[:-1]] + parts[-1:]
    return "–".join(parts)


def round_ratio(row: Row, other: Row | None, attr: str) -> str:
    """Median over rounds of row's ``attr`` / other's ``attr`` in the same round."""
    if other is None or not row.rounds:
        return "n/a"
    ratios = [getattr(a, attr) / getattr(b, attr) for a, b in zip(row.rounds, other.rounds)
              if getattr(a, attr) and getattr(b, attr)]
    if not ratios:
        return "n/a"
    ratio = statistics.median(ratios)
    return f"{ratio:.3f}×" if ratio < 0.1 else f"{ratio:.2f}×"


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


def baseline(rows: list[Row], row: Row, contender: str | None = BASELINE) -> Row | None:
    """The ``contender`` row (FastAPI by default) of the same model and c, if it ran."""
    for other in rows:
        if (other.model, other.conc, other.contender) == (row.model, row.conc, contender):
            return other if other.rps is not None else None
    return None


def table(rows: list[Row]) -> str:
    """The matrix as a Markdown table: min–median–max over the rounds, ratios per round."""
    lines = ["| model | c | contender | req/s (min–med–max) | × base | × Triton | × MLServer "
             "| p50 (min–med–max) | × base | p99 (min–med–max) | × base | server CPU µs/req "
             "| mean batch | errors |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        label = LABELS[row.contender]
        if row.rps is None:
            lines.append(f"| {row.model} | {row.conc} | {label} | {row.note} "
                         "| | | | | | | | | | |")
            continue
        base = baseline(rows, row)
        triton, mlserver = PEER_OF.get(row.contender, (None, None))
        vs_triton = round_ratio(row, baseline(rows, row, triton), "rps") if triton else ""
        vs_ml = round_ratio(row, baseline(rows, row, mlserver), "rps") if mlserver else ""
        if row.contender in PEER_OF and not mlserver:
            vs_ml = "n/a"
        errors = row.error_text if not row.errors else f"**⚠ {row.error_text}**"
        errors = "–" if row.contender == "inproc" else errors
        if row.busy():
            errors += f" · **⚠ busy machine ({row.background:.0%} CPU)**"
        if row.note:  # a later round failed
            errors += f" · {row.note}"
        cpu = "–" if row.cpu_us is None else f"{row.cpu_us:,.0f}"
        batch = "n/a" if row.batch is None else f"{row.batch:.2f}"
        lines.append(
            f"| {row.model} | {row.conc} | {label} | {spread(row, 'rps', _rps)}"
            f" | {round_ratio(row, base, 'rps')} | {vs_triton} | {vs_ml}"
            f" | {spread(row, 'p50_ms', fmt_ms)} | {round_ratio(row, base, 'p50_ms')}"
            f" | {spread(row, 'p99_ms', fmt_ms)} | {round_ratio(row, base, 'p99_ms')}"
            f" | {cpu} | {batch} | {errors} |")
    return "\n".join(lines)


def _rps(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


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
