"""The mserve command line: thin commands over the daemon's control API."""
