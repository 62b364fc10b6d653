from __future__ import annotations

import json
import re
import sys
import time
from calendar import timegm
from collections import deque
from pathlib import Path
from typing import Annotated, Optional

import typer

from mserve.cli.render import BadUsage, JsonOption, emit_json
from mserve.daemon import paths as paths_mod
from mserve.daemon.errors import MserveError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def logs(
    name: Annotated[Optional[str], typer.Argument(
        help="Deployment whose request log to show; without it, the daemon log.",
        show_default=False)] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
    since: Annotated[Optional[str], typer.Option(
        help="Only lines newer than this, e.g. 30s, 10m, 2h, 1d.")] = None,
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="How many last lines.")] = 50,
    json_out: JsonOption = False,
) -> None:
    """Show a deployment's request log (one line per request), or the daemon log.

    Example: mserve logs iris --since 10m
    """
    window = parse_since(since) if since is not None else None  # bad usage first: exit 2
    paths = paths_mod.resolve()
    if name is None:
        daemon_log(paths.daemon_log, lines, follow, json_out, window)
        return
    path = paths.request_log(name)
    if not path.exists():
        raise MserveError(f"no request log for '{name}' (is it deployed, and has it served "
                          "a request?)")
    cutoff = time.time() - window if window is not None else None
    entries = [e for e in _read(path) if cutoff is None or _epoch(e["time"]) >= cutoff]
    entries = entries[-lines:] if lines else entries
    if json_out and not follow:
        emit_json(entries)
        return
    for e in entries:
        _print(e, json_out)
    if follow:
        _follow(path, json_out)


def parse_since(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if not m:
        raise BadUsage(f"--since {text!r}: use a number and a unit, e.g. 30s, 10m, 2h, 1d")
    return float(m.group(1)) * UNITS[m.group(2)]


# the daemon log's lines: "2026-12-03 05:54:02,270 INFO mserve.daemon: message"
LOG_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (\w+) ([\w.]+): (.*)")


def daemon_log(path: Path, lines: int, follow: bool, as_json: bool,
               window: float | None = None) -> None:
    """The daemon log's last ``lines`` lines (0: all) as text, or (``as_json``) as entries
    {time (UTC), level, logger, message}; a line of another shape (a traceback's, a starting
    daemon's 'Error:') is an entry of its own with level and logger null. ``window``: only
    lines that new. One pass over the file, then (``follow``) what is written to it."""
    try:
        f = open(path, errors="replace")
    except FileNotFoundError:
        raise MserveError(f"no log yet at {path}") from None
    cutoff = time.time() - window if window is not None else None

    def newer(line: str) -> bool:
        stamp = log_entry(line.rstrip("\n"))["time"]
        return stamp is not None and _epoch(stamp) >= cutoff

    def shown(line: str) -> str:
        return json.dumps(log_entry(line.rstrip("\n"))) + "\n" if as_json else line

    with f:
        last = deque((line for line in f if cutoff is None or newer(line)),
                     maxlen=lines or None)
        if as_json and not follow:
            emit_json([log_entry(line.rstrip("\n")) for line in last])
            return
        for line in last:
            sys.stdout.write(shown(line))
        sys.stdout.flush()
        if follow:
            for line in _appended(f):
                sys.stdout.write(shown(line))
                sys.stdout.flush()


def _appended(f):
    """The lines written to the open file ``f`` from where it stands, as they come (until
    interrupted): what ``-f`` prints."""
    while True:
        line = f.readline()
        if line:
            yield line
        else:
            time.sleep(0.2)


def log_entry(line: str) -> dict:
    m = LOG_LINE.fullmatch(line)
    if m is None:
        return {"time": None, "level": None, "logger": None, "message": line}
    local = time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S"))  # logging's local time
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(local)) + f".{m[2]}Z"
    return {"time": stamp, "level": m[3], "logger": m[4], "message": m[5]}


def _read(path: Path) -> list[dict]:
    out = []
    for p in (path.with_name(path.name + ".1"), path):
        if p.exists():
            for line in p.read_text(errors="replace").splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue  # a line cut by a crash
    return out


def _epoch(iso: str) -> float:
    return timegm(time.strptime(iso[:19], "%Y-%m-%dT%H:%M:%S")) + float(iso[19:23] or 0)


def _print(e: dict, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(e) + "\n")
    else:
        extra = f"  error: {e['error']}" if e.get("error") else ""
        queue = f"{e['queue_ms']} ms" if e.get("queue_ms") is not None else "-"
        sys.stdout.write(
            f"{e['time']}  {e['id']}  v{e['version']}  {e['status']}  {e['latency_ms']} ms"
            f"  queue {queue}  batch {e.get('batch') or '-'}  in {e['bytes_in']} B"
            f"  out {e['bytes_out']} B  {e['client']}{extra}\n")
    sys.stdout.flush()


def _follow(path: Path, as_json: bool) -> None:
    with open(path, errors="replace") as f:
        f.seek(0, 2)
        for line in _appended(f):
            try:
                _print(json.loads(line), as_json)
            except ValueError:
                continue
