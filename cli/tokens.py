"""Bearer tokens on the command line, kept out of argv: every local user can read a running
command's arguments (``ps``, /proc/PID/cmdline), so ``--token-file`` and ``MSERVE_TOKEN``
are the ways to pass one, and ``--token T`` still works with a warning.

Shared by ``deploy``, ``serve`` and ``predict``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from mserve.cli.render import BadUsage
from mserve.daemon.errors import MserveError

ENV = "MSERVE_TOKEN"
WARNING = ("Warning: --token is visible to other local users in ps; use --token-file or "
           f"{ENV}\n")

_PS = f"Visible to other local users in ps: prefer --token-file or {ENV}."
RequireTokenOption = Annotated[Optional[str], typer.Option(
    "--token", metavar="TOKEN", show_default=False,
    help=f"Require 'Authorization: Bearer TOKEN' on every route but health. {_PS}")]
ClientTokenOption = Annotated[Optional[str], typer.Option(
    "--token", metavar="TOKEN", show_default=False,
    help=f"Bearer token of a deployment deployed with a token. {_PS}")]
TokenFileOption = Annotated[Optional[Path], typer.Option(
    "--token-file", metavar="FILE", show_default=False,
    help=f"Read the token from FILE ('-': stdin; surrounding whitespace is dropped): it stays "
         f"out of ps. Without --token or --token-file, {ENV} is used.")]


def resolve(token: str | None, token_file: Path | None, *, stdin_free: bool = True) -> str | None:
    """The token from ``--token``, ``--token-file`` or ``MSERVE_TOKEN`` (in that order), or
    None. ``stdin_free`` is False when stdin already holds the command's input."""
    if token is not None and token_file is not None:
        raise BadUsage("use --token or --token-file, not both")
    if token is not None:
        token = _checked(token, "--token")
        sys.stderr.write(WARNING)
        return token
    if token_file is not None:
        return _checked(_read(token_file, stdin_free), f"the token file '{token_file}'")
    if env := os.environ.get(ENV):  # set but empty counts as unset
        return _checked(env, ENV)
    return None


def _read(path: Path, stdin_free: bool) -> str:
    if str(path) == "-":
        if not stdin_free:
            raise BadUsage("--token-file - would read stdin, which holds the input: give the "
                           f"token in a file or in {ENV}")
        return sys.stdin.read()
    try:
        return path.expanduser().read_text()
    except OSError as exc:
        raise MserveError(f"cannot read token file '{path}': {exc.strerror}") from None
    except UnicodeDecodeError:
        raise MserveError(f"cannot read token file '{path}': it is not text") from None


def _checked(token: str, where: str) -> str:
    """The token without surrounding whitespace; bad usage when that leaves nothing, or a
    control character (a token goes into an HTTP header as it is)."""
    token = token.strip()
    if not token:
        raise BadUsage(f"{where} is empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in token):
        raise BadUsage(f"{where} holds a control character or more than one line: the token "
                       "must be one line")
    return token
