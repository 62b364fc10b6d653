"""The project's performance targets, each judged PASS or MISS from one run's figures.

A load target whose rows had errors (non-2xx or socket errors) is a MISS: a server that
answers errors fast must not pass on speed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from report import Row, fmt_ms


@dataclass
class Extras:
    """The figures measured outside the load matrix (None: not measured in this run)."""

    list_s: float | None = None
    typer_s: float | None = None
    deploy_s: float | None = None
    rollback_s: float | None = None
    rss_mb: dict[str, float] | None = None


@dataclass
class Verdict:
    """One target: what it asks, what was measured, PASS / MISS / n/a."""

    target: str
    measured: str
    status: str


def _find(rows: list[Row], model: str, conc: int, contender: str) -> Row | None:
    for row in rows:
        if (row.model, row.conc, row.contender) == (model, conc, contender) and row.rps:
            return row
    return None


def _ratio_target(rows: list[Row], text: str, num: tuple, den: tuple, field: str,
                  limit: float, at_least: bool) -> Verdict:
    """num's ``field`` / den's ``field`` compared with ``limit`` (>= if ``at_least``)."""
    a, b = _find(rows, *num), _find(rows, *den)
    if not (a and b):
        return Verdict(text, "not measured in this run", "n/a")
    ratio = getattr(a, field) / getattr(b, field)
    if field == "rps":
        measured = f"{ratio:.2f}× ({a.rps:,.0f} vs {b.rps:,.0f} req/s)"
    else:
        measured = f"{ratio:.2f}× (p50 {fmt_ms(a.p50_ms)} vs {fmt_ms(b.p50_ms)})"
    errors = a.errors + b.errors
    if errors:
        return Verdict(text, f"{measured}; {errors} errors under load", "MISS")
    ok = ratio >= limit if at_least else ratio <= limit
    return Verdict(text, measured, "PASS" if ok else "MISS")


def _value_target(text: str, value: float | None, limit: float, fmt: Callable,
                  at_least: bool = False) -> Verdict:
    """``value`` < ``limit`` (>= with ``at_least``)."""
    if value is None:
        return Verdict(text, "not measured in this run", "n/a")
    ok = value >= limit if at_least else value < limit
    return Verdict(text, fmt(value), "PASS" if ok else "MISS")


def judge(rows: list[Row], extras: Extras) -> list[Verdict]:
    """Every target, in the issue's order."""
    base, json_, binary = "fastapi", "mserve-json", "mserve-bin"
    verdicts = [
        _ratio_target(rows, "tiny c=32, mserve JSON req/s ≥ 4× baseline",
                      ("tiny", 32, json_), ("tiny", 32, base), "rps", 4.0, True),
        _ratio_target(rows, "mlp c=32, mserve JSON req/s ≥ 5× baseline",
                      ("mlp", 32, json_), ("mlp", 32, base), "rps", 5.0, True),
        _ratio_target(rows, "tiny c=1, mserve JSON p50 ≤ 0.5× baseline",
                      ("tiny", 1, json_), ("tiny", 1, base), "p50_ms", 0.5, False),
        _ratio_target(rows, "mlp c=1, mserve JSON p50 ≤ 0.5× baseline",
                      ("mlp", 1, json_), ("mlp", 1, base), "p50_ms", 0.5, False),
        _ratio_target(rows, "mlp c=32, mserve binary req/s ≥ 1.3× mserve JSON",
                      ("mlp", 32, binary), ("mlp", 32, json_), "rps", 1.3, True),
        _ratio_target(rows, "mlp c=32, mserve gRPC req/s (h2load) ≥ 1.3× mserve HTTP JSON (wrk)",
                      ("mlp", 32, "mserve-grpc"), ("mlp", 32, json_), "rps", 1.3, True),
    ]
    verdicts += peer_targets(rows)
    cli = None
    if extras.list_s and extras.typer_s:
        cli = extras.list_s / extras.typer_s
    verdicts.append(_value_target(
        "`mserve list --json` ≤ 1.5× `python -c \"import typer\"`",
        cli, 1.5 + 1e-9,
        lambda r: f"{r:.2f}× ({extras.list_s * 1e3:.0f} ms vs {extras.typer_s * 1e3:.0f} ms, "
                  "medians of 20 alternated runs)"))
    verdicts.append(_value_target("`mserve deploy` tiny, to ready, < 2 s", extras.deploy_s,
                                  2.0, lambda s: f"{s:.2f} s (daemon start included)"))
    verdicts.append(_value_target("`mserve rollback` < 0.5 s", extras.rollback_s, 0.5,
                                  lambda s: f"{s:.3f} s"))
    rss = max(extras.rss_mb.values()) if extras.rss_mb else None
    verdicts.append(_value_target(
        "worker RSS < 150 MB", rss, 150.0,
        lambda mb: ", ".join(f"{k} {v:.0f} MB" for k, v in extras.rss_mb.items())))
    return verdicts


