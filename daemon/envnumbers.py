"""Numbers from MSERVE_* environment variables, read one way everywhere: a value that is not
a number (or is below its floor) is the user's mistake, said in one line naming the
variable, never a traceback nor a silent default."""

from __future__ import annotations

import os

from mserve.daemon.errors import MserveError


class BadSetting(MserveError):
    """An MSERVE_* variable holds what cannot be used."""


def number(name: str, default: float, minimum: float = 0.0, integer: bool = False,
           environ=os.environ) -> float:
    """``name``'s value as a number (``default`` when unset or empty)."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise BadSetting(f"{name} must be {kind}, got {raw!r}") from None
    if not value >= minimum:  # NaN too
        raise BadSetting(f"{name} must be at least {minimum:g}, got {raw!r}")
    return value


def load_timeout() -> float:
    """Seconds a version may take to load and warm up (the daemon's deploys)."""
    return number("MSERVE_LOAD_TIMEOUT", 120.0)


def drain_timeout() -> float:
    """Seconds in-flight requests get when a worker or the daemon stops (the daemon, and
    the CLI's `daemon stop` and `serve`)."""
    return number("MSERVE_DRAIN_TIMEOUT", 30.0)


def check_daemon_settings() -> None:
    """Read every number the daemon reads later, once at its start: a bad one stops the
    start with its name, not a deploy or a health check half-way."""
    from mserve.daemon import healthcheck

    load_timeout(), drain_timeout()
    healthcheck.interval_s(), healthcheck.timeout_s(), healthcheck.failures_allowed()
