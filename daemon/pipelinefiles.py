"""Which files a transformer brings into its version's artifact: the script and every other
file in its folder (its data: lookup tables, vocabularies), hidden files and folders and
``__pycache__`` left out, at most ``MSERVE_TRANSFORMER_MAX_MB`` MiB (64) in all.

Stdlib only: the daemon's store uses it, and nothing here runs the script.
"""

from __future__ import annotations

import os
from pathlib import Path

from mserve.daemon.errors import BadRequest

DEFAULT_MAX_MB = 64
SKIPPED = ("__pycache__",)


def max_bytes() -> int:
    try:
        return int(float(os.environ.get("MSERVE_TRANSFORMER_MAX_MB") or DEFAULT_MAX_MB) * 2**20)
    except ValueError:
        return DEFAULT_MAX_MB * 2**20


def pipeline_files(script: Path, skip: set[Path] = frozenset()
                   ) -> tuple[str, list[tuple[str, Path]]]:
    """The script's name and (name relative to its folder, file) for each file taken; files
    in ``skip`` (the model itself, when it sits in the same folder) are left out."""
    check_script(script)
    folder = script.parent
    root, skipped = folder.resolve(), {p.resolve() for p in skip}
    files, total, limit = [], 0, max_bytes()
    for path in _walk(folder):
        if not path.resolve().is_relative_to(root):
            raise BadRequest(f"'{path}' links outside the transformer's folder '{folder}'")
        if not path.is_file() or path.resolve() in skipped:
            continue
        if not os.access(path, os.R_OK):
            raise BadRequest(f"cannot read '{path}': permission denied")
        total += path.stat().st_size
        if total > limit:
            raise BadRequest(
                f"the transformer's folder '{folder}' holds more than {limit / 2**20:.0f} MiB "
                f"(MSERVE_TRANSFORMER_MAX_MB): everything in it beside '{script.name}' is "
                "stored with each version; move large files elsewhere, or the script to a "
                "folder of its own")
        files.append((path.relative_to(folder).as_posix(), path))
    return script.name, sorted(files)


def check_script(script: Path) -> None:
    if not script.is_file():
        raise BadRequest(f"transformer '{script}' does not exist or is not a file")
    if script.suffix != ".py":
        raise BadRequest(f"transformer '{script}' must be a Python file (.py)")
    if script.name.startswith("."):
        raise BadRequest(f"transformer '{script}' is a hidden file; rename it")


def _walk(folder: Path):
    def unreadable(exc: OSError) -> None:
        raise BadRequest(f"cannot read '{exc.filename}': {exc.strerror or exc}")

    for here, dirs, names in os.walk(folder, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED)
        for name in sorted(names):
            if not name.startswith("."):
                yield Path(here) / name