def peer_targets(rows: list[Row]) -> list[Verdict]:
    """Issue 15's targets: against Triton (PyTriton) and MLServer in the same run, the
    grpc.aio floor, latency, batch size and tails."""
    grpc, floor, triton_grpc = "mserve-grpc", "grpc-floor", "triton-grpc"
    out = [
        _ratio_target(rows, "tiny c=32, mserve gRPC req/s ≥ 1.5× Triton gRPC",
                      ("tiny", 32, grpc), ("tiny", 32, triton_grpc), "rps", 1.5, True),
        _ratio_target(rows, "tiny c=32, mserve gRPC req/s ≥ 0.7× the grpc.aio floor",
                      ("tiny", 32, grpc), ("tiny", 32, floor), "rps", 0.7, True),
        _ratio_target(rows, "mlp c=32, mserve gRPC req/s ≥ 1.5× Triton gRPC",
                      ("mlp", 32, grpc), ("mlp", 32, triton_grpc), "rps", 1.5, True),
    ]
    lone = _find(rows, "tiny", 1, grpc)
    out.append(_value_target("tiny c=1, mserve gRPC p50 ≤ 0.5 ms",
                             lone.p50_ms if lone else None, 0.5 + 1e-9, fmt_ms))
    batched = _find(rows, "mlp", 32, grpc)
    out.append(_value_target("mlp c=32, mserve gRPC mean batch ≥ 8 requests per run",
                             batched.batch if batched else None, 8.0, lambda b: f"{b:.2f}",
                             at_least=True))
    for model in ("tiny", "mlp"):
        for ours, triton, mlserver in (("mserve-json", "triton-json", "mlserver-json"),
                                       ("mserve-bin", "triton-bin", None)):
            kind = "JSON" if ours == "mserve-json" else "binary"
            out.append(_ratio_target(rows, f"{model} c=32, mserve {kind} req/s ≥ 2.5× Triton",
                                     (model, 32, ours), (model, 32, triton), "rps", 2.5, True))
            if mlserver:
                out.append(_ratio_target(rows, f"{model} c=32, mserve {kind} req/s ≥ 4× MLServer",
                                         (model, 32, ours), (model, 32, mlserver), "rps", 4.0,
                                         True))
            out.append(_tail_target(rows, model, ours, triton, kind))
    return out


def _tail_target(rows: list[Row], model: str, ours: str, triton: str, kind: str) -> Verdict:
    """p99 ≤ 3× p50 at c=32, and no worse than Triton's p99 in the same run."""
    text = f"{model} c=32, mserve {kind} p99 ≤ 3× its p50 and ≤ Triton's p99"
    a, b = _find(rows, model, 32, ours), _find(rows, model, 32, triton)
    if not a:
        return Verdict(text, "not measured in this run", "n/a")
    measured = f"p99 {fmt_ms(a.p99_ms)} = {a.p99_ms / a.p50_ms:.1f}× p50"
    ok = a.p99_ms <= 3 * a.p50_ms
    if b:
        measured += f"; Triton's p99 {fmt_ms(b.p99_ms)}"
        ok = ok and a.p99_ms <= b.p99_ms
    return Verdict(text, measured, "PASS" if ok else "MISS")


def verdict_table(verdicts: list[Verdict]) -> str:
    """The targets as a Markdown table."""
    lines = ["| target | measured | result |", "|---|---|---|"]
    lines += [f"| {v.target} | {v.measured} | **{v.status}** |" for v in verdicts]
    return "\n".join(lines)
