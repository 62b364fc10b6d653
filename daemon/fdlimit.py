"""Raise the soft limit on open files to the hard limit, as nginx and systemd services do.

The common default soft limit (``ulimit -n 1024``) is far below what a server holding
thousands of keep-alive connections needs, while the hard limit is usually much higher. Raising
the soft limit needs no privilege. Stdlib only: the daemon, the workers and the CLI share it.
"""

from __future__ import annotations

import logging

try:
    import resource
except ImportError:  # not on POSIX: nothing to raise
    resource = None

CEILING = 1 << 20  # enough for any one process; an "unlimited" hard limit is not a number to use
OPEN_MAX = 10240  # macOS refuses more than this whatever the hard limit says
log = logging.getLogger("mserve.fdlimit")


def raise_fd_limit(ceiling: int = CEILING) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one (at most ``ceiling``); idempotent.
    ``(soft, hard)`` as they stand afterwards, each at most ``ceiling`` (infinite included);
    ``(0, 0)`` where there is no such limit to read."""
    if resource is None:
        return 0, 0
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return 0, 0
    want = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
    for target in (want, min(want, OPEN_MAX)):
        if soft == resource.RLIM_INFINITY or soft >= target:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as exc:
            log.debug("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    return _finite(soft, ceiling), _finite(hard, ceiling)


def _finite(limit: int, ceiling: int) -> int:
    return ceiling if limit == resource.RLIM_INFINITY or limit > ceiling else limit
