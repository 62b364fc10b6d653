"""The mserve command line: the Typer app and its one error boundary.

Start-up stays light: no numpy, onnxruntime or uvicorn here (a test checks ``sys.modules``).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from mserve.cli.commands import (daemon, deploy, history, listing, logs, predict, rollback,
                                 rollout, status, undeploy, versions)
from mserve.cli.commands import export, serve
from mserve.daemon.errors import MserveError

HELP = """Serve ONNX models on this machine over the Open Inference Protocol.

Deploy a model and it answers on its own port, for Triton and KServe clients:

  mserve deploy model.onnx --name recs
  mserve predict recs input.json
  mserve list
"""

app = typer.Typer(name="mserve", help=HELP, no_args_is_help=True, add_completion=True,
                  pretty_exceptions_enable=False, rich_markup_mode="rich",
                  context_settings={"help_option_names": ["-h", "--help"]})
app.command("deploy", rich_help_panel="Deployments")(deploy.deploy)
app.command("list", rich_help_panel="Deployments")(listing.list_)
app.command("versions", rich_help_panel="Deployments")(versions.versions)
app.command("rollback", rich_help_panel="Deployments")(rollback.rollback)
app.command("undeploy", rich_help_panel="Deployments")(undeploy.undeploy)
app.command("traffic", rich_help_panel="Rollouts")(rollout.traffic)
app.command("promote", rich_help_panel="Rollouts")(rollout.promote)
app.command("label", rich_help_panel="Rollouts")(rollout.label)
app.command("prune", rich_help_panel="Rollouts")(rollout.prune)
app.command("status", rich_help_panel="Observe")(status.status)
app.command("history", rich_help_panel="Observe")(history.history)
app.command("logs", rich_help_panel="Observe")(logs.logs)
app.command("predict", rich_help_panel="Inference")(predict.predict)
app.add_typer(daemon.app, name="daemon", rich_help_panel="Daemon")
app.command("serve", rich_help_panel="Scaling out")(serve.serve)
app.add_typer(export.app, name="export", rich_help_panel="Scaling out")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"mserve {version('mserve')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    pass


def run() -> None:
    """Console entry point: user errors become one 'Error:' line and exit 1."""
    try:
        app()
    except MserveError as exc:
        sys.stderr.write(f"Error: {exc.message}\n")
        if exc.hint:
            sys.stderr.write(f"Hint: {exc.hint}\n")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    run()
