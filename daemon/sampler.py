"""The node sampler: every GPU through NVML and the host through psutil, every few seconds.

Readings are stored like a training stream (run ``node:<host>``, rank 0, step = sample time
in milliseconds), so rules judge them (``gpu_utilization/<gpu>``) and the store keeps them,
and exported as ``runwatch_gpu_*`` / ``runwatch_host_*`` gauges beside dcgm-exporter's.

The GPU side is a thin interface (:class:`GpuSource`): :class:`NvmlSource` reads real
devices; a test feeds recorded readings. NVML "utilization" only says a kernel was running
(it reads 100% while deadlocked in NCCL); where the driver allows (Hopper and newer), SM
activity from GPM metrics is sampled too (``gpu_sm_active``). Impossible values (NVML's
0xFFFFFFFF sentinels, utilization over 100%, temperatures over 150 °C) become NaN.

XID critical errors (the driver's reports of a GPU fault: 48 double-bit ECC, 79 fallen off
the bus, ...) arrive as NVML events; each read drains them without waiting, and every GPU
reports how many it has had since the daemon started (``gpu_xid_errors``) and the last code
(``gpu_last_xid``), which the rule ``gpu_xid_error`` judges.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from runwatch.daemon.hostio import HostIO

log = logging.getLogger("runwatch.sampler")

#: Stored metric keys per GPU (``key/<index>``) and what each may hold.
GPU_LIMITS: dict[str, tuple[float, float]] = {
    "gpu_utilization": (0.0, 100.0),  # percent of time a kernel ran
    "gpu_memory_utilization": (0.0, 100.0),
    "gpu_sm_active": (0.0, 1.0),  # GPM: fraction of SM cycles active
    "gpu_memory_used_bytes": (0.0, 2.0**50),
    "gpu_memory_total_bytes": (0.0, 2.0**50),
    "gpu_power_watts": (0.0, 5000.0),
    "gpu_energy_joules": (0.0, 2.0**62),
    "gpu_temperature_celsius": (0.0, 150.0),
    "gpu_sm_clock_hertz": (0.0, 1e10),
    "gpu_throttle_reasons": (0.0, 2.0**63),
    "gpu_ecc_errors": (0.0, 2.0**62),
    "gpu_xid_errors": (0.0, 2.0**62),
    "gpu_last_xid": (0.0, 2.0**32),
}
MAX_EVENTS_PER_READ = 256  # a storm of XIDs is counted over several reads, never a busy loop
#: XIDs NVIDIA's XID catalogue lists as usually caused by the application, not the GPU: 13
#: graphics engine exception, 31 memory page fault, 43 GPU stopped processing, 45 preemptive
#: cleanup (a killed process). Logged and shown as the last code, not counted as GPU faults.
APPLICATION_XIDS = frozenset({13, 31, 43, 45})
_SENTINELS = {0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 0x7FFFFFFF}


@dataclass
class GpuReading:
    index: int
    uuid: str
    name: str
    values: dict[str, float]
    processes: list[tuple[int, float]] = field(default_factory=list)  # (pid, GPU memory bytes)


class GpuSource(Protocol):
    def read(self) -> list[GpuReading]: ...

    def close(self) -> None: ...


def clamp(key: str, value: float | None) -> float:
    """A reading, or NaN when it cannot be true."""
    if value is None:
        return math.nan
    value = float(value)
    if value in _SENTINELS or not math.isfinite(value):
        return math.nan
    lo, hi = GPU_LIMITS.get(key, (-math.inf, math.inf))
    return value if lo <= value <= hi else math.nan


class NvmlSource:
    """Real GPUs. :meth:`open` says why when there are none to read."""

    def __init__(self, nvml: Any, handles: list[Any]) -> None:
        self.nvml = nvml
        self.handles = handles
        self._xid_count = [0] * len(handles)
        self._last_xid: list[int | None] = [None] * len(handles)
        self._xid_watched: set[int] = set()  # GPUs whose XID events NVML delivers
        self._events = self._watch_xids()
        self._gpm: dict[int, Any] = {}  # index -> previous GPM sample, where supported
        for i, h in enumerate(handles):
            try:
                if nvml.nvmlGpmQueryDeviceSupport(h).isSupportedDevice:
                    sample = nvml.nvmlGpmSampleAlloc()
                    nvml.nvmlGpmSampleGet(h, sample)
                    self._gpm[i] = sample
            except Exception:  # GPM needs Hopper+ and a recent driver; utilization still works
                pass

    @classmethod
    def open(cls) -> NvmlSource | str:
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as exc:
            return f"NVML unavailable ({type(exc).__name__}: {exc})"
        if not handles:
            return "NVML found no GPU"
        return cls(pynvml, handles)

    def _watch_xids(self) -> Any:
        n = self.nvml
        try:
            events = n.nvmlEventSetCreate()
        except Exception as exc:
            log.warning("NVML events unavailable (%s): XID errors are not watched", exc)
            return None
        for i, h in enumerate(self.handles):
            try:
                n.nvmlDeviceRegisterEvents(h, n.nvmlEventTypeXidCriticalError, events)
                self._xid_watched.add(i)
            except Exception as exc:  # e.g. not supported on this board
                log.warning("GPU %d: XID events not available (%s)", i, exc)
        return events

    def _drain_xids(self) -> None:
        if self._events is None:
            return
        n = self.nvml
        for _ in range(MAX_EVENTS_PER_READ):
            try:
                data = n.nvmlEventSetWait_v2(self._events, 0)
            except Exception:  # NVML_ERROR_TIMEOUT: nothing more waiting (or the set broke)
                return
            try:
                index = int(n.nvmlDeviceGetIndex(data.device))
            except Exception:
                index = -1
            if not 0 <= index < len(self.handles):
                log.error("XID %s on a GPU NVML cannot name", data.eventData)
                continue
            code = int(data.eventData)
            self._last_xid[index] = code
            if code in APPLICATION_XIDS:
                log.warning("GPU %d reported XID %d (usually the application's fault, not the GPU's)",
                            index, code)
                continue
            self._xid_count[index] += 1
            log.error("GPU %d reported XID %d (a critical GPU error)", index, code)

    def close(self) -> None:
        if self._events is not None:
            with contextlib.suppress(Exception):
                self.nvml.nvmlEventSetFree(self._events)
        for sample in self._gpm.values():
            with contextlib.suppress(Exception):
                self.nvml.nvmlGpmSampleFree(sample)
        with contextlib.suppress(Exception):
            self.nvml.nvmlShutdown()

    def _get(self, fn: str, *args: Any) -> Any:
        try:
            return getattr(self.nvml, fn)(*args)
        except Exception:  # not supported on this GPU, or a transient error: that value is missing
            return None

    def read(self) -> list[GpuReading]:
        n = self.nvml
        self._drain_xids()
        out = []
        for i, h in enumerate(self.handles):
            util = self._get("nvmlDeviceGetUtilizationRates", h)
            mem = self._get("nvmlDeviceGetMemoryInfo", h)
            power = self._get("nvmlDeviceGetPowerUsage", h)
            energy = self._get("nvmlDeviceGetTotalEnergyConsumption", h)
            values = {
                "gpu_utilization": getattr(util, "gpu", None),
                "gpu_memory_utilization": getattr(util, "memory", None),
                "gpu_memory_used_bytes": getattr(mem, "used", None),
                "gpu_memory_total_bytes": getattr(mem, "total", None),
                "gpu_power_watts": None if power is None else power / 1000.0,
                "gpu_energy_joules": None if energy is None else energy / 1000.0,
                "gpu_temperature_celsius": self._get("nvmlDeviceGetTemperature", h, n.NVML_TEMPERATURE_GPU),
                "gpu_sm_clock_hertz": (lambda c: None if c is None else c * 1e6)(
                    self._get("nvmlDeviceGetClockInfo", h, n.NVML_CLOCK_SM)
                ),
                "gpu_throttle_reasons": self._get("nvmlDeviceGetCurrentClocksEventReasons", h),
                "gpu_ecc_errors": self._get(
                    "nvmlDeviceGetTotalEccErrors",
                    h,
                    n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                    n.NVML_VOLATILE_ECC,
                ),
                "gpu_sm_active": self._sm_active(i, h),
                "gpu_xid_errors": self._xid_count[i] if i in self._xid_watched else None,
                "gpu_last_xid": self._last_xid[i],
            }
            procs = self._get("nvmlDeviceGetComputeRunningProcesses", h) or []
            uuid = self._get("nvmlDeviceGetUUID", h) or f"gpu-{i}"
            name = self._get("nvmlDeviceGetName", h) or "unknown"
            out.append(
                GpuReading(
                    i,
                    uuid if isinstance(uuid, str) else uuid.decode(),
                    name if isinstance(name, str) else name.decode(),
                    {k: clamp(k, v) for k, v in values.items()},
                    [(int(p.pid), float(p.usedGpuMemory or 0)) for p in procs],
                )
            )
        return out

    def _sm_active(self, i: int, h: Any) -> float | None:
        previous = self._gpm.get(i)
        if previous is None:
            return None
        n = self.nvml
        try:
            current = n.nvmlGpmSampleAlloc()
            n.nvmlGpmSampleGet(h, current)
            query = n.c_nvmlGpmMetricsGet_t()
            query.version = n.NVML_GPM_METRICS_GET_VERSION
            query.numMetrics = 1
            query.sample1 = previous
            query.sample2 = current
            query.metrics[0].metricId = n.NVML_GPM_METRIC_SM_UTIL
            n.nvmlGpmMetricsGet(query)
            n.nvmlGpmSampleFree(previous)
            self._gpm[i] = current
            return float(query.metrics[0].value) / 100.0
        except Exception:
            return None


@dataclass
class NodeSample:
    time: float
    gpus: list[GpuReading]
    host: dict[str, float]

    def row(self) -> tuple[tuple[str, ...], list[float]]:
        """The sample as one stored row: (metric keys, values)."""
        names: list[str] = []
        values: list[float] = []
        for g in self.gpus:
            for key, value in g.values.items():
                names.append(f"{key}/{g.index}")
                values.append(value)
        for key, value in self.host.items():
            names.append(key)
            values.append(value)
        return tuple(names), values


def _show(values: dict[str, float], key: str, fmt: str, scale: float = 1.0) -> str | None:
    x = values.get(key, math.nan)
    return None if math.isnan(x) else fmt.format(x * scale)


def describe_gpus(sample: NodeSample | None) -> str | None:
    """One line for an alert: each GPU's utilization, SM activity, memory, power and temperature."""
    if sample is None or not sample.gpus:
        return None
    parts = []
    for g in sample.gpus:
        v = g.values
        fields = [
            _show(v, "gpu_utilization", "{:.0f}% busy"),
            _show(v, "gpu_sm_active", "SM {:.0%}"),
            _show(v, "gpu_memory_used_bytes", "{:.1f} GiB", 2.0**-30),
            _show(v, "gpu_power_watts", "{:.0f} W"),
            _show(v, "gpu_temperature_celsius", "{:.0f} °C"),
        ]
        parts.append(f"{g.index}: " + ", ".join(f for f in fields if f))
    return "; ".join(parts)


class Sampler:
    """Reads the node; ``latest`` is the last sample (for status and the exporter)."""

    def __init__(self, gpus: GpuSource | None, no_gpu_reason: str | None) -> None:
        self.gpus = gpus
        self.no_gpu_reason = no_gpu_reason
        self.host = HostIO()
        self.latest: NodeSample | None = None
        if gpus is None:
            log.warning("no GPU visible: %s; sampling the host only", no_gpu_reason)

    @classmethod
    def open(cls) -> Sampler:
        source = NvmlSource.open()
        if isinstance(source, str):
            return cls(None, source)
        return cls(source, None)

    def sample(self, now: float | None = None) -> NodeSample:
        gpus: list[GpuReading] = []
        if self.gpus is not None:
            try:
                gpus = self.gpus.read()
            except Exception as exc:
                log.error("reading the GPUs failed (%s); the host is still sampled", exc)
        self.host.sample()
        sample = NodeSample(time.time() if now is None else now, gpus, self.host.rates())
        self.latest = sample
        return sample

    def close(self) -> None:
        if self.gpus is not None:
            self.gpus.close()
