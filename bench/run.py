"""mserve's benchmark harness: `.venv/bin/python bench/run.py [--quick] [--only tiny,c32,...]`.

Builds the models, starts every contender on 127.0.0.1 (the in-process loop, the FastAPI
baseline and KServe from bench/.venv, mserve through its own CLI), loads each with wrk, prints
a Markdown report (ratios against the FastAPI baseline of the same run, targets PASS/MISS) and,
for a full run, writes it to docs/benchmarks.md. Needs only the stdlib, numpy and onnx here.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import loadgen
import models
import payloads
import report
import servers
import targets
from mservectl import Mserve, MserveError, cli_startup, log_problems
from report import Row

WORK = Path(__file__).parent / ".work"
MATRIX = {"tiny": (1, 32), "mlp": (1, 32, 64)}
CONTENDERS = ("inproc", "fastapi", "kserve", "mserve-json", "mserve-bin")
SERVERS = {"fastapi": ("fastapi_server.py", "/v2/health/ready"),
           "kserve": ("kserve_server.py", "/v2/models/{name}/ready")}


@dataclass
class Plan:
    """What to run: models, concurrencies, contenders, durations."""

    models: list[str]
    concs: set[int]
    contenders: list[str]
    duration: float
    warmup: float
    full: bool

    def cells(self, model: str) -> list[int]:
        """The concurrencies to run for ``model``."""
        return [c for c in MATRIX[model] if c in self.concs]


@dataclass
class Ctx:
    """Everything a cell needs."""

    plan: Plan
    wrk: str
    venv: servers.BenchVenv
    paths: dict[str, Path]
    bodies: dict[tuple[str, str], payloads.Body] = field(default_factory=dict)
    mserve_urls: dict[str, str] = field(default_factory=dict)


def parse_args(argv: list[str]) -> Plan:
    """The command line as a Plan."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per cell")
    parser.add_argument("--quick", action="store_true", help="2 s runs, 1 s warm-ups (smoke test)")
    parser.add_argument("--only", default="", help="comma-separated filters: models (tiny, mlp),"
                        " concurrencies (c1, c32, c64), contenders (" + ", ".join(CONTENDERS) +
                        "; mserve = both mserve rows)")
    parser.add_argument("--no-docs", action="store_true", help="never write docs/benchmarks.md")
    args = parser.parse_args(argv)
    tokens = {t.strip() for t in args.only.split(",") if t.strip()}
    known = set(MATRIX) | {f"c{c}" for cs in MATRIX.values() for c in cs} | set(CONTENDERS)
    if tokens - known - {"mserve"}:
        parser.error(f"unknown --only filter(s): {', '.join(sorted(tokens - known - {'mserve'}))}")
    if "mserve" in tokens:
        tokens |= {"mserve-json", "mserve-bin"}
    concs = {int(c[1:]) for c in _pick(["c1", "c32", "c64"], tokens)}
    duration, warmup = (2.0, 1.0) if args.quick else (args.duration, args.warmup)
    return Plan(_pick(list(MATRIX), tokens), concs, _pick(list(CONTENDERS), tokens), duration,
                warmup, full=not (args.quick or tokens or args.no_docs))


def _pick(options: list[str], tokens: set[str]) -> list[str]:
    """The options named in ``tokens``, or all of them when none is named."""
    return [o for o in options if o in tokens] or options


def prepare_bodies(ctx: Ctx) -> dict[str, object]:
    """Write each model's JSON and binary bodies; the expected answers, by model."""
    expected = {}
    for model in ctx.plan.models:
        x = models.sample_input(model)
        expected[model] = models.reference(model, x)
        ctx.bodies[model, "json"] = payloads.json_body(x, WORK / f"{model}.json")
        ctx.bodies[model, "bin"] = payloads.binary_body(x, WORK / f"{model}.bin")
    return expected


def measure(ctx: Ctx, row: Row, url: str, body: payloads.Body, expected) -> Row:
    """Check one answer, warm up, then the measured wrk run, into ``row``."""
    wrong = payloads.check_answer(url, body, expected)
    row.background = loadgen.background_load()
    if wrong:
        row.note = f"⚠ not run: {wrong}"
        return row
    try:
        if ctx.plan.warmup > 0:
            loadgen.run_wrk(ctx.wrk, url, body, row.conc, ctx.plan.warmup)
        result = loadgen.run_wrk(ctx.wrk, url, body, row.conc, ctx.plan.duration)
    except (loadgen.LoadgenError, subprocess.TimeoutExpired) as exc:
        row.note = f"⚠ wrk failed: {exc}"
        return row
    row.rps, row.p50_ms, row.p99_ms = result.rps, result.p50_ms, result.p99_ms
    row.errors, row.error_text = result.errors, result.error_text()
    print(f"  {row.model:5} c={row.conc:<3} {row.contender:12} {result.rps:9.0f} req/s  "
          f"p50 {report.fmt_ms(row.p50_ms):>9}  p99 {report.fmt_ms(row.p99_ms):>9}  "
          f"errors {row.error_text}", flush=True)
    return row


