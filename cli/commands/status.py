from __future__ import annotations

from typing import Annotated

import typer

from mserve.cli import autostart
from mserve.cli.commands.listing import live_columns
from mserve.cli.commands.versions import transformer_text
from mserve.cli.render import JsonOption, ago, emit_json, say, table


def status(
    name: Annotated[str, typer.Argument(help="Deployment name.", show_default=False)],
    json_out: JsonOption = False,
) -> None:
    """Show one deployment in detail: versions, traffic, options, errors, recent events.

    Example: mserve status iris
    """
    d = autostart.client().deployment(name, detail=True)
    if json_out:
        emit_json(d)
        return
    requests, errors, p50, p99, memory = live_columns(d["live"])
    options = ", ".join(f"{k}={v}" for k, v in d["options"].items() if v is not None)
    device = d["device"] if d.get("card") is None else f"{d['device']}:{d['card']}"
    say(f"{d['name']}: version {d['version']} {d['status']} at {d['url']} ({device})")
    for label, value in [
        *([("device", d["device_note"])] if d.get("device_note") else []),
        ("loaded", ", ".join(str(n) for n in d["loaded"]) or "-"),
        ("worker", _worker_text(d, memory)),
        ("last minute", f"{requests} requests, errors {errors}, p50 {p50}, p99 {p99}"),
        ("batching", _batching_text(d.get("batching"))),
        ("transformer", transformer_text(d.get("transformer"))),
        ("options", options + (", token required" if d["auth"] else "")),
        ("last error", d["error"] or "-"),
    ]:
        say(f"  {label + ':':<13}{value}")
    say("")
    table(["version", "state", "batching", "sha256", "transformer", "created"],
          [[v["version"], v["state"], _batching_word(v.get("batching")), v["sha256"][:12],
            transformer_text(v.get("transformer")), ago(v["created"])]
           for v in d["versions_detail"]])
    say("")
    history_table(d["events"])


def _batching_word(batching: dict | None) -> str:
    return "-" if not batching else ("on" if batching["enabled"] else "off")


def _batching_text(batching: dict | None) -> str:
    """The active version's batching decision and why, e.g. 'off: output 'Y' dim 0 ...'."""
    return f"{_batching_word(batching)}: {batching['reason']}" if batching else "-"


def history_table(events: list[dict]) -> None:
    table(["time", "action", "version", "detail", "by"],
          [[e["time"].replace("T", " ")[:19], e["action"], e["version"], e["detail"] or "",
            e["actor"]] for e in events])


def _worker_text(d: dict, memory: str) -> str:
    """``pid 9485, 98 MB, 0 restarts``; with --workers, every process's pid (``-`` for one
    being restarted) and their memory together."""
    pids = d.get("pids") or [d["pid"]]
    if len(pids) <= 1:
        return f"pid {d['pid']}, {memory}, {d['restarts']} restarts"
    shown = ", ".join(str(p) if p else "-" for p in pids)
    return f"{len(pids)} processes (pids {shown}), {memory} in all, {d['restarts']} restarts"
