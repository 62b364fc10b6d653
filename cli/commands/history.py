from __future__ import annotations

from typing import Annotated

import typer

from mserve.cli import autostart
from mserve.cli.commands.status import history_table
from mserve.cli.render import JsonOption, emit_json


def history(
    name: Annotated[str, typer.Argument(help="Deployment name.", show_default=False)],
    json_out: JsonOption = False,
) -> None:
    """Show the audit log of a deployment: deploys, rollbacks, failures, restarts (UTC).

    Example: mserve history iris --json
    """
    events = autostart.client().events(name)
    if json_out:
        emit_json(events)
    else:
        history_table(events)
