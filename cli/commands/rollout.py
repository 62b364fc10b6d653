"""Traffic splits, promotion, labels and pruning."""

from __future__ import annotations

import re
from typing import Annotated, Optional

import typer

from mserve.cli import autostart
from mserve.cli.render import (BadUsage, JsonOption, emit_json, human_size, millis, say,
                               table)

# The label rule of daemon/rollout.py LABEL, checked here so bad usage exits 2 without the
# daemon (which checks it again for other clients).
LABEL = re.compile(r"[a-z][a-z0-9_.-]{0,62}")


def traffic(
    name: Annotated[str, typer.Argument(help="Deployment name.", show_default=False)],
    split: Annotated[Optional[list[str]], typer.Argument(
        help="VERSION=PERCENT pairs adding up to 100; none shows the split.",
        show_default=False)] = None,
    sticky_header: Annotated[Optional[str], typer.Option(
        help="Send each value of this header to one version ('' turns it off).")] = None,
    json_out: JsonOption = False,
) -> None:
    """Show or set how unpinned traffic is split between loaded versions, with each
    version's requests, errors and latency.

    Example: mserve traffic recs 3=90 4=10
    """
    answer = autostart.client().traffic(name, parse_split(split) if split else None,
                                        sticky_header)
    if json_out:
        emit_json(answer)
        return
    sticky = f", sticky by {answer['sticky_header']}" if answer["sticky_header"] else ""
    say(f"{name}: active version {answer['active']}{sticky}")
    table(["version", "traffic", "requests", "errors", "mean latency"],
          [[s["version"], f"{s['percent']}%", s.get("requests", "-"),
            f"{s['error_rate'] * 100:.1f}%" if s.get("requests") else "-",
            millis(s.get("mean_ms"))] for s in answer["split"]])


def parse_split(pairs: list[str]) -> dict[str, int]:
    split = {}
    for pair in pairs:
        version, sep, percent = pair.partition("=")
        if not sep or not version.isdigit() or not percent.isdigit():
            raise BadUsage(f"'{pair}' is not VERSION=PERCENT (e.g. 4=10)")
        version = str(int(version))  # 01 is 1
        if version in split:
            raise BadUsage(f"version {version} is named twice in the split")
        split[version] = int(percent)
    return split


def promote(
    name: Annotated[str, typer.Argument(help="Deployment name.", show_default=False)],
    version: Annotated[Optional[int], typer.Argument(
        help="Version to promote (default: the canary).", show_default=False)] = None,
    json_out: JsonOption = False,
) -> None:
    """Send all unpinned traffic to a version (default: the canary) and make it active.

    Example: mserve promote recs
    """
    answer = autostart.client().promote(name, version)
    if json_out:
        emit_json(answer)
    else:
        if answer.get("changed") is False:
            say(f"Nothing changed: version {answer['version']} of {name} is already active")
        else:
            say(f"Promoted {name} version {answer['version']} (was {answer['previous']})")


def label(
    name: Annotated[str, typer.Argument(help="Deployment name.", show_default=False)],
    label_name: Annotated[str, typer.Argument(metavar="LABEL", help="Label, e.g. stable.",
                                              show_default=False)],
    version: Annotated[Optional[int], typer.Argument(
        help="Version the label points to.", show_default=False)] = None,
    delete: Annotated[bool, typer.Option("--delete", help="Remove the label.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Point a label at a version; /v2/models/NAME/labels/LABEL/infer then reaches it.

    Example: mserve label recs stable 3
    """
    if (version is None) != delete:
        raise BadUsage("give a VERSION, or --delete to remove the label")
    if not LABEL.fullmatch(label_name):
        raise BadUsage(f"invalid label {label_name!r}: use a-z, 0-9, '_', '.', '-', starting "
                       "with a letter")
    answer = autostart.client().label(name, label_name, version)
    if json_out:
        emit_json(answer)
    else:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(answer["labels"].items())) or "none"
        say(f"{name} labels: {labels}")


def prune(json_out: JsonOption = False) -> None:
    """Free the model store of artifacts no version refers to.

    Example: mserve prune
    """
    answer = autostart.client().prune()
    if json_out:
        emit_json(answer)
    else:
        say(f"Removed {len(answer['removed'])} artifacts, freed "
            f"{human_size(answer['freed_bytes'])}")
