"""systemd's service notification protocol (sd_notify(3)), spoken directly: no libsystemd.

Contract:

* Messages go as one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named by
  ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). When it is unset (not
  started by systemd, or ``Type=`` is not ``notify``) every call is a no-op returning False.
* :func:`ready` sends ``READY=1`` (with a ``STATUS=`` line): the service calls it once its socket
  accepts connections and its exporter is up, so ``systemctl start`` returns only then and
  units ordered ``After=runwatch.service`` find a working daemon.
* :func:`watchdog_interval` is sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` (positive integer, in
  microseconds) when ``$WATCHDOG_PID`` is unset or names this process; None otherwise.
  :class:`Watchdog` sends ``WATCHDOG=1`` every half of it from the asyncio loop, and only while
  the health check passes (the service's: its writer thread answered the no-op it was handed
  one ping earlier). A wedged event loop or a stuck writer therefore stops the pings and
  systemd restarts the daemon (``WatchdogSec=`` with ``Restart=on-failure``).
* :func:`stopping` sends ``STOPPING=1`` when draining starts; :func:`reloading` wraps a
  configuration reload in ``RELOADING=1`` (with ``MONOTONIC_USEC=``) ... ``READY=1``.
* Nothing here raises of its own (:func:`reloading` re-raises what the reload raised): a failed
  send is logged once (then at debug level) and the daemon runs on. A send never blocks the
  caller for more than :data:`SEND_TIMEOUT` seconds.

Only this process sends (the unit says ``NotifyAccess=main``); ``$NOTIFY_SOCKET`` is read at
each call, so a test can set it before starting the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger("runwatch.sdnotify")

SEND_TIMEOUT = 1.0
_warned: set[str] = set()


def _address() -> str | None:
    """``$NOTIFY_SOCKET`` as a socket address (abstract names start with a NUL), or None."""
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw:
        return None
    if raw.startswith("@"):
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    _warn_once("address", "NOTIFY_SOCKET=%r is neither a path nor an abstract name (@...); "
               "systemd notifications are off", raw)
    return None


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if key in _warned:
        log.debug(msg, *args)
    else:
        _warned.add(key)
        log.warning(msg, *args)


def notify(*lines: str) -> bool:
    """Send ``lines`` (``KEY=VALUE`` each) as one notification. True when it was sent."""
    address = _address()
    if address is None:
        return False
    message = "\n".join(line.replace("\n", " ") for line in lines).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.sendto(message, address)
    except OSError as exc:
        _warn_once("send", "cannot notify systemd on %s: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def ready(status: str | None = None) -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def stopping(status: str | None = "draining: committing and acknowledging what was received") -> bool:
    return notify("STOPPING=1", *([f"STATUS={status}"] if status else []))


def reloading(reload: Callable[[], Any], status: str | None = None) -> None:
    """Run ``reload()`` between ``RELOADING=1`` and ``READY=1`` (for ``systemctl reload``).
    Exceptions from ``reload`` propagate; READY=1 is sent regardless."""
    notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
    try:
        reload()
    finally:
        ready(status)


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds systemd expects pings within, or None (sd_watchdog_enabled)."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    try:
        value = int(usec)
        if pid and int(pid) != os.getpid():
            return None  # meant for another process (our parent, say)
    except ValueError:
        _warn_once("watchdog", "WATCHDOG_USEC=%r / WATCHDOG_PID=%r are not integers; "
                   "watchdog pings are off", usec, pid)
        return None
    return value / 1e6 if value > 0 else None


def watchdog() -> bool:
    return notify("WATCHDOG=1")


class Watchdog:
    """Pings ``WATCHDOG=1`` every ``interval / 2`` seconds while ``healthy()`` says so.

    ``probe``, when given, is called at each ping and returns a future that must be done by
    the next one (the service probes its writer thread with a no-op call): an unanswered
    probe withholds the ping, so a stuck thread is restarted as a wedged loop is.
    """

    def __init__(self, interval: float, probe: Callable[[], Future[Any]] | None = None,
                 healthy: Callable[[], bool] | None = None) -> None:
        self.period = interval / 2
        self._probe = probe
        self._healthy = healthy
        self._pending: Future[Any] | None = None
        self._since = time.monotonic()
        self.sent = 0
        self.withheld = 0

    @classmethod
    def start(cls, probe: Callable[[], Future[Any]] | None = None,
              healthy: Callable[[], bool] | None = None) -> asyncio.Task[None] | None:
        """The ping task when systemd asked for a watchdog, else None."""
        interval = watchdog_interval()
        if interval is None or _address() is None:
            return None
        dog = cls(interval, probe, healthy)
        log.info("systemd watchdog: %.3g s, pinging every %.3g s while healthy", interval, dog.period)
        return asyncio.get_running_loop().create_task(dog.run(), name="runwatch-sd-watchdog")

    def check(self) -> str | None:
        """None when healthy, else why not."""
        try:
            if self._healthy is not None and not self._healthy():
                return "health check failed"
            if self._probe is not None:
                if self._pending is not None and not self._pending.done():
                    return f"writer thread has not answered for {time.monotonic() - self._since:.1f} s"
                self._pending, self._since = self._probe(), time.monotonic()
        except Exception as exc:  # a failing check is unhealthy, never a crash
            return f"health check raised {exc!r}"
        return None

    async def run(self) -> None:
        while True:
            problem = self.check()
            if problem is None:
                if watchdog():
                    self.sent += 1
            else:
                self.withheld += 1
                log.warning("systemd watchdog ping withheld: %s", problem)
            await asyncio.sleep(self.period)

