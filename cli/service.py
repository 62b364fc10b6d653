"""Service-manager units for ``mserve daemon install``: a systemd user unit (Linux) or a
launchd agent (macOS) that runs ``mserve daemon run`` and restarts it when it fails.

The service runs ``python -m mserve.daemon`` (what ``mserve daemon run`` runs; it exits 3
when another daemon already holds the home). Only the daemon is the service's process: its workers keep serving while it restarts
(systemd ``KillMode=process``, launchd ``AbandonProcessGroup``) and the restarted daemon
adopts them. ``MSERVE_SUPERVISED=1`` tells the daemon that the manager restarts it, so its
workers do not start a daemon of their own.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from xml.sax.saxutils import escape

from mserve.daemon.paths import APP, Paths

UNIT = "mserve"  # the default home's unit; another MSERVE_HOME's gets "mserve-HASH"
AGENT = "dev.mserve.daemon"


def unit_name(paths: Paths) -> str:
    """The service's name for this home: two homes are two installations, so two units
    (they overwrote one another). The default home keeps the plain name."""
    import hashlib

    import platformdirs

    default = Path(platformdirs.user_data_dir(APP, appauthor=False))
    if paths.home == default:
        return UNIT
    return f"{UNIT}-{hashlib.sha256(str(paths.home).encode()).hexdigest()[:8]}"


def manager() -> str:
    return "launchd" if sys.platform == "darwin" else "systemd"


def command() -> list[str]:
    """How the service starts the daemon: this interpreter, so the same installation."""
    return [sys.executable, "-m", "mserve.daemon"]  # ``mserve daemon run``, exit 3 if running


def unit_path(kind: str, paths: Paths) -> Path:
    if kind == "launchd":
        return Path.home() / "Library" / "LaunchAgents" / f"{agent_label(paths)}.plist"
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user" / f"{unit_name(paths)}.service"


def agent_label(paths: Paths) -> str:
    return AGENT + unit_name(paths)[len(UNIT):].replace("-", ".")


def systemd_unit(paths: Paths) -> str:
    def quoted(value: str) -> str:  # systemd's quoting: double quotes, backslash escapes
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    exec_start = " ".join(quoted(part) for part in command())
    return f"""[Unit]
Description=mserve model server daemon ({paths.home})
After=network.target

[Service]
Type=simple
ExecStart={exec_start}
Environment={quoted(f"MSERVE_HOME={paths.home}")}
Environment=MSERVE_SUPERVISED=1
Restart=on-failure
RestartSec=1
# Exit 3: another daemon already serves this MSERVE_HOME; 78: its state.db is damaged
# (see 'mserve daemon start --restore-backup'). Retrying changes nothing.
RestartPreventExitStatus=3 78
# Only the daemon: its workers keep serving while it restarts, and it adopts them.
KillMode=process
TimeoutStopSec=90

[Install]
WantedBy=default.target
"""


def launchd_agent(paths: Paths) -> str:
    args = "".join(f"\n    <string>{escape(part)}</string>" for part in command())
    log = escape(str(paths.daemon_log))
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
  <key>Label</key><string>{agent_label(paths)}</string>
  <key>ProgramArguments</key>
  <array>{args}
  </array>
  <key>EnvironmentVariables</key>
  <dict>
    <key>MSERVE_HOME</key><string>{escape(str(paths.home))}</string>
    <key>MSERVE_SUPERVISED</key><string>1</string>
  </dict>
  <key>RunAtLoad</key><true/>
  <key>KeepAlive</key><dict><key>SuccessfulExit</key><false/></dict>
  <key>AbandonProcessGroup</key><true/>
  <key>StandardOutPath</key><string>{log}</string>
  <key>StandardErrorPath</key><string>{log}</string>
</dict>
</plist>
"""


def render(kind: str, paths: Paths) -> str:
    return launchd_agent(paths) if kind == "launchd" else systemd_unit(paths)


def next_steps(kind: str, path: Path, paths: Paths) -> list[str]:
    """The commands that load the unit (after ``mserve daemon stop --keep-serving`` when a
    daemon runs already: the service's daemon then adopts its workers)."""
    if kind == "launchd":
        return [f"launchctl load -w {shlex.quote(str(path))}"]
    return ["systemctl --user daemon-reload",
            f"systemctl --user enable --now {unit_name(paths)}",
            "loginctl enable-linger $USER   # keep serving after you log out"]
