"""One module per verb: parse, call the daemon, render."""
