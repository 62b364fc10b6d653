"""Docs that tests keep honest: README and docs/cli.md name every command, completions are
generated from the app, every metric is documented."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "completions"))


def commands() -> list[str]:
    import typer.main

    from mserve.cli.main import app

    group = typer.main.get_command(app)
    names = []
    for name, cmd in group.commands.items():
        sub = getattr(cmd, "commands", None)
        names += [f"{name} {s}" for s in sub] if sub else [name]
    return names


def test_every_command_is_in_the_readme_and_docs():
    readme = (ROOT / "README.md").read_text()
    cli_doc = (ROOT / "docs" / "cli.md").read_text()
    assert len(commands()) >= 11
    for command in commands():
        head = command.split()[0]
        assert f"mserve {head}" in readme, command
        assert f"mserve {command}" in cli_doc, command


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completions_match_the_app(shell):
    import generate

    path = ROOT / "completions" / generate.FILES[shell]
    assert path.read_text() == generate.scripts()[shell].rstrip("\n") + "\n", \
        "completions drifted: run `make completions`"


def test_every_metric_is_documented():
    source = (ROOT / "daemon" / "worker" / "metrics.py").read_text()
    doc = (ROOT / "docs" / "metrics.md").read_text()
    names = set(re.findall(r'"(mserve_[a-z_]+)"', source))
    assert len(names) >= 7
    for name in names:
        assert name in doc, name
