"""Where the daemon listens and keeps its state, resolved the same way by daemon and hook.

Stdlib only: the training hook imports this to find the socket, and must not pay for
pydantic or sqlite on import.

Resolution order for the socket (first that applies):
  1. ``$RUNWATCH_SOCKET``;
  2. ``$RUNTIME_DIRECTORY/runwatch.sock`` (systemd's ``RuntimeDirectory=runwatch``,
     which is ``/run/runwatch``);
  3. root: ``/run/runwatch/runwatch.sock``;
  4. a non-root user: ``$XDG_RUNTIME_DIR/runwatch/runwatch.sock``, else
     ``/tmp/runwatch-<uid>/runwatch.sock``.
A hook additionally falls back to the system socket when the per-user one does not
exist, so a training script finds a systemd-managed daemon without configuration.
"""

from __future__ import annotations

import os
from pathlib import Path

SOCKET_NAME = "runwatch.sock"
SYSTEM_SOCKET = Path("/run/runwatch") / SOCKET_NAME
SYSTEM_STATE_DIR = Path("/var/lib/runwatch")


def user_runtime_dir() -> Path:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "runwatch"
    return Path(f"/tmp/runwatch-{os.getuid()}")


def default_socket_path() -> Path:
    """The socket path a daemon started in this environment would use."""
    systemd_runtime = os.environ.get("RUNTIME_DIRECTORY")
    if systemd_runtime:
        # systemd may pass several colon-separated folders; ours is the first.
        return Path(systemd_runtime.split(":")[0]) / SOCKET_NAME
    if os.geteuid() == 0:
        return SYSTEM_SOCKET
    return user_runtime_dir() / SOCKET_NAME


def default_state_dir() -> Path:
    systemd_state = os.environ.get("STATE_DIRECTORY")
    if systemd_state:
        return Path(systemd_state.split(":")[0])
    if os.geteuid() == 0:
        return SYSTEM_STATE_DIR
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "runwatch"


def client_socket_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The socket a client (hook or CLI) should connect to."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("RUNWATCH_SOCKET")
    if env:
        return Path(env)
    own = default_socket_path()
    if not own.exists() and SYSTEM_SOCKET.exists():
        return SYSTEM_SOCKET
    return own


def default_rules_dir() -> Path:
    """The default rule pack shipped with runwatch (``rules/`` in the source tree, installed
    as ``runwatch/rules``). Copy it to ``/etc/runwatch/rules`` to change it."""
    return Path(__file__).resolve().parent.parent / "rules"
