"""CPU, memory, disk and network of this node: for the node sampler's series and for alerts
that need context ("was the disk busy?").

``sample()`` reads the counters; ``rates()`` answers from the last two samples, so asking
costs nothing. psutil counters are system-wide: every disk, every interface but loopback.
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
    """Rates between the last two samples (empty until there are two), CPU and memory."""

    def __init__(self) -> None:
        self._prev: _Counters | None = None
        self._last: _Counters | None = None
        self._cpu = 0.0
        self._mem = 0.0
        psutil.cpu_percent(None)  # the first call only starts the measurement

    def sample(self) -> None:
        now = _read()
        if now is not None:
            self._prev, self._last = self._last, now
        self._cpu = float(psutil.cpu_percent(None))
        self._mem = float(psutil.virtual_memory().used)

    def rates(self) -> dict[str, float]:
        """Stored series keys -> values (bytes per second, percent, bytes)."""
        out = {"host_cpu_percent": self._cpu, "host_memory_used_bytes": self._mem}
        a, b = self._prev, self._last
        if a is None or b is None or b.t <= a.t:
            return out
        dt = b.t - a.t
        out.update(
            {
                "host_disk_read_bytes_per_second": (b.disk_read - a.disk_read) / dt,
                "host_disk_write_bytes_per_second": (b.disk_write - a.disk_write) / dt,
                "host_disk_busy_percent": min(100.0, (b.disk_busy_ms - a.disk_busy_ms) / (10 * dt)),
                "host_net_recv_bytes_per_second": (b.net_recv - a.net_recv) / dt,
                "host_net_sent_bytes_per_second": (b.net_sent - a.net_sent) / dt,
            }
        )
        return out

    def context(self) -> dict[str, str]:
        """For an alert: the disk and network rates in MB/s."""
        r = self.rates()
        if "host_disk_read_bytes_per_second" not in r:
            return {}
        mb = 1e6
        return {
            "disk_read_mb_per_s": f"{r['host_disk_read_bytes_per_second'] / mb:.2f}",
            "disk_write_mb_per_s": f"{r['host_disk_write_bytes_per_second'] / mb:.2f}",
            "disk_busy_percent": f"{r['host_disk_busy_percent']:.1f}",
            "net_recv_mb_per_s": f"{r['host_net_recv_bytes_per_second'] / mb:.2f}",
            "net_sent_mb_per_s": f"{r['host_net_sent_bytes_per_second'] / mb:.2f}",
            "cpu_percent": f"{r['host_cpu_percent']:.0f}",
        }

    def describe(self) -> str:
        c = self.context()
        if not c:
            return "host I/O: not sampled yet"
        return (
            f"host: disk read {c['disk_read_mb_per_s']} MB/s, write {c['disk_write_mb_per_s']} MB/s,"
            f" busy {c['disk_busy_percent']}%; network in {c['net_recv_mb_per_s']} MB/s,"
            f" out {c['net_sent_mb_per_s']} MB/s; CPU {c['cpu_percent']}%"
        )
