"""Triton's perf_analyzer against mserve, over HTTP and gRPC: `make perf-analyzer`.

`.venv/bin/python bench/perf_analyzer.py [--models tiny,mlp] [--protocols http,grpc]
[--concurrency 1:32:31] [--interval-ms 2000] [-- PERF_ANALYZER_OPTIONS]` builds the bench's
models (bench/models.py), deploys them in a private mserve installation (bench/mservectl.py),
runs perf_analyzer on each model and protocol, prints its throughput/latency lines and a
summary table, and exits 1 when a run fails (or measures no throughput). With
`--http-url HOST:PORT` and/or `--grpc-url HOST:PORT` it measures a deployment that already
runs (`--models` names it) instead of deploying.

perf_analyzer is not on PyPI as such (`pip install perf-analyzer` is a placeholder): it ships
inside the tritonclient 2.45.x wheel (`bin/perf_analyzer`), which `make perf-analyzer`
installs into `.venv-pa` (so the project keeps its newer tritonclient), with
`nvidia-cuda-runtime-cu12` for libcudart (loaded even on CPU-only machines) and Debian's
`libb64-0d`. Needs only the stdlib here, plus numpy and onnx to build models.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-pa"
LOGS = Path(__file__).parent / ".work" / "logs" / "perf_analyzer"  # mserve's logs, kept
SUMMARY = re.compile(r"Concurrency: (\d+), throughput: ([\d.]+) infer/sec, latency (\d+) usec")


def binary(venv: Path = VENV) -> Path | None:
    """The perf_analyzer executable the tritonclient 2.45 wheel put in ``venv``, if any."""
    path = venv / "bin" / "perf_analyzer"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def environment(venv: Path = VENV) -> dict[str, str]:
    """os.environ with the CUDA runtime wheel's libraries on LD_LIBRARY_PATH."""
    dirs = [str(p) for p in sorted(venv.glob("lib/python3*/site-packages/nvidia/*/lib"))]
    current = os.environ.get("LD_LIBRARY_PATH")
    return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(dirs + ([current] if current else []))}


def missing_libraries(exe: Path) -> list[str]:
    """The shared libraries ``exe`` cannot find (``ldd``), each with how to install it."""
    hints = {"libb64": "apt-get install libb64-0d",
             "libcudart": f"{exe.parent}/python -m pip install nvidia-cuda-runtime-cu12"}
    done = subprocess.run(["ldd", str(exe)], env=environment(exe.parent.parent),
                          capture_output=True, text=True)
    missing = [line.split("=>")[0].strip() for line in done.stdout.splitlines()
               if "not found" in line]
    return [f"{lib} (install: {next((h for k, h in hints.items() if lib.startswith(k)), '?')})"
            for lib in missing]


def command(exe: Path, model: str, url: str, protocol: str, args: argparse.Namespace,
            csv_path: Path) -> list[str]:
    """perf_analyzer's command line for one model over one protocol."""
    return [str(exe), "-m", model, "-u", url, "-i", protocol,
            "--concurrency-range", args.concurrency,
            "--measurement-interval", str(args.interval_ms),
            "--stability-percentage", str(args.stability), "--max-trials", str(args.max_trials),
            "--input-data", "random", "-f", str(csv_path), *args.extra]


