"""The mserve command line: the Typer app and its one error boundary.

Start-up stays light: no numpy, onnxruntime or uvicorn here (a test checks ``sys.modules``).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from mserve.daemon.errors import MserveError

HELP = """Serve ONNX models on this machine over the Open Inference Protocol.

Deploy a model and it answers on its own port, for Triton and KServe clients:

  mserve deploy model.onnx --name recs
  mserve predict recs input.json
  mserve list
"""

# name -> (module in mserve.cli.commands, attribute, help panel); a Typer sub-app when the
# attribute is "app". Only the command being run is imported and built (see ``build``).
COMMANDS = {
    "deploy": ("deploy", "deploy", "Deployments"),
    "list": ("listing", "list_", "Deployments"),
    "versions": ("versions", "versions", "Deployments"),
    "rollback": ("rollback", "rollback", "Deployments"),
    "undeploy": ("undeploy", "undeploy", "Deployments"),
    "traffic": ("rollout", "traffic", "Rollouts"),
    "promote": ("rollout", "promote", "Rollouts"),
    "label": ("rollout", "label", "Rollouts"),
    "prune": ("rollout", "prune", "Rollouts"),
    "status": ("status", "status", "Observe"),
    "history": ("history", "history", "Observe"),
    "logs": ("logs", "logs", "Observe"),
    "predict": ("predict", "predict", "Inference"),
    "daemon": ("daemon", "app", "Daemon"),
    "serve": ("serve", "serve", "Scaling out"),
    "export": ("export", "app", "Scaling out"),
}


def build(only: str | None = None) -> typer.Typer:
    """The Typer app with every command, or with just ``only``: Typer inspects every
    command it is given, which is most of a short command's run time."""
    from importlib import import_module

    app = typer.Typer(name="mserve", help=HELP, no_args_is_help=True, add_completion=True,
                      pretty_exceptions_enable=False, rich_markup_mode="rich",
                      context_settings={"help_option_names": ["-h", "--help"]})
    for name, (module, attr, panel) in COMMANDS.items():
        if only is None or name == only:
            target = getattr(import_module(f"mserve.cli.commands.{module}"), attr)
            if attr == "app":
                app.add_typer(target, name=name, rich_help_panel=panel)
            else:
                app.command(name, rich_help_panel=panel)(target)
    app.callback()(main)
    return app


def __getattr__(name: str):
    if name == "app":  # the whole app, for tests and completions
        return build()
    raise AttributeError(name)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"mserve {version('mserve')}")
        raise typer.Exit()


def main(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    pass


def _click_exceptions():
    """Click's exceptions: Typer 0.28 carries its own copy of Click (``typer._click``)."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def run() -> None:
    """Console entry point: user errors become one 'Error:' line and exit 1 (2 for bad
    usage, see ``render.BadUsage``)."""
    click = _click_exceptions()
    no_args = getattr(click, "NoArgsIsHelpError", ())  # Click before 8.2 prints help itself
    command = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in COMMANDS else None
    try:
        # not standalone: Click's own usage errors come here to be said as ours are, one
        # 'Error:' line (Typer draws them in a box, with a usage line, even into a pipe)
        code = build(command)(standalone_mode=False, prog_name="mserve")
    except no_args as exc:  # `mserve daemon`: its help, exit 2
        if text := exc.format_message().strip():  # (Typer's rich help printed it already)
            sys.stderr.write(text + "\n")
        sys.exit(2)
    except click.UsageError as exc:
        sys.stderr.write(f"Error: {exc.format_message()}\n")
        where = exc.ctx.command_path if exc.ctx is not None else "mserve"
        sys.stderr.write(f"Hint: see '{where} --help'\n")
        sys.exit(2)
    except click.ClickException as exc:
        sys.stderr.write(f"Error: {exc.format_message()}\n")
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.stderr.write("Error: interrupted\n")
        sys.exit(130)
    except MserveError as exc:
        sys.stderr.write(f"Error: {exc.message}\n")
        if exc.hint:
            sys.stderr.write(f"Hint: {exc.hint}\n")
        sys.exit(getattr(exc, "exit_code", 1))
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted\n")
        sys.exit(130)
    if isinstance(code, int) and code:  # typer.Exit(code) from a command
        sys.exit(code)


if __name__ == "__main__":
    run()
