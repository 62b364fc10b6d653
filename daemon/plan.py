"""What a worker should serve (``Plan``), and the rules a deploy request must follow.

Pure functions and values: no I/O, no state. ``Deployments`` and ``Rollouts`` build plans;
the worker receives ``Plan.keep`` and ``Plan.route`` in its control messages.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from mserve.daemon.errors import BadRequest, Conflict


@dataclass(frozen=True)
class Plan:
    """What a worker serves: the active version, the split of unpinned traffic, labels, and
    the standby version; everything it names stays loaded."""

    active: int
    traffic: dict[int, int] | None
    labels: dict[str, int]
    standby: int | None

    @property
    def keep(self) -> list[int]:
        named = {self.standby, *(self.traffic or {}), *self.labels.values()}
        return sorted(n for n in named if n is not None and n != self.active)

    def route(self, d: dict) -> dict:
        return {"traffic": {str(k): w for k, w in (self.traffic or {}).items()} or None,
                "labels": self.labels, "sticky": d["options"].get("sticky_header")}


def canary_percent(req: dict, existing: dict | None) -> int | None:
    canary = req.get("canary")
    if canary is None:
        return None
    if isinstance(canary, bool) or not isinstance(canary, int) or not 1 <= canary <= 99:
        raise BadRequest("--canary must be a percentage from 1 to 99")
    if existing is None:
        raise BadRequest("--canary needs an existing deployment to share traffic with")
    return canary


def check_same_place(existing: dict, req: dict) -> None:
    name = existing["name"]
    if req.get("tls_cert"):
        raise Conflict(f"deployment '{name}' exists; TLS is set on its first deploy "
                       "(undeploy it first to change it)")
    grpc_port = existing["options"].get("grpc_port")
    if req.get("grpc_port") and req["grpc_port"] != grpc_port:
        raise Conflict(f"deployment '{name}' already serves gRPC on port {grpc_port}; "
                       "a deployment keeps its ports (undeploy it first to change them)")
    if req.get("port") and req["port"] != existing["port"]:
        raise Conflict(f"deployment '{name}' already serves on port {existing['port']}; "
                       "a deployment keeps its port (undeploy it first to change it)")
    if req.get("host") and req["host"] != existing["host"]:
        raise Conflict(f"deployment '{name}' already binds {existing['host']}; "
                       "undeploy it first to change the host")


def default_name(source: Path) -> str:
    stem = source.name if source.is_dir() else source.stem
    return stem.lower()


def hash_token(token: str | None) -> str | None:
    return hashlib.sha256(token.encode()).hexdigest() if token else None


def check_batching(req: dict) -> None:
    if req.get("batching") not in (None, "auto", "on", "off"):
        raise BadRequest("--batching must be auto, on or off")


MAX_THREADS = 1024
THREADS_HELP = ("ONNX Runtime intra-op threads per session (default: ONNX Runtime's own "
                "choice, one per physical core).")


def check_threads(req: dict) -> None:
    """``threads``: None (ONNX Runtime's default) or a whole number from 1 to MAX_THREADS."""
    threads = req.get("threads")
    if threads is not None and (type(threads) is not int or not 1 <= threads <= MAX_THREADS):
        raise BadRequest(f"--threads must be a whole number from 1 to {MAX_THREADS}, "
                         f"got {threads!r}")


MAX_WORKERS = 256
WORKERS_HELP = ("Worker processes for this deployment, sharing its ports (default 1; auto: one "
                "per core). Each has its own sessions and batcher.")


def parse_workers(text) -> int | str:
    """``--workers``: a whole number from 1 to MAX_WORKERS, or ``auto``; ValueError with
    what is wrong otherwise."""
    if text == "auto":
        return "auto"
    try:
        count = int(text) if type(text) is not bool else None
    except (TypeError, ValueError):
        count = None
    if count is None or str(count) != str(text).strip() or not 1 <= count <= MAX_WORKERS:
        raise ValueError(f"--workers must be auto or a whole number from 1 to {MAX_WORKERS}, "
                         f"got {text!r}")
    return count


def check_workers(req: dict) -> None:
    if req.get("workers") is not None:
        try:
            req["workers"] = parse_workers(req["workers"])
        except ValueError as exc:
            raise BadRequest(str(exc)) from None


def signature_changes(old: dict | None, new: dict | None) -> list[str]:
    """How the inputs and outputs of ``new`` (version metadata) differ from ``old``'s, one
    line each: added, removed, or another datatype or shape. Empty when they agree."""
    if not old or not new:
        return []
    changes = []
    for kind in ("inputs", "outputs"):
        before = {t["name"]: t for t in old.get(kind) or []}
        after = {t["name"]: t for t in new.get(kind) or []}
        what = kind[:-1]
        changes += [f"{what} '{n}' removed" for n in before if n not in after]
        changes += [f"{what} '{n}' added ({_tensor_text(after[n])})"
                    for n in after if n not in before]
        changes += [f"{what} '{n}' changed: {_tensor_text(before[n])} -> "
                    f"{_tensor_text(after[n])}"
                    for n in before if n in after and _tensor_text(before[n]) !=
                    _tensor_text(after[n])]
    return changes


def input_changes(changes: list[str]) -> list[str]:
    return [c for c in changes if c.startswith("input ")]


def _tensor_text(t: dict) -> str:
    return f"{t['datatype']} [{', '.join(map(str, t['shape']))}]"
