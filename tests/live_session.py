"""A live daemon with real training behind it, for the dashboard and alert-rule tests: what the
exporter really exposes after runs have trained, spiked, been paused, dumped and rewound,
checkpointed (retention), skipped a shard, trained DDP on two ranks and been alerted about
(the log receiver), while a client sent a frame of the wrong protocol version, a person's pin
was refused and a broken rule file was refused and then fixed (a reload); optionally scraped
all along by a real Prometheus that evaluates given rule files.

The node sampler reads two recorded GPUs: a stand-in ``pynvml`` module (NVML's own function
names, as nvidia-ml-py exposes them) is put first on the daemon's ``PYTHONPATH``, so the
daemon's real sampler and exporter code run on a machine without a GPU. It reports the
training processes (found by their command line) as the GPUs' compute processes, so the
exporter maps GPU memory to runs and ranks as it does on a real node.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from runwatch.daemon import protocol
from runwatch.daemon.protocol import Kind
from tests.conftest import REPO, DaemonProcess, RawClient, cli, cli_run, free_port, short_tmpdir, wait_for

RUN = "obs"  # one process, two micro-batches a step, a bad batch at index 70, padding from 100
DDP_RUN = "obs-ddp"  # torchrun, two ranks (gloo)
SKIPPED_SHARD = "shard-003"

FAKE_PYNVML = '''
"""Two recorded H100s for the runwatch sampler (tests/live_session.py)."""
import math
import time
import types

import psutil

NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM = 1
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_GPM_METRICS_GET_VERSION = 1
NVML_GPM_METRIC_SM_UTIL = 2
_COUNT = 2


class NVMLError(Exception):
    pass


def nvmlInit():
    pass


def nvmlShutdown():
    pass


def nvmlDeviceGetCount():
    return _COUNT


def nvmlDeviceGetHandleByIndex(i):
    return i


def _wave(i, lo, hi):
    return lo + (hi - lo) * (0.5 + 0.5 * math.sin(time.time() / 7.0 + i))


def nvmlDeviceGetUtilizationRates(h):
    return types.SimpleNamespace(gpu=round(_wave(h, 85, 99)), memory=round(_wave(h, 30, 50)))


def nvmlDeviceGetMemoryInfo(h):
    return types.SimpleNamespace(used=int(_wave(h, 20e9, 60e9)), total=int(80e9), free=0)


def nvmlDeviceGetPowerUsage(h):
    return int(_wave(h, 450e3, 690e3))  # milliwatts


def nvmlDeviceGetTotalEnergyConsumption(h):
    return int(time.time() * 600e3)  # millijoules


def nvmlDeviceGetTemperature(h, sensor):
    return int(_wave(h, 55, 72))


def nvmlDeviceGetClockInfo(h, clock):
    return 1980  # MHz


def nvmlDeviceGetCurrentClocksEventReasons(h):
    return 0


def nvmlDeviceGetTotalEccErrors(h, kind, counter):
    return 0


def nvmlDeviceGetUUID(h):
    return f"GPU-recorded-{h}"


def nvmlDeviceGetName(h):
    return "NVIDIA H100 80GB HBM3"


def nvmlDeviceGetComputeRunningProcesses(h):
    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if any("observed_train.py" in c for c in cmd) and not any("torch.distributed" in c for c in cmd):
            pids.append(p.info["pid"])
    mine = sorted(pids)[h::_COUNT]
    return [types.SimpleNamespace(pid=pid, usedGpuMemory=int(12e9)) for pid in mine]


def nvmlGpmQueryDeviceSupport(h):
    return types.SimpleNamespace(isSupportedDevice=1)


def nvmlGpmSampleAlloc():
    return types.SimpleNamespace()


def nvmlGpmSampleGet(h, sample):
    sample.handle = h


def nvmlGpmSampleFree(sample):
    pass


def c_nvmlGpmMetricsGet_t():
    return types.SimpleNamespace(metrics=[types.SimpleNamespace(metricId=0, value=0.0)])


def nvmlGpmMetricsGet(query):
    query.metrics[0].value = _wave(getattr(query.sample2, "handle", 0), 60, 80)  # percent


nvmlEventTypeXidCriticalError = 0x8


def nvmlEventSetCreate():
    return "events"


def nvmlDeviceRegisterEvents(h, types, events):
    pass


def nvmlEventSetWait_v2(events, timeout_ms):
    raise NVMLError("NVML_ERROR_TIMEOUT")  # these recorded GPUs never report an XID


def nvmlEventSetFree(events):
    pass
'''

BROKEN_RULES = "rules:\n  - name: extra\n    when: ratio >> 2\n"
FIXED_RULES = """
rules:
  - name: loss_absurd
    summary: "loss {value:.3g} at step {step}"
    metric: loss
    when: value > 1000
    severity: info
