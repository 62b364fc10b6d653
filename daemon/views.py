"""How the daemon shows versions and errors to users: version rows as `versions` and
`status` print them, URLs, sizes, and load errors that name the user's file."""

from __future__ import annotations

import contextlib
from pathlib import Path

from mserve.daemon.errors import MserveError


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def version_view(v: dict) -> dict:
    meta = v.get("meta") or {}
    return {"version": v["number"], "number": v["number"], "sha256": v["sha256"],
            "size": v["size"],
            "created": v["created"], "source": v["source"], "state": v["state"],
            "device": meta.get("device"), "batchable": meta.get("batchable"),
            "batching": meta.get("batching"),
            "transformer": v.get("transformer"),
            "error": v.get("error")}


def user_words(message: str, artifact, stored: Path) -> str:
    """A load error as the user should read it: the child names the store's copy
    (``models/<sha256>/model.onnx``); name the user's file instead."""
    source = Path(artifact.source)
    user_file, folder = source, source.parent
    if source.is_dir():
        folder = source
        with contextlib.suppress(MserveError, OSError):
            from mserve.daemon.store import model_in
            user_file = model_in(source) or source / stored.name
    message = message.replace(str(stored), str(user_file))
    message = message.replace(str(stored.parent), str(folder))
    return message.replace(f"'{stored.name}'", f"'{user_file.name}'")


def size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