def inprocess_rows(ctx: Ctx, model: str) -> list[Row]:
    """The in-process loop, measured once at c=1; marked n/a at higher concurrencies."""
    rows = []
    for conc in ctx.plan.cells(model):
        row = Row(model, conc, "inproc")
        if conc > 1:
            row.note = "n/a (single-thread loop, see c=1)"
        else:
            try:
                row.background = loadgen.background_load()
                got = servers.run_inprocess(ctx.paths[model], models.SPECS[model].features,
                                            ctx.plan.duration, ctx.plan.warmup)
                row.rps, row.p50_ms, row.p99_ms = got["rps"], got["p50_ms"], got["p99_ms"]
                print(f"  {model:5} c=1   inproc       {row.rps:9.0f} calls/s", flush=True)
            except servers.ServerError as exc:
                row.note = f"⚠ {exc}"
        rows.append(row)
    return rows


def start_servers(ctx: Ctx, model: str, stack: contextlib.ExitStack) -> dict[str, str]:
    """Start the FastAPI and KServe servers for ``model``; base URL, or '!reason' on failure."""
    urls = {}
    for contender, (script, ready) in SERVERS.items():
        if contender not in ctx.plan.contenders:
            continue
        if contender == "kserve" and ctx.venv.kserve_error:
            urls[contender] = "!" + ctx.venv.kserve_error
            continue
        server = servers.Server(script, ctx.paths[model], model, ready, WORK / "logs")
        try:
            urls[contender] = stack.enter_context(server).url
        except servers.ServerError as exc:
            urls[contender] = f"!{contender} did not start: {exc}"
    if "mserve-json" in ctx.plan.contenders or "mserve-bin" in ctx.plan.contenders:
        urls["mserve-json"] = urls["mserve-bin"] = ctx.mserve_urls.get(model, "!not deployed")
    return urls


def bench_model(ctx: Ctx, model: str, expected) -> list[Row]:
    """Every cell of ``model``: per concurrency, the contenders back to back."""
    rows = inprocess_rows(ctx, model) if "inproc" in ctx.plan.contenders else []
    with contextlib.ExitStack() as stack:
        urls = start_servers(ctx, model, stack)
        for conc in ctx.plan.cells(model):
            for contender in [c for c in ctx.plan.contenders if c != "inproc"]:
                row, base = Row(model, conc, contender), urls[contender]
                if base.startswith("!"):
                    row.note = "⚠ not run: " + base[1:]
                    rows.append(row)
                    continue
                kind = "bin" if contender == "mserve-bin" else "json"
                url = f"{base}/v2/models/{model}/infer"
                rows.append(measure(ctx, row, url, ctx.bodies[model, kind], expected[model]))
    order = {c: i for i, c in enumerate(CONTENDERS)}
    return sorted(rows, key=lambda r: (r.conc, order[r.contender]))


def deploy_all(ctx: Ctx, mserve: Mserve, extras: targets.Extras) -> dict[str, float]:
    """Deploy every model through the CLI (tiny first: its time includes the daemon start)."""
    times = {}
    for model in sorted(ctx.plan.models, key=lambda m: m != "tiny"):
        result, seconds = mserve.deploy(ctx.paths[model], model)
        ctx.mserve_urls[model] = result["deployment"]["url"]
        servers.wait_ready(ctx.mserve_urls[model] + "/v2/health/ready", None, 30, WORK)
        times[model] = seconds
        print(f"  mserve deploy {model}: {seconds:.2f} s -> {ctx.mserve_urls[model]}", flush=True)
    extras.deploy_s = times.get("tiny")
    return times


def control_plane(ctx: Ctx, mserve: Mserve, extras: targets.Extras) -> dict:
    """After the load runs: worker RSS, CLI start-up, then the rollback timing."""
    extras.rss_mb = {m: mserve.rss_mb(m) for m in ctx.plan.models}
    startup = cli_startup(mserve)
    extras.list_s, extras.typer_s = startup["list"], startup["typer"]
    info = {"cli": startup}
    if "tiny" in ctx.plan.models:
        deployed, info["deploy_v2_s"] = mserve.deploy(ctx.paths["tiny_v2"], "tiny")
        result, extras.rollback_s = mserve.rollback("tiny")
        info["rollback"] = f"v{deployed['version']} -> v{result['version']}"
    return info


