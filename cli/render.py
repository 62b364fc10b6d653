"""How the CLI shows things: borderless tables with UPPERCASE headers, human units, and
``--json`` (one document on stdout), defined once and shared by every command."""

from __future__ import annotations

import json
import sys
import time
from calendar import timegm
from typing import Annotated

import typer

from mserve.daemon.errors import MserveError

JsonOption = Annotated[bool, typer.Option(
    "--json", help="Print one JSON document on stdout (stable keys; see docs/cli.md).")]


class BadUsage(MserveError):
    """A command line the contract calls bad usage: ``Error: ...`` on stderr and exit 2,
    checked in the CLI before anything is sent to the daemon."""

    status = 400
    exit_code = 2


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def say(text: str) -> None:
    sys.stdout.write(text + "\n")


def table(headers: list[str], rows: list[list]) -> None:
    """A borderless table people can scan: UPPERCASE headers, columns three spaces apart."""
    cells = [[h.upper() for h in headers]] + [["-" if v is None else str(v) for v in r]
                                              for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        say("   ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def response(answer: dict) -> None:
    """An inference response as JSON, one line per output so the data stays readable."""
    outputs = answer.get("outputs")
    if not isinstance(outputs, list):
        emit_json(answer)
        return
    head = {k: v for k, v in answer.items() if k != "outputs"}
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    items = ",\n".join(f"    {json.dumps(o)}" for o in outputs)
    say("{\n" + "\n".join(lines) + '\n  "outputs": [\n' + items + "\n  ]\n}")


def ago(iso: str | None, now: float | None = None) -> str:
    """'3 minutes ago' from an ISO 8601 UTC time as the daemon writes it."""
    if not iso:
        return "-"
    then = timegm(time.strptime(iso[:19], "%Y-%m-%dT%H:%M:%S"))
    seconds = max(0, int((now or time.time()) - then))
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now" if seconds < 5 else f"{seconds} seconds ago"


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        text = f"{value:.0f}" if unit == "B" or round(value, 1) >= 100 else f"{value:.1f}"
        if float(text) < 1000 or unit == "GB":
            return f"{text} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def millis(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms * 1000:.0f} µs" if ms < 1 else f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"


def duration(seconds: float) -> str:
    if round(seconds) < 60:
        return f"{seconds:.0f} s"
    if round(seconds / 60) < 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
