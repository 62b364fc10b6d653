"""mserve's benchmark harness: `.venv/bin/python bench/run.py [--quick] [--only tiny,c32,...]`.

Builds the models, starts every contender on 127.0.0.1 (the in-process loop, the FastAPI
baseline and KServe from bench/.venv, Triton through PyTriton and MLServer from their own venvs,
bench/peers.py, mserve through its own CLI), loads each with wrk or h2load in ``--rounds``
interleaved rounds, meters the server's CPU per request (bench/cost.py), prints a Markdown
report (ratios against the FastAPI baseline and the peers of the same run, targets PASS/MISS)
and, for a full run, writes it to docs/benchmarks.md. Needs only the stdlib, numpy and onnx
here.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cost
import grpc_load
import loadgen
import models
import payloads
import peers
import report
import servers
import summary
import targets
from measure import Endpoint, MeasureError, check, once, quietest
from mservectl import Mserve, MserveError, cli_startup
from report import Row

WORK = Path(__file__).parent / ".work"
MATRIX = {"tiny": (1, 32), "mlp": (1, 32, 64)}
HERE = Path(__file__).parent
CONTENDERS = ("inproc", "fastapi", "kserve", "triton-json", "triton-bin", "triton-grpc",
              "mlserver-json", "mlserver-grpc", "mserve-json", "mserve-bin", "mserve-grpc",
              "grpc-floor")
GROUPS = {"mserve": ("mserve-json", "mserve-bin", "mserve-grpc"),
          "triton": ("triton-json", "triton-bin", "triton-grpc"),
          "mlserver": ("mlserver-json", "mlserver-grpc")}
GRPC = ("mserve-grpc", "grpc-floor", "triton-grpc", "mlserver-grpc")
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
    wait_quiet: float = 30.0
    retries: int = 2
    rounds: int = 3

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
    mserve: dict[str, Endpoint] = field(default_factory=dict)
    revision: str = ""  # the checkout's commit when the run started
    work: Path = WORK
    peers: dict[str, peers.PeerVenv] = field(default_factory=dict)  # installed lazily
    inputs: dict[str, object] = field(default_factory=dict)  # model -> the request's x
    h2load: str | None = None  # the gRPC load generator, or why it is missing:
    h2load_error: str = ""


def parse_args(argv: list[str]) -> Plan:
    """The command line as a Plan."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per cell")
    parser.add_argument("--quick", action="store_true", help="2 s runs, 1 s warm-ups (smoke test)")
    parser.add_argument("--only", default="", help="comma-separated filters: models (tiny, mlp),"
                        " concurrencies (c1, c32, c64), contenders (" + ", ".join(CONTENDERS) +
                        "; mserve, triton, mlserver = all of its rows)")
    parser.add_argument("--rounds", type=int, default=None, metavar="N",
                        help="measure every cell N times, the contenders interleaved in each "
                        "round (default 3, --quick 1)")
    parser.add_argument("--wait-quiet", type=float, default=None, metavar="S",
                        help="before each run, wait up to S s (default 30, --quick 0) for other "
                        f"processes to go under {loadgen.BUSY * 100:.0f}%% CPU (runs on a busy machine "
                        "are flagged)")
    parser.add_argument("--retries", type=int, default=None, metavar="N",
                        help="repeat a run made on a busy machine up to N times, keep the "
                        "quietest (default 2, --quick 0)")
    parser.add_argument("--no-docs", action="store_true", help="never write docs/benchmarks.md")
    args = parser.parse_args(argv)
    tokens = {t.strip() for t in args.only.split(",") if t.strip()}
    known = set(MATRIX) | {f"c{c}" for cs in MATRIX.values() for c in cs} | set(CONTENDERS)
    if tokens - known - set(GROUPS):
        parser.error(f"unknown --only filter(s): {', '.join(sorted(tokens - known - set(GROUPS)))}")
    for group, members in GROUPS.items():
        if group in tokens:
            tokens |= set(members)
    concs = {int(c[1:]) for c in _pick(["c1", "c32", "c64"], tokens)}
    duration, warmup = (2.0, 1.0) if args.quick else (args.duration, args.warmup)
    return Plan(_pick(list(MATRIX), tokens), concs, _pick(list(CONTENDERS), tokens), duration,
                warmup, full=not (args.quick or tokens or args.no_docs),
                wait_quiet=_default(args.wait_quiet, 0 if args.quick else 30),
                retries=_default(args.retries, 0 if args.quick else 2),
                rounds=max(1, _default(args.rounds, 1 if args.quick else 3)))


def _default(value, fallback):
    """``value``, or ``fallback`` when the option was not given."""
    return fallback if value is None else value


def _pick(options: list[str], tokens: set[str]) -> list[str]:
    """The options named in ``tokens``, or all of them when none is named."""
    return [o for o in options if o in tokens] or options


