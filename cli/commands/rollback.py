from __future__ import annotations

from typing import Annotated, Optional

import typer

from mserve.cli import autostart
from mserve.cli.render import JsonOption, emit_json, say


def rollback(
    name: Annotated[str, typer.Argument(help="Deployment name.", show_default=False)],
    to: Annotated[Optional[int], typer.Option(
        "--to", min=1, help="Version to make active (default: the one before the active).")] = None,
    json_out: JsonOption = False,
) -> None:
    """Make an earlier version active again, with no failed request.

    Example: mserve rollback iris --to 1
    """
    answer = autostart.client().rollback(name, to)
    if json_out:
        emit_json(answer)
    elif answer.get("canary_stopped"):
        say(f"Canary of {name} stopped: all traffic to version {answer['version']}")
    elif answer["changed"]:
        say(f"Rolled back {name} to version {answer['version']} (was {answer['previous']})")
    else:
        say(f"{name} is already at version {answer['version']}; nothing changed")