def measure(exe: Path, model: str, url: str, protocol: str, args: argparse.Namespace,
            timeout: float = 600) -> tuple[list[dict], str]:
    """Run perf_analyzer once: (one row per concurrency, or [] when it failed; its output)."""
    with tempfile.TemporaryDirectory(prefix="mserve-pa-") as tmp:
        csv_path = Path(tmp) / "results.csv"
        try:
            done = subprocess.run(command(exe, model, url, protocol, args, csv_path),
                                  env=environment(exe.parent.parent),
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            return [], f"perf_analyzer did not finish in {timeout:.0f} s\n{exc.stdout or ''}"
        output = done.stdout + done.stderr
        if done.returncode != 0 or not csv_path.exists():
            return [], output + f"\nperf_analyzer exited {done.returncode}"
        return rows(csv_path, output), output


def rows(csv_path: Path, output: str) -> list[dict]:
    """perf_analyzer's CSV report (and the average latency from its summary lines) as
    {concurrency, throughput, p50_ms, p99_ms, avg_ms}, latencies as the client saw them."""
    averages = {int(m[1]): int(m[3]) / 1000 for m in SUMMARY.finditer(output)}
    with csv_path.open(newline="") as f:
        found = [{"concurrency": int(r["Concurrency"]),
                  "throughput": float(r["Inferences/Second"]),
                  "p50_ms": int(r["p50 latency"]) / 1000, "p99_ms": int(r["p99 latency"]) / 1000,
                  "avg_ms": averages.get(int(r["Concurrency"]), float("nan"))}
                 for r in csv.DictReader(f)]
    return sorted(found, key=lambda r: r["concurrency"])  # the CSV comes in throughput order


def levels(concurrency: str) -> list[int]:
    """The concurrencies perf_analyzer's ``start:end:step`` range covers."""
    start, end, step = ([int(x) for x in concurrency.split(":")] + [1, 1])[:3]
    return list(range(start, max(end, start) + 1, step))


def report(output: str) -> str:
    """perf_analyzer's own throughput/latency lines (one per concurrency) and its complaints."""
    return "\n".join(line.strip() for line in output.splitlines()
                     if SUMMARY.search(line) or line.startswith(("error", "Failed", "WARNING")))


def table(results: list[tuple[str, str, dict]]) -> str:
    """A Markdown table of every measured row."""
    lines = ["| model | protocol | concurrency | infer/s | p50 ms | p99 ms | avg ms |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for model, protocol, r in results:
        lines.append(f"| {model} | {protocol} | {r['concurrency']} | {r['throughput']:,.0f} | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['avg_ms']:.2f} |")
    return "\n".join(lines)


def deploy(models_wanted: list[str], workdir: Path):
    """Build and deploy ``models_wanted`` in a fresh installation: (Mserve, {model: urls})."""
    sys.path.insert(0, str(Path(__file__).parent))
    import models
    from mservectl import Mserve

    mserve = Mserve()
    urls = {}
    try:
        for name in models_wanted:
            d = mserve.deploy(models.build(name, workdir / f"{name}.onnx"), name)[0]["deployment"]
            urls[name] = {"http": d["url"].split("://", 1)[1], "grpc": d["grpc_url"]}
            print(f"deployed {name}: {d['url']} (gRPC {d['grpc_url']})", flush=True)
    except Exception:
        mserve.close(LOGS)
        raise
    return mserve, urls


def run_all(exe: Path, urls: dict[str, dict[str, str]], args) -> tuple[list, list[str]]:
    """Every model over every protocol: (measured rows, failures)."""
    results, failures = [], []
    for model, by_protocol in urls.items():
        for protocol in args.protocols:
            if protocol not in by_protocol:
                continue
            print(f"\n## perf_analyzer -m {model} -i {protocol} -u {by_protocol[protocol]}",
                  flush=True)
            measured, output = measure(exe, model, by_protocol[protocol], protocol, args)
            print(report(output) if measured else output.strip(), flush=True)
            got = sorted(r["concurrency"] for r in measured if r["throughput"] > 0)
            if got != levels(args.concurrency):  # it gives up on a level it cannot stabilize
                failures.append(f"{model} over {protocol} (measured concurrency "
                                f"{got or 'none'} of {levels(args.concurrency)})")
            results += [(model, protocol, r) for r in measured]
    return results, failures


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,mlp", help="bench models, or the deployed one")
    p.add_argument("--protocols", default="http,grpc")
    p.add_argument("--concurrency", default="1:32:31", help="perf_analyzer's start:end:step")
    p.add_argument("--interval-ms", type=int, default=2000)
    p.add_argument("--stability", type=int, default=20,
                   help="perf_analyzer's --stability-percentage: how far 3 windows may differ")
    p.add_argument("--max-trials", type=int, default=10, help="windows before it gives up")
    p.add_argument("--http-url", help="HOST:PORT of a running deployment (no deploy)")
    p.add_argument("--grpc-url", help="HOST:PORT of its gRPC port (no deploy)")
    p.add_argument("--venv", type=Path, default=VENV, help="where perf_analyzer is installed")
    p.add_argument("extra", nargs="*", help="after --: more perf_analyzer options")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.protocols = [x for x in args.protocols.split(",") if x]
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    exe = binary(args.venv)
    if exe is None:
        print(f"Error: no perf_analyzer in {args.venv}/bin: run `make perf-analyzer`",
              file=sys.stderr)
        return 2
    if missing := missing_libraries(exe):
        print(f"Error: perf_analyzer cannot load {', '.join(missing)}", file=sys.stderr)
        return 2
    version = subprocess.run([str(exe), "--version"], env=environment(args.venv),
                             capture_output=True, text=True)
    print((version.stdout + version.stderr).strip())
    given = {k: v for k, v in (("http", args.http_url), ("grpc", args.grpc_url)) if v}
    with tempfile.TemporaryDirectory(prefix="mserve-pa-") as tmp:
        mserve, urls = (None, {m: given for m in args.models}) if given \
            else deploy(args.models, Path(tmp))
        try:
            results, failures = run_all(exe, urls, args)
        finally:
            if mserve is not None:
                mserve.close(LOGS)
    print("\n" + table(results))
    if failures:
        print(f"\nError: perf_analyzer failed for {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
