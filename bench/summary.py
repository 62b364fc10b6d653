"""The report around the tables: software versions, notes under the matrix, the mserve
control-plane figures, and the whole Markdown document."""

from __future__ import annotations

import datetime
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import loadgen
import peers
import report
import servers
import targets
from mservectl import log_problems
from report import Row

MSERVE_LOGS = Path(__file__).parent / ".work" / "logs" / "mserve"


def software(venv: servers.BenchVenv, wrk: str, revision: str, peer_venvs=None) -> str:
    """Versions of everything measured."""
    peer_versions = ""
    for peer, dists in (("triton", ("nvidia-pytriton", "onnxruntime", "numpy")),
                        ("mlserver", ("mlserver", "onnxruntime", "numpy"))):
        got = (peer_venvs or {}).get(peer)
        if got is not None and not got.error:
            peer_versions += f"; bench/.venv-{peer}: " + ", ".join(
                f"{d} {got.version(d)}" for d in dists)
    bench = servers.versions(venv.python)
    ort = next((f"{d} {metadata.version(d)}" for d in ("onnxruntime-gpu", "onnxruntime")
                if _installed(d)), "none")
    wrk_v = subprocess.run([wrk, "-v"], check=False, capture_output=True,
                           text=True).stdout.split()[1]
    return (f"Python {sys.version.split()[0]}; mserve {metadata.version('mserve')} "
            f"({revision}) with {ort} "
            f"(CPU provider), numpy {metadata.version('numpy')}; bench/.venv: " +
            ", ".join(f"{k} {v}" for k, v in bench.items()) + f"; wrk {wrk_v}" + peer_versions)


def revision() -> str:
    """The checkout's commit, noting uncommitted changes to mserve's own code."""
    git = ["git", "-C", str(Path(__file__).parent.parent)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], check=False,
                          capture_output=True, text=True).stdout.strip() or "unknown commit"
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "cli", "daemon",
                            "pyproject.toml"], check=False, capture_output=True, text=True)
    return f"commit {head}" + (" + uncommitted changes" if dirty.stdout.strip() else "")


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def render(ctx, rows: list[Row], info: dict, extras: targets.Extras, took: float) -> str:
    """The whole report, in Markdown; ``ctx`` is run.py's Ctx (plan, venv, wrk)."""
    verdicts = targets.judge(rows, extras)
    command = shlex.join([".venv/bin/python", "bench/run.py", *sys.argv[1:]])
    today = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [
        "## Results", "",
        (f"- Date: {today}; command: `{command}` ({ctx.plan.warmup:g} s warm-up + "
         f"{ctx.plan.duration:g} s measured per cell; the whole run took {took / 60:.1f} min)"),
        f"- Machine: {report.machine()}; wrk and the server under test share these cores",
        f"- Software: {software(ctx.venv, ctx.wrk, ctx.revision, ctx.peers)}",
        "", "### Throughput and latency (one [1, F] FP32 row per request)", "",
        report.table(rows), "", *notes(ctx, rows), "", "### Targets", "",
        targets.verdict_table(verdicts), "", "### mserve control plane", "",
        *control_lines(info, extras)]
    return "\n".join(parts)


def notes(ctx, rows: list[Row]) -> list[str]:
    """The caveats printed under the table."""
    lines = [("- `× base`: ratio to the FastAPI row of the same model and c (req/s: higher is "
              "better; latency: lower is better). **⚠** marks errors (non-2xx responses or "
              "socket errors counted by wrk) or a contender that could not run."),
             "- in-process: `session.run` in a loop in one thread, no HTTP; req/s = calls/s.",
             "- wrk: 1 thread at c=1, 2 threads at c≥32; `--timeout 10s`."]
    loads = [r.background for r in rows if r.background is not None]
    if loads:
        lines.append(f"- Other processes' share of the CPUs during each measured run (all "
                     f"but wrk, the harness and the server under test): max {max(loads):.0%}"
                     f" (**⚠ busy machine** above {loadgen.BUSY:.0%}; each run first waits "
                     f"up to {ctx.plan.wait_quiet:g} s for a quiet machine, a busy run is "
                     f"repeated up to {ctx.plan.retries} times and the quietest kept).")
    if ctx.venv.kserve_error:
        lines.append(f"- KServe not measured: {ctx.venv.kserve_error}")
    lines += [
        f"- {ctx.plan.rounds} round(s) per cell, the contenders interleaved in each round (the "
        "order rotated from round to round); req/s, p50 and p99 are min–median–max over the "
        "rounds, each ratio is computed within a round and the median of those is shown.",
        "- `× Triton`, `× MLServer`: an mserve row's req/s over the peer's row with the same "
        "transport (JSON, binary tensors or gRPC; MLServer has no binary tensor extension).",
        "- server CPU µs/req: utime + stime of the server process tree (all its threads and "
        "child processes: tritonserver and the Python backend stubs, MLServer's workers) "
        "over the measured run, / requests answered (load generator's CPU excluded). mean "
        "batch: requests per model run over the run, from the server's own metrics (mserve "
        "`mserve_batch_size`, Triton `nv_inference_count / nv_inference_exec_count`, MLServer "
        "successful requests / batches dispatched to its workers); n/a where not reported."]
    lines += contender_legend(ctx, rows)
    return lines


def contender_legend(ctx, rows: list[Row]) -> list[str]:
    """One line per peer with its settings, or why it was not measured."""
    lines = []
    for peer, label in (("triton", "Triton (PyTriton)"), ("mlserver", "MLServer")):
        venv = ctx.peers.get(peer)
        if venv is None:
            continue
        if venv.error:
            lines.append(f"- {label} not measured: {venv.error}")
        else:
            lines.append(f"- {label}: {peers.settings(peer, venv)}")
    return lines


def control_lines(info: dict, extras: targets.Extras) -> list[str]:
    """The deploy / rollback / CLI / RSS figures as bullet lines."""
    if not info:
        return ["mserve was not run."]
    deploys = ", ".join(f"{m} {s:.2f} s" for m, s in info["deploy_s"].items())
    lines = [f"- `mserve deploy` to ready (first one starts the daemon): {deploys}"]
    if extras.rollback_s is not None:
        lines.append(f"- `mserve rollback tiny` ({info['rollback']}, after deploying a second "
                     f"version in {info['deploy_v2_s']:.2f} s): {extras.rollback_s:.3f} s")
    cli = info["cli"]
    lines.append(f"- `mserve list --json`: {cli['list'] * 1e3:.0f} ms vs `python -c \"import "
                 f"typer\"` {cli['typer'] * 1e3:.0f} ms = {cli['ratio']:.2f}× (medians of "
                 f"{cli['runs']} alternated runs)")
    rss = ", ".join(f"{m} {mb:.0f} MB" for m, mb in (extras.rss_mb or {}).items())
    lines.append(f"- Worker RSS (VmRSS) after the load runs: {rss}")
    restarts = {m: n for m, n in info["restarts"].items() if n}
    if restarts:
        lines.append(f"- **⚠ mserve worker restarts during the run**: {restarts}")
    problems = log_problems(MSERVE_LOGS)
    lines += [f"- **⚠ mserve log `{name}`** (the run included `mserve daemon stop`): `{line}`"
              for name, line in problems.items()]
    return lines
