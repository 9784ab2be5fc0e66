"""Disk and network rates of this node, for alerts that need context ("was the disk busy?").

``sample()`` is called once a second (the daemon's rule tick); ``rates()`` answers from the
last two samples, so asking costs nothing. psutil counters are system-wide: every disk and
every interface except loopback.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class _Counters:
    t: float
    disk_read: int
    disk_write: int
    disk_busy_ms: int
    net_recv: int
    net_sent: int


def _read() -> _Counters | None:
    try:
        disk = psutil.disk_io_counters()
        nets = psutil.net_io_counters(pernic=True)
    except (OSError, RuntimeError):
        return None
    recv = sum(n.bytes_recv for name, n in nets.items() if name != "lo")
    sent = sum(n.bytes_sent for name, n in nets.items() if name != "lo")
    if disk is None:
        return _Counters(time.monotonic(), 0, 0, 0, recv, sent)
    busy = int(getattr(disk, "busy_time", 0))
    return _Counters(time.monotonic(), disk.read_bytes, disk.write_bytes, busy, recv, sent)


class HostIO:
    """Rates between the last two samples; empty until two samples exist."""

    def __init__(self) -> None:
        self._prev: _Counters | None = None
        self._last: _Counters | None = None

    def sample(self) -> None:
        now = _read()
        if now is not None:
            self._prev, self._last = self._last, now

    def rates(self) -> dict[str, float]:
        a, b = self._prev, self._last
        if a is None or b is None or b.t <= a.t:
            return {}
        dt = b.t - a.t
        mb = 1e6
        return {
            "disk_read_mb_per_s": round((b.disk_read - a.disk_read) / dt / mb, 2),
            "disk_write_mb_per_s": round((b.disk_write - a.disk_write) / dt / mb, 2),
            "disk_busy_percent": round(min(100.0, (b.disk_busy_ms - a.disk_busy_ms) / (10 * dt)), 1),
            "net_recv_mb_per_s": round((b.net_recv - a.net_recv) / dt / mb, 2),
            "net_sent_mb_per_s": round((b.net_sent - a.net_sent) / dt / mb, 2),
        }

    def describe(self) -> str:
        r = self.rates()
        if not r:
            return "host I/O: not sampled yet"
        return (f"host: disk read {r['disk_read_mb_per_s']:g} MB/s, write {r['disk_write_mb_per_s']:g} MB/s,"
                f" busy {r['disk_busy_percent']:g}%; network in {r['net_recv_mb_per_s']:g} MB/s,"
                f" out {r['net_sent_mb_per_s']:g} MB/s")
