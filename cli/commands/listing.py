from __future__ import annotations

from mserve.cli import autostart
from mserve.cli.render import JsonOption, ago, emit_json, human_size, millis, say, table


def list_(json_out: JsonOption = False) -> None:
    """List deployments: version, status, URL, device, and the last minute's traffic.

    Example: mserve list --json
    """
    rows = autostart.client().deployments()
    if json_out:
        emit_json(rows)
        return
    if not rows:
        say("No deployments. Deploy one with: mserve deploy MODEL.onnx --name NAME")
        return
    table(["name", "version", "status", "url", "device", "versions", "req/min", "errors",
           "p50", "p99", "memory", "restarts", "updated"],
          [[d["name"], d["version"], d["status"], d["url"], d["device"], d["versions"],
            *live_columns(d.get("live")), d["restarts"], ago(d["updated"])] for d in rows])


def live_columns(live: dict | None) -> list:
    """Requests, error rate, p50, p99 over the last minute, and worker memory."""
    if not live:
        return ["-"] * 5
    rate = f"{live['error_rate_1m'] * 100:.1f}%" if live["requests_1m"] else "-"
    return [live["requests_1m"], rate, millis(live["p50_ms_1m"]), millis(live["p99_ms_1m"]),
            human_size(live["rss_bytes"])]
