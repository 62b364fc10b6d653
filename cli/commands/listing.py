from __future__ import annotations

from mserve.cli import autostart
from mserve.cli.render import JsonOption, ago, emit_json, say, table


def list_(json_out: JsonOption = False) -> None:
    """List deployments: active version, status, URL, device.

    Example: mserve list --json
    """
    rows = autostart.client().deployments()
    if json_out:
        emit_json(rows)
        return
    if not rows:
        say("No deployments. Deploy one with: mserve deploy MODEL.onnx --name NAME")
        return
    table(["name", "version", "status", "url", "device", "versions", "restarts", "updated"],
          [[d["name"], d["version"], d["status"], d["url"], d["device"], d["versions"],
            d["restarts"], ago(d["updated"])] for d in rows])
