"""The node sampler: recorded NVML readings through the real code, and a daemon on a node
without a GPU (this one)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import DaemonProcess, wait_for
from prometheus_client import CollectorRegistry, generate_latest

from runwatch.daemon.exporter import NodeCollector
from runwatch.daemon.live import LiveView
from runwatch.daemon.sampler import GpuReading, Sampler, clamp
from runwatch.daemon.store import Store, StreamInfo, series


class Recorded:
    """A GPU source that replays readings (the thin interface the daemon reads through)."""

    def __init__(self, readings: list[list[GpuReading]]) -> None:
        self.readings = readings

    def read(self) -> list[GpuReading]:
        return self.readings.pop(0)

    def close(self) -> None:
        pass


def reading(util: float, temp: float = 60.0, pid: int = 4242) -> GpuReading:
    raw = {
        "gpu_utilization": util,
        "gpu_sm_active": 0.9,
        "gpu_memory_used_bytes": 8e9,
        "gpu_memory_total_bytes": 80e9,
        "gpu_power_watts": 650.0,
        "gpu_temperature_celsius": temp,
        "gpu_sm_clock_hertz": 1.98e9,
        "gpu_throttle_reasons": 4.0,
    }
    return GpuReading(
        0, "GPU-abc", "NVIDIA H100 80GB HBM3", {k: clamp(k, v) for k, v in raw.items()}, [(pid, 7.5e9)]
    )


def test_impossible_values_become_nan() -> None:
    assert math.isnan(clamp("gpu_utilization", 0xFFFFFFFF))
    assert math.isnan(clamp("gpu_utilization", 140.0))
    assert math.isnan(clamp("gpu_temperature_celsius", 400.0))
    assert math.isnan(clamp("gpu_power_watts", -3.0))
    assert math.isnan(clamp("gpu_sm_clock_hertz", None))
    assert clamp("gpu_utilization", 97.0) == 97.0


def test_recorded_readings_become_a_row_and_dcgm_style_series_with_runs_by_pid() -> None:
    sampler = Sampler(Recorded([[reading(97.0, temp=400.0)]]), None)
    sample = sampler.sample(now=1000.0)
    names, values = sample.row()
    row = dict(zip(names, values, strict=True))
    assert row["gpu_utilization/0"] == 97.0 and math.isnan(row["gpu_temperature_celsius/0"])
    assert "host_cpu_percent" in row and "host_memory_used_bytes" in row

    live = LiveView()
    live.add_stream(StreamInfo(1, "llama-7b", 3, 8, "node1", 4242, 1000, "0.1.0"))
    live.connected(1, +1)
    registry = CollectorRegistry()
    registry.register(NodeCollector(sampler, live))
    text = generate_latest(registry).decode()
    labels = 'gpu="0",model="NVIDIA H100 80GB HBM3",uuid="GPU-abc"'
    assert f"runwatch_gpu_utilization_ratio{{{labels}}} 0.97" in text
    assert f"runwatch_gpu_sm_active_ratio{{{labels}}} 0.9" in text
    assert f"runwatch_gpu_power_watts{{{labels}}} 650.0" in text
    assert "runwatch_gpu_temperature_celsius{" not in text  # NaN is not exported
    assert 'runwatch_gpu_process_memory_bytes{gpu="0",pid="4242",rank="3",run="llama-7b"} 7.5e+09' in text
    assert "runwatch_gpus_visible 1.0" in text


def test_a_gpu_read_failure_still_samples_the_host() -> None:
    class Broken:
        def read(self) -> list[GpuReading]:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")

        def close(self) -> None:
            pass

    sample = Sampler(Broken(), None).sample()
    assert sample.gpus == [] and "host_cpu_percent" in sample.host


def test_a_daemon_without_gpus_says_why_and_samples_the_host(rootdir: Path) -> None:
    d = DaemonProcess(rootdir, env={"RUNWATCH_SAMPLE_INTERVAL_SECONDS": "0.2"}).start()
    try:
        node = wait_for(lambda: (n := d.status()["node"]) and n["sampled_at"] and n, what="a node sample")
        assert node["gpus"] == [] and "NVML" in node["no_gpu_reason"]
        human = subprocess.run(
            [sys.executable, "-m", "runwatch.daemon", "status", "--socket", str(d.socket)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "no GPU visible" in human
        time.sleep(1.0)
        text = d.metrics_text()
        assert "runwatch_gpus_visible 0.0" in text and "runwatch_host_memory_used_bytes" in text
        assert "runwatch_train_host_cpu_percent" not in text  # the node stream is not a training run
        runs = json.loads(
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "runwatch.daemon",
                    "runs",
                    "--all",
                    "--json",
                    "--socket",
                    str(d.socket),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert runs == []
    finally:
        d.terminate()
    conn = Store.reader(d.store_path)
    host = os.uname().nodename
    run = next(r for (r,) in conn.execute("SELECT name FROM runs") if r.startswith("node:"))
    assert host.split(".")[0] in run
    steps, values = series(conn, run, 0, "host_memory_used_bytes")
    assert len(steps) >= 3 and (values > 0).all() and (steps[1:] > steps[:-1]).all()


def test_a_firing_that_asks_for_gpu_context_carries_each_gpus_state() -> None:
    from pathlib import Path as _Path

    import numpy as np

    from runwatch.daemon.rules.engine import Engine, StreamRef
    from runwatch.daemon.rules.spec import parse_rule_text
    from runwatch.daemon.sampler import describe_gpus

    sampler = Sampler(Recorded([[reading(97.0)]]), None)
    sampler.sample()
    rules = parse_rule_text(
        """