"""

CONFIG = """
sample_interval_seconds = 1
retention_quiet_seconds = 0
retention_rescan_seconds = 1
[playbook]
watch_steps = 30
max_rewinds = 2
[retention]
confirm_steps = 5
[drift]
# Short enough that the 160-step run completes drift windows, so the drift series exist.
warmup_steps = 0
reference_steps = 32
min_reference_values = 64
window_values = 64
[alerting]
group_wait = "0s"
"""

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{|\s)")
_TYPE = re.compile(r"^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (\w+)")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created"), "info": ("_info",), "gauge": ("",)}


def sample_names(text: str) -> set[str]:
    """Names of the samples in an exposition (series that exist)."""
    return {m.group(1) for line in text.splitlines() if (m := _SAMPLE.match(line))}


def declared_names(text: str) -> set[str]:
    """Sample names the exposition declares with # TYPE (a labelled family with no child yet
    still declares itself: e.g. runwatch_retention_errors_total before the first error)."""
    out: set[str] = set()
    for line in text.splitlines():
        if m := _TYPE.match(line):
            name, kind = m.groups()
            if kind == "counter":  # prometheus_client declares counters by their _total name
                name = name.removesuffix("_total")
            out |= {name + s for s in SUFFIXES.get(kind, ("",))}
    return out


class LiveSession:
    """Start with :meth:`start`; :attr:`scrapes` holds every /metrics text read meanwhile."""

    def __init__(self, prometheus: bool = False, rule_files: tuple[Path, ...] = ()) -> None:
        self.root = short_tmpdir()
        self.want_prometheus = prometheus
        self.rule_files = rule_files
        self.daemon: DaemonProcess | None = None
        self.prom: subprocess.Popen[bytes] | None = None
        self.prom_port = 0
        self.scrapes: list[str] = []
        self.started = self.finished = 0.0

    # -- running --------------------------------------------------------------------------

    def start(self) -> LiveSession:
        try:
            return self._start()
        except BaseException:
            self.close()  # no daemon or Prometheus left behind
            raise

    def _start(self) -> LiveSession:
        fake = self.root / "fakenvml"
        fake.mkdir()
        (fake / "pynvml.py").write_text(FAKE_PYNVML)
        config = self.root / "runwatch.toml"
        config.write_text(CONFIG)
        self.extra_rules = self.root / "extra-rules"
        self.extra_rules.mkdir()
        (self.extra_rules / "extra.yaml").write_text(BROKEN_RULES)
        path = os.pathsep.join(p for p in (str(fake), os.environ.get("PYTHONPATH", "")) if p)
        args = ["--config", str(config), "--rules", str(REPO / "rules"), "--rules", str(self.extra_rules)]
        self.daemon = DaemonProcess(self.root, extra_args=args,
                                    env={"PYTHONPATH": path, "RUNWATCH_SAMPLE_INTERVAL_SECONDS": "1"}).start()
        if self.want_prometheus:
            self._start_prometheus()
        self.started = time.time()
        self._train()
        self.finished = time.time()
        return self

    def _start_prometheus(self) -> None:
        assert self.daemon is not None and self.daemon.exporter_url
        binary = shutil.which("prometheus")
        if binary is None:
            raise AssertionError("prometheus is not installed: make test installs Debian's 'prometheus'")
        target = urllib.parse.urlparse(self.daemon.exporter_url).netloc
        self.prom_port = free_port()
        config = self.root / "prometheus.yml"
        rules = "".join(f"  - {f}\n" for f in self.rule_files)
        config.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                          + (f"rule_files:\n{rules}" if rules else "")
                          + "scrape_configs:\n  - job_name: runwatch\n    static_configs:\n"
                          f"      - targets: ['{target}']\n")
        self.prom = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={self.root / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.prom_port}"],
            stdout=subprocess.DEVNULL, stderr=(self.root / "prometheus.log").open("wb"))
        wait_for(lambda: self.query("up"), timeout=60, what="Prometheus scraping the daemon")

    def _train(self) -> None:
        d = self.daemon
        assert d is not None
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        script = str(REPO / "tests" / "observed_train.py")
        common = ["--socket", str(d.socket), "--step-seconds", "0.05"]
        single = subprocess.Popen(
            [sys.executable, script, "--name", RUN, "--ckpt-dir", str(self.root / "ckpt"), "--accum", "2",
             "--bad", "70", "--padded-from", "100", "--steps", "160", *common],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        ddp = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
             f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-backend=c10d", script, "--name", DDP_RUN,
             "--ckpt-dir", str(self.root / "ckpt-ddp"), "--steps", "60", "--ckpt-every", "0", *common],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            # A person skips a shard mid-run (the skipped_* counters).
            wait_for(lambda: self._step(self._scrape_now(), RUN) >= 20 or single.poll() is not None,
                     timeout=120, what=f"run {RUN} at step 20")
            cli(d, "skip-shard", RUN, SKIPPED_SHARD)
            self._daemon_incidents()
            deadline = time.monotonic() + 240
            while (single.poll() is None or ddp.poll() is None) and time.monotonic() < deadline:
                self._scrape_now()
                time.sleep(0.5)
            for name, proc in (("single", single), ("ddp", ddp)):
                if proc.poll() is None:
                    proc.kill()
                out = proc.communicate()[0].decode(errors="replace")
                assert proc.returncode == 0, f"{name} training failed:\n{out[-4000:]}\n{d.log()[-3000:]}"
            # What follows a run: retention has looked at its checkpoints, the log receiver was told.
            sent = re.compile(r'^runwatch_notifications_total{receiver="log",result="sent"} [1-9]', re.M)
            wait_for(lambda: 'runwatch_retention_kept_bytes{run="obs"}' in self._scrape_now()
                     and sent.search(self.scrapes[-1]),
                     timeout=60, what="retention and notification series")
            if self.prom is not None:
                time.sleep(3)  # a few more scrapes after the end
        finally:
            for proc in (single, ddp):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    def _daemon_incidents(self) -> None:
        """What goes wrong around a daemon besides training: a client of another protocol
        version, a person's refused request, a rule file saved broken and then fixed."""
        d = self.daemon
        assert d is not None
        c = RawClient(d.socket)
        c.send(protocol.json_frame(Kind.HELLO, {"protocol": 99, "role": "hook", "run": "x"}))
        assert c.expect_error()
        c.close()
        assert cli_run(d, "pin", "no-such-run", "5").returncode != 0
        wait_for(lambda: re.search(r'^runwatch_rules_file_errors{file=".*extra.yaml"} [1-9]',
                                   self._scrape_now(), re.M), what="the broken rule file refused")
        time.sleep(2)  # a few scrapes of it
        (self.extra_rules / "extra.yaml").write_text(FIXED_RULES)
        wait_for(lambda: re.search(r'^runwatch_rules_reloads_total{result="ok"} [1-9]', self._scrape_now(),
                                   re.M), what="the fixed rule file reloaded")

    @staticmethod
    def _step(text: str, run: str) -> int:
        m = re.search(rf'^runwatch_train_step{{rank="0",run="{run}"}} (\S+)$', text, re.M)
        return int(float(m.group(1))) if m else -1

    def _scrape_now(self) -> str:
        assert self.daemon is not None
        text = self.daemon.metrics_text()
        self.scrapes.append(text)
        return text

    def close(self) -> None:
        if self.prom is not None:
            self.prom.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.prom.wait(timeout=30)
        if self.daemon is not None:
            with contextlib.suppress(Exception):
                self.daemon.terminate()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- what it saw ------------------------------------------------------------------------

    def names(self) -> set[str]:
        """Every sample name seen in any scrape."""
        return set().union(*(sample_names(t) for t in self.scrapes))

    def declared(self) -> set[str]:
        return set().union(*(declared_names(t) for t in self.scrapes))

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        return self._api("query", params)

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        return self._api("query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                         "step": str(step)})

    def _api(self, kind: str, params: dict[str, str]) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.prom_port}/api/v1/{kind}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:
            if exc.code in (400, 422):  # the expression does not parse, or fails to evaluate
                raise AssertionError(f"{params['query']!r}: {exc.read().decode(errors='replace')}") from None
            return []  # 503 while Prometheus starts
        except OSError:
            return []
        assert body["status"] == "success", body
        return list(body["data"]["result"])
