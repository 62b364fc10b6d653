from __future__ import annotations

from typing import Annotated

import typer

from mserve.cli import autostart
from mserve.cli.render import JsonOption, emit_json, say


def undeploy(
    name: Annotated[str, typer.Argument(help="Deployment name.", show_default=False)],
    json_out: JsonOption = False,
) -> None:
    """Stop serving a deployment and free its port.

    Example: mserve undeploy iris
    """
    answer = autostart.client().undeploy(name)
    if json_out:
        emit_json(answer)
    else:
        say(f"Undeployed {name}; port {answer['port']} is free")