rules:
  - {name: spike, metric: grad_norm, when: value > 5, severity: critical, context: [gpu]}
""",
        _Path("r.yaml"),
    )
    engine = Engine(rules, gpu_state=lambda: describe_gpus(sampler.latest))
    [event] = engine.observe(
        StreamRef(1, "r", 0), 0, ("grad_norm",), np.array([1]), np.array([1.0]), np.array([[9.0]]), now=1.0
    )
    assert (
        event.context["gpus"] == "0: 97% busy, SM 90%, 7.5 GiB, 650 W, 60 °C"
        and "; GPUs: 0: 97% busy" in event.summary
    )


class EventNvml:
    """Stands in for pynvml's event calls (no GPU here): a queue of XID events per device.
    Mocked because no NVML can run on this machine; the calls and structures mirror
    nvidia-ml-py's (``nvmlEventSetWait_v2`` raising on NVML_ERROR_TIMEOUT)."""

    nvmlEventTypeXidCriticalError = 0x8
    NVML_TEMPERATURE_GPU, NVML_CLOCK_SM, NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC = 0, 1, 1, 0

    class Timeout(Exception):
        pass

    class Event:
        def __init__(self, device: str, code: int) -> None:
            self.device, self.eventData, self.eventType = device, code, 0x8

    def __init__(self, broken_board: str | None = None) -> None:
        self.queue: list[EventNvml.Event] = []
        self.registered: list[str] = []
        self.broken_board = broken_board

    def nvmlEventSetCreate(self) -> str:
        return "set"

    def nvmlDeviceRegisterEvents(self, handle: str, types: int, events: str) -> None:
        if handle == self.broken_board:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        assert types == self.nvmlEventTypeXidCriticalError and events == "set"
        self.registered.append(handle)

    def nvmlEventSetWait_v2(self, events: str, timeout_ms: int) -> Event:
        assert timeout_ms == 0  # the sampler never waits for an event
        if not self.queue:
            raise self.Timeout("NVML_ERROR_TIMEOUT")
        return self.queue.pop(0)

    def nvmlDeviceGetIndex(self, handle: str) -> int:
        return int(handle.removeprefix("gpu"))


def test_xid_errors_are_counted_per_gpu_and_a_rise_is_critical() -> None:
    from runwatch.daemon.sampler import NvmlSource

    nvml = EventNvml(broken_board="gpu2")
    source = NvmlSource(nvml, ["gpu0", "gpu1", "gpu2"])
    assert nvml.registered == ["gpu0", "gpu1"]  # a board without events does not stop the others
    first = source.read()
    assert [g.values["gpu_xid_errors"] for g in first][:2] == [0, 0]
    assert all(math.isnan(g.values["gpu_last_xid"]) for g in first)
    nvml.queue += [EventNvml.Event("gpu1", 79), EventNvml.Event("gpu1", 48), EventNvml.Event("gpu0", 94),
                   EventNvml.Event("gpu0", 13)]  # 13: the application's kernel faulted, not the GPU
    second = source.read()
    assert [g.values["gpu_xid_errors"] for g in second][:2] == [1, 2]
    assert math.isnan(second[2].values["gpu_xid_errors"])  # not watched: unknown, not 0
    assert [g.values["gpu_last_xid"] for g in second][:2] == [13, 48]
    # As stored and judged: the default pack's rule fires on the GPU whose count rose.
    from runwatch.daemon.paths import default_rules_dir
    from runwatch.daemon.rules.engine import Engine, StreamRef
    from runwatch.daemon.rules.spec import load_rules

    engine = Engine(load_rules([default_rules_dir()])[0])
    ref = StreamRef(1, "node:test", 0)
    events = []
    for step, sample in enumerate((first, second)):
        names, values = zip(*[(f"{k}/{g.index}", v) for g in sample for k, v in g.values.items()],
                            strict=True)
        events += engine.observe(ref, 1, tuple(names), np.array([step]), np.array([float(step)]),
                                 np.array([values], dtype=np.float64), float(step))
    fired = [(e.rule, e.metric) for e in events if e.state == "firing"]
    assert fired == [("gpu_xid_error", "gpu_xid_errors/0"), ("gpu_xid_error", "gpu_xid_errors/1")]