def prepare_bodies(ctx: Ctx) -> dict[str, object]:
    """Write each model's JSON and binary bodies; the expected answers, by model."""
    expected = {}
    for model in ctx.plan.models:
        x = ctx.inputs[model] = models.sample_input(model)
        expected[model] = models.reference(model, x)
        ctx.bodies[model, "json"] = payloads.json_body(x, WORK / f"{model}.json")
        ctx.bodies[model, "bin"] = payloads.binary_body(x, WORK / f"{model}.bin")
    return expected


def inprocess_rows(ctx: Ctx, model: str) -> list[Row]:
    """The in-process loop, measured at c=1 (once per round); n/a at higher concurrencies."""
    rows = []
    for conc in ctx.plan.cells(model):
        row = Row(model, conc, "inproc")
        if conc > 1:
            row.note = "n/a (single-thread loop, see c=1)"
        for _ in range(ctx.plan.rounds if conc == 1 else 0):
            args = (ctx.paths[model], models.SPECS[model].features, ctx.plan.duration,
                    ctx.plan.warmup)
            try:
                got, load = quietest(ctx, [], functools.partial(servers.run_inprocess, *args))
            except servers.ServerError as exc:
                row.note = f"⚠ {exc}"
                break
            row.add(report.Round(got["rps"], got["p50_ms"], got["p99_ms"], background=load))
            print(f"  {model:5} c=1   inproc        {got['rps']:9.0f} calls/s  "
                  f"other CPU {load:.0%}", flush=True)
        rows.append(row)
    return rows


def start_peers(ctx: Ctx, model: str, stack: contextlib.ExitStack) -> dict[str, Endpoint]:
    """Triton (PyTriton) and MLServer for ``model``, each installed on first use; an
    Endpoint with the reason for every row of a peer that cannot install or start."""
    found = {}
    for peer, members in (("triton", GROUPS["triton"]), ("mlserver", GROUPS["mlserver"])):
        wanted = [m for m in members if m in ctx.plan.contenders]
        if not wanted:
            continue
        if peer not in ctx.peers:
            ctx.peers[peer] = peers.ensure_peer(peer)
        venv = ctx.peers[peer]
        if venv.error:
            found.update({m: Endpoint(error=venv.error) for m in wanted})
            continue
        logs = WORK / "logs"
        try:
            server = (peers.Triton(venv, ctx.paths[model], model, logs, WORK) if peer == "triton"
                      else peers.MLServer(venv, ctx.paths[model], model, logs, WORK))
            stack.enter_context(server)
        except (servers.ServerError, OSError, subprocess.CalledProcessError) as exc:
            found.update({m: Endpoint(error=f"{peer} did not start: {exc}") for m in wanted})
            continue
        endpoint = Endpoint(server.url, server.proc.pid, grpc=server.grpc,
                            batches=server.batches(model),
                            failures=functools.partial(server.failures, model))
        found.update({m: endpoint for m in wanted})
    return found


def start_servers(ctx: Ctx, model: str, stack: contextlib.ExitStack,
                  expected) -> dict[str, Endpoint]:
    """Start the FastAPI and KServe servers, the peers and the gRPC floor for ``model``;
    every contender's endpoint."""
    found = {}
    for contender, (script, ready) in SERVERS.items():
        if contender not in ctx.plan.contenders:
            continue
        if contender == "kserve" and ctx.venv.kserve_error:
            found[contender] = Endpoint(error=ctx.venv.kserve_error)
            continue
        server = servers.Server(script, ctx.paths[model], model, ready, WORK / "logs")
        try:
            stack.enter_context(server)
            found[contender] = Endpoint(server.url, server.proc.pid)
        except servers.ServerError as exc:
            found[contender] = Endpoint(error=f"{contender} did not start: {exc}")
    found.update(start_peers(ctx, model, stack))
    if "grpc-floor" in ctx.plan.contenders:
        try:
            floor = stack.enter_context(grpc_load.Floor(model, expected, WORK))
            found["grpc-floor"] = Endpoint(pid=floor.pid, grpc=floor.target)
        except (loadgen.LoadgenError, OSError) as exc:
            found["grpc-floor"] = Endpoint(error=str(exc))
    deployed = ctx.mserve.get(model, Endpoint(error="mserve deployment missing"))
    if deployed.url:
        deployed.batches = cost.mserve_batches(deployed.url, model)
        deployed.failures = functools.partial(grpc_load.server_failures,
                                              f"{deployed.url}/metrics")
    found["mserve-json"] = found["mserve-bin"] = found["mserve-grpc"] = deployed
    return found


def body_for(ctx: Ctx, model: str, contender: str) -> payloads.Body | None:
    """The HTTP body a contender is loaded with (None: a gRPC row)."""
    if contender in GRPC:
        return None
    return ctx.bodies[model, "bin" if contender.endswith("-bin") else "json"]


