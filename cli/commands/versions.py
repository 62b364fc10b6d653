from __future__ import annotations

from typing import Annotated

import typer

from mserve.cli import autostart
from mserve.cli.render import JsonOption, ago, emit_json, human_size, table


def versions(
    name: Annotated[str, typer.Argument(help="Deployment name.", show_default=False)],
    json_out: JsonOption = False,
) -> None:
    """Show every version of a deployment and its state.

    Example: mserve versions iris
    """
    rows = autostart.client().versions(name)
    if json_out:
        emit_json(rows)
        return
    table(["version", "state", "loaded", "on disk", "sha256", "size", "transformer", "created",
           "source"],
          [[v["version"], v["state"], "yes" if v["loaded"] else "no",
            "yes" if v["on_disk"] else "no", v["sha256"][:12], human_size(v["size"]),
            transformer_text(v.get("transformer")), ago(v["created"]), v["source"]]
           for v in rows])


def transformer_text(pipeline: dict | None) -> str:
    """A version's transformer: its script and the hash of its folder, or '-'."""
    return f"{pipeline['script']} {pipeline['sha256'][:12]}" if pipeline else "-"
