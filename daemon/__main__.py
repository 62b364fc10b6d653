"""``python -m mserve.daemon``: the daemon in the foreground (what ``mserve daemon start``
spawns). Exit 3 means another daemon already holds this MSERVE_HOME; exit 78 (EX_CONFIG)
that its state is damaged: starting it again changes nothing until a person acts."""

import sys

from mserve.daemon.errors import MserveError
from mserve.daemon.main import AlreadyRunning, run
from mserve.daemon.statecheck import EXIT_STATE_DAMAGED, StateDamaged

try:
    sys.exit(run())
except AlreadyRunning as exc:
    print(f"Error: {exc.message}", file=sys.stderr)
    sys.exit(3)
except StateDamaged as exc:
    print(f"Error: {exc.message}", file=sys.stderr)
    sys.exit(EXIT_STATE_DAMAGED)
except MserveError as exc:
    print(f"Error: {exc.message}", file=sys.stderr)
    sys.exit(1)