def bench_model(ctx: Ctx, model: str, expected) -> list[Row]:
    """Every cell of ``model``: per concurrency, ``rounds`` rounds, each running every
    contender once (the order rotated from round to round)."""
    rows = inprocess_rows(ctx, model) if "inproc" in ctx.plan.contenders else []
    with contextlib.ExitStack() as stack:
        endpoints = start_servers(ctx, model, stack, expected[model])
        for conc in ctx.plan.cells(model):
            cell = {}
            for contender in [c for c in ctx.plan.contenders if c != "inproc"]:
                row, target = Row(model, conc, contender), endpoints[contender]
                wrong = target.error or check(ctx, row, target, body_for(ctx, model, contender),
                                              expected[model])
                if wrong:
                    row.note = f"⚠ not run: {wrong}"
                else:
                    cell[contender] = row
                rows.append(row)
            for turn in range(ctx.plan.rounds):
                if ctx.plan.rounds > 1:
                    print(f"  -- {model} c={conc} round {turn + 1}/{ctx.plan.rounds}", flush=True)
                order = list(cell)
                shift = turn % max(1, len(order))
                for contender in order[shift:] + order[:shift]:
                    row = cell[contender]
                    if row.note:
                        continue
                    try:
                        row.add(once(ctx, row, endpoints[contender],
                                     body_for(ctx, model, contender)))
                    except MeasureError as exc:
                        row.note = f"⚠ {exc}"
                        if not row.rounds:
                            row.rps = None
    order = {c: i for i, c in enumerate(CONTENDERS)}
    return sorted(rows, key=lambda r: (r.conc, order[r.contender]))


def deploy_all(ctx: Ctx, mserve: Mserve, extras: targets.Extras) -> dict[str, float]:
    """Deploy every model through the CLI (tiny first: its time includes the daemon start)."""
    times = {}
    for model in sorted(ctx.plan.models, key=lambda m: m != "tiny"):
        result, seconds = mserve.deploy(ctx.paths[model], model)
        url = result["deployment"]["url"]
        servers.wait_ready(url + "/v2/health/ready", None, 30, WORK)
        ctx.mserve[model] = Endpoint(url, mserve.deployment(model)["pid"],
                                     grpc=result["deployment"].get("grpc_url"))
        times[model] = seconds
        print(f"  mserve deploy {model}: {seconds:.2f} s -> {url}", flush=True)
    extras.deploy_s = times.get("tiny")
    return times


def control_plane(ctx: Ctx, mserve: Mserve, extras: targets.Extras) -> dict:
    """After the load runs: worker RSS, CLI start-up, then the rollback timing."""
    extras.rss_mb = {m: mserve.rss_mb(m) for m in ctx.plan.models}
    info: dict = {"restarts": {m: mserve.deployment(m)["restarts"] for m in ctx.plan.models}}
    loadgen.wait_quiet(ctx.plan.wait_quiet)
    info["cli"] = cli_startup(mserve)
    extras.list_s, extras.typer_s = info["cli"]["list"], info["cli"]["typer"]
    if "tiny" in ctx.plan.models:
        loadgen.wait_quiet(ctx.plan.wait_quiet)
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
            loadgen.wait_quiet(ctx.plan.wait_quiet)
            info["deploy_s"] = deploy_all(ctx, mserve, extras)
        rows = [row for model in ctx.plan.models for row in bench_model(ctx, model, expected)]
        if mserve:
            info.update(control_plane(ctx, mserve, extras))
    finally:
        if mserve:
            mserve.close(WORK / "logs" / "mserve")
    return rows, info


def main(argv: list[str]) -> int:
    """Run the plan, print the report, write docs/benchmarks.md for a full run."""
    started = time.perf_counter()
    plan = parse_args(argv)
    WORK.mkdir(exist_ok=True)
    wrk = loadgen.ensure_wrk()
    ctx = Ctx(plan, wrk, servers.ensure_venv(), models.build_all(WORK, plan.models),
              revision=summary.revision())
    expected, extras = prepare_bodies(ctx), targets.Extras()
    if set(GRPC) & set(plan.contenders):
        try:
            ctx.h2load = grpc_load.ensure_h2load()
        except loadgen.LoadgenError as exc:
            ctx.h2load_error = str(exc)
    load = loadgen.background_load(1.0)
    if load > loadgen.BUSY:
        print(f"warning: other processes use {load:.0%} of the CPUs: figures will be "
              "distorted (busy cells are flagged)", flush=True)
    print(f"models {plan.models}, c {sorted(plan.concs)}, contenders {plan.contenders}, "
          f"{plan.warmup:g} s warm-up + {plan.duration:g} s per cell", flush=True)
    try:
        rows, info = run_mserve_side(ctx, extras, expected)
    except MserveError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    text = summary.render(ctx, rows, info, extras, time.perf_counter() - started)
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
