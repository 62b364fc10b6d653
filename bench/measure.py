"""One measured run of a cell: the quietest of a few tries, with the server's cost.

wrk for the HTTP rows (an answer first checked against numpy), h2load for the gRPC rows (one
call first checked with grpcio); each run is a warm-up then a measured run, repeated while
other processes kept the machine busy (loadgen.CpuWatch), and metered by cost.Meter (server
CPU µs per request, mean batch size).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import cost
import grpc_load
import loadgen
import payloads
import report
from report import Round, Row


class MeasureError(RuntimeError):
    """The run could not be made (its reason goes into the row's note)."""


@dataclass
class Endpoint:
    """A contender's base URL and server process id, or why it cannot be measured."""

    url: str = ""
    pid: int | None = None
    error: str | None = None
    grpc: str | None = None  # host:port of the gRPC service
    batches: Callable | None = None  # () -> (requests, model runs) so far (cost.py)
    failures: Callable | None = None  # () -> the server's failed gRPC calls so far


def quietest(ctx, pids: list[int], attempt, warmup=None):
    """Run ``attempt()`` (after ``warmup()``, unwatched) until other processes stay under
    loadgen.BUSY of the CPUs meanwhile, at most 1 + --retries times; (result, their CPU
    share) of the quietest attempt."""
    best = None
    for _ in range(1 + ctx.plan.retries):
        loadgen.wait_quiet(ctx.plan.wait_quiet)
        if warmup:
            warmup()
        with loadgen.CpuWatch(pids) as watch:
            result = attempt()
        if best is None or watch.foreign < best[1]:
            best = (result, watch.foreign)
        if watch.foreign <= loadgen.BUSY:
            break
    return best


def check(ctx, row: Row, target: Endpoint, body: payloads.Body | None, expected) -> str | None:
    """None when the contender answers the cell's request right, else what is wrong."""
    if body is not None:
        return payloads.check_answer(f"{target.url}/v2/models/{row.model}/infer", body,
                                     expected)
    if ctx.h2load is None:
        return ctx.h2load_error
    message = grpc_load.request_message(row.model, ctx.inputs[row.model])
    (ctx.work / f"{row.model}.grpc").write_bytes(grpc_load.frame(message))
    try:
        return grpc_load.check_answer(target.grpc, message, expected)
    except Exception as exc:  # noqa: BLE001 - an unreadable answer is reported, not raised
        return f"unreadable gRPC answer: {type(exc).__name__}: {exc}"


def once(ctx, row: Row, target: Endpoint, body: payloads.Body | None) -> Round:
    """One round of a cell: warm-up + metered run (the quietest of the tries); wrk when
    ``body`` is given, else h2load with the gRPC message ``check`` wrote."""
    if body is not None:
        url = f"{target.url}/v2/models/{row.model}/infer"

        def load(seconds: float):
            return loadgen.run_wrk(ctx.wrk, url, body, row.conc, seconds)
    else:
        message = ctx.work / f"{row.model}.grpc"

        def load(seconds: float):
            return grpc_load.run_h2load(ctx.h2load, target.grpc, message, row.conc, seconds,
                                        target.failures)

    pids = [target.pid] if target.pid else []

    def metered():
        with cost.Meter(pids, target.batches) as meter:
            result = load(ctx.plan.duration)
        return result, meter.cost(result.requests)
    try:
        (result, spent), background = quietest(
            ctx, pids, metered,
            (lambda: load(ctx.plan.warmup)) if ctx.plan.warmup > 0 else None)
    except (loadgen.LoadgenError, subprocess.TimeoutExpired, OSError) as exc:
        tool = "wrk" if body is not None else "h2load"
        raise MeasureError(f"{tool} failed: {exc}") from exc
    text = result.error_text() if body is not None else str(result.errors)
    run = Round(result.rps, result.p50_ms, result.p99_ms, result.errors, text, background,
                spent.cpu_us, spent.batch)
    cpu = "" if spent.cpu_us is None else f"  CPU {spent.cpu_us:,.0f} µs/req"
    batch = "" if spent.batch is None else f"  batch {spent.batch:.2f}"
    print(f"  {row.model:5} c={row.conc:<3} {row.contender:13} {run.rps:9.0f} req/s  "
          f"p50 {report.fmt_ms(run.p50_ms):>9}  p99 {report.fmt_ms(run.p99_ms):>9}  "
          f"errors {text}  other CPU {background:.0%}{cpu}{batch}", flush=True)
    return run
