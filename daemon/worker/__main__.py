import sys

from mserve.daemon.worker.main import main

sys.exit(main(sys.argv))
