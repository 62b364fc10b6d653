"""``python -m mserve.daemon``: the daemon in the foreground (what ``mserve daemon start``
spawns). Exit 3 means another daemon already holds this MSERVE_HOME."""

import sys

from mserve.daemon.errors import MserveError
from mserve.daemon.main import AlreadyRunning, run

try:
    sys.exit(run())
except AlreadyRunning as exc:
    print(f"Error: {exc.message}", file=sys.stderr)
    sys.exit(3)
except MserveError as exc:
    print(f"Error: {exc.message}", file=sys.stderr)
    sys.exit(1)
