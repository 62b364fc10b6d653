"""The `--workers` row (issue 17): `.venv/bin/python bench/workers.py [--workers N|auto]`.

The `tiny` model deployed twice in one mserve, with `--workers 1` and with `--workers N`
(default `auto`: one process per core), each loaded by wrk at c=64 (HTTP JSON, keep-alive
connections, which the kernel spreads over the processes as they connect) in interleaved
rounds (3 by default). Answers are checked against ONNX Runtime in-process first. Prints a
Markdown table with the ratio of the medians. wrk runs on the same machine: with few cores
its threads take cores the processes would use, so the ratio understates what a bigger box,
or clients on other machines, would see.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import loadgen
import models
import payloads
from mservectl import Mserve

HERE = Path(__file__).parent
WORK = HERE / ".work" / "workers"
CONNECTIONS = 64


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="auto", help="N, or auto (one per core)")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    many = cores if args.workers == "auto" else int(args.workers)
    WORK.mkdir(parents=True, exist_ok=True)
    model = models.build("tiny", WORK / "tiny.onnx")
    x = models.sample_input("tiny")
    body = payloads.json_body(x, WORK / "body.json")
    wrk = loadgen.ensure_wrk()
    mserve = Mserve()
    runs: dict[int, list[loadgen.WrkResult]] = {1: [], many: []}
    try:
        urls = {}
        for count in (1, many):
            d, _ = mserve.cli("deploy", str(model), "--name", f"w{count}",
                              "--workers", str(count))
            url = f"{d['deployment']['url']}/v2/models/w{count}/infer"
            if problem := payloads.check_answer(url, body, models.reference("tiny", x)):
                raise SystemExit(f"--workers {count} answers wrong: {problem}")
            urls[count] = url
        for _ in range(args.rounds):
            for count in (1, many):
                loadgen.run_wrk(wrk, urls[count], body, CONNECTIONS, 1)  # warm-up
                runs[count].append(loadgen.run_wrk(wrk, urls[count], body, CONNECTIONS,
                                                   args.duration))
    finally:
        mserve.close(WORK / "mserve-logs")
    print(table(runs, cores))
    return 0


def table(runs: dict[int, list[loadgen.WrkResult]], cores: int) -> str:
    lines = [f"`tiny`, HTTP JSON, c={CONNECTIONS}, {cores} cores:", "",
             "| --workers | req/s (min–med–max) | p50 | p99 | errors | vs --workers 1 |",
             "|---:|---|---:|---:|---:|---:|"]
    base = statistics.median(r.rps for r in runs[1])
    for count, results in runs.items():
        rps = [r.rps for r in results]
        lines.append(f"| {count} | {min(rps):,.0f}–{statistics.median(rps):,.0f}–"
                     f"{max(rps):,.0f} | {statistics.median(r.p50_ms for r in results):.3g} ms "
                     f"| {statistics.median(r.p99_ms for r in results):.3g} ms | "
                     f"{sum(r.errors for r in results)} | "
                     f"{statistics.median(rps) / base:.2f}× |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