def run_mserve_side(ctx: Ctx, extras: targets.Extras, expected) -> tuple[list[Row], dict]:
    """All load cells, with the mserve daemon up; always stops it (and keeps its logs)."""
    mserve = Mserve() if any(c.startswith("mserve") for c in ctx.plan.contenders) else None
    info: dict = {}
    try:
        if mserve:
            info["deploy_s"] = deploy_all(ctx, mserve, extras)
        rows = [row for model in ctx.plan.models for row in bench_model(ctx, model, expected)]
        if mserve:
            info.update(control_plane(ctx, mserve, extras))
    finally:
        if mserve:
            mserve.close(WORK / "logs" / "mserve")
    return rows, info


def software(venv: servers.BenchVenv, wrk: str) -> str:
    """Versions of everything measured."""
    bench = servers.versions(venv.python)
    ort = next((f"{d} {metadata.version(d)}" for d in ("onnxruntime-gpu", "onnxruntime")
                if _installed(d)), "none")
    wrk_v = subprocess.run([wrk, "-v"], check=False, capture_output=True, text=True).stdout.split()[1]
    return (f"Python {sys.version.split()[0]}; mserve {metadata.version('mserve')} "
            f"({_revision()}) with {ort} "
            f"(CPU provider), numpy {metadata.version('numpy')}; bench/.venv: " +
            ", ".join(f"{k} {v}" for k, v in bench.items()) + f"; wrk {wrk_v}")


def _revision() -> str:
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


def render(ctx: Ctx, rows: list[Row], info: dict, extras: targets.Extras, took: float) -> str:
    """The whole report, in Markdown."""
    verdicts = targets.judge(rows, extras)
    command = shlex.join([".venv/bin/python", "bench/run.py", *sys.argv[1:]])
    today = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [
        "## Results", "",
        (f"- Date: {today}; command: `{command}` ({ctx.plan.warmup:g} s warm-up + "
         f"{ctx.plan.duration:g} s measured per cell; the whole run took {took / 60:.1f} min)"),
        f"- Machine: {report.machine()}; wrk and the server under test share these cores",
        f"- Software: {software(ctx.venv, ctx.wrk)}",
        "", "### Throughput and latency (one [1, F] FP32 row per request)", "",
        report.table(rows), "", *notes(ctx, rows), "", "### Targets", "",
        targets.verdict_table(verdicts), "", "### mserve control plane", "",
        *control_lines(info, extras)]
    return "\n".join(parts)


def notes(ctx: Ctx, rows: list[Row]) -> list[str]:
    """The caveats printed under the table."""
    lines = [("- `× base`: ratio to the FastAPI row of the same model and c (req/s: higher is "
              "better; latency: lower is better). **⚠** marks errors (non-2xx responses or "
              "socket errors counted by wrk) or a contender that could not run."),
             "- in-process: `session.run` in a loop in one thread, no HTTP; req/s = calls/s.",
             "- wrk: 1 thread at c=1, 2 threads at c≥32; `--timeout 10s`."]
    loads = [r.background for r in rows if r.background is not None]
    if loads:
        lines.append(f"- Other processes' CPU use, sampled for 0.5 s before each cell: max "
                     f"{max(loads):.0%} (**⚠ busy machine** above {report.BUSY:.0%}).")
    if ctx.venv.kserve_error:
        lines.append(f"- KServe not measured: {ctx.venv.kserve_error}")
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
    problems = log_problems(WORK / "logs" / "mserve")
    lines += [f"- **⚠ mserve log `{name}`** (the run included `mserve daemon stop`): `{line}`"
              for name, line in problems.items()]
    return lines


def main(argv: list[str]) -> int:
    """Run the plan, print the report, write docs/benchmarks.md for a full run."""
    started = time.perf_counter()
    plan = parse_args(argv)
    WORK.mkdir(exist_ok=True)
    wrk = loadgen.ensure_wrk()
    ctx = Ctx(plan, wrk, servers.ensure_venv(), models.build_all(WORK, plan.models))
    expected, extras = prepare_bodies(ctx), targets.Extras()
    load = loadgen.background_load(1.0)
    if load > report.BUSY:
        print(f"warning: other processes use {load:.0%} of the CPUs: figures will be "
              "distorted (busy cells are flagged)", flush=True)
    print(f"models {plan.models}, c {sorted(plan.concs)}, contenders {plan.contenders}, "
          f"{plan.warmup:g} s warm-up + {plan.duration:g} s per cell", flush=True)
    try:
        rows, info = run_mserve_side(ctx, extras, expected)
    except MserveError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    text = render(ctx, rows, info, extras, time.perf_counter() - started)
    (WORK / "results.json").write_text(json.dumps(
        {"rows": [asdict(r) for r in rows], "extras": asdict(extras), "info": info}, indent=1))
    print("\n" + text)
    if plan.full:
        report.write_doc(text)
        print(f"\nwrote {report.DOC}")
    else:
        print("\n(--quick, --only or --no-docs: docs/benchmarks.md left unchanged)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
