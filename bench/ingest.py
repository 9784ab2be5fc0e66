"""Daemon ingest throughput: points per second the daemon stores, against SQLite's own ceiling.

What it measures
    * **ingest**: the real daemon (``python -m runwatch.daemon daemon --no-rules``; what
      the rule pack costs is ``bench/rules.py``'s question) runs as a subprocess in a
      temporary folder, pinned to one CPU. ``--ranks`` client processes, pinned to
      another CPU, each connect to its Unix socket, do the HELLO handshake as a hook
      (one run, one rank each) and send SAMPLES frames as fast as the daemon
      acknowledges them, with at most ``--window`` frames unacknowledged. An ACK means
      the frame is committed, so the rate is *points acknowledged during the measured
      interval / the interval*, after a warm-up. The daemon's CPU time over the interval
      gives points per daemon CPU-second as well. At the end the daemon gets SIGTERM and
      the store is counted: it must hold every acknowledged point.
    * **ceiling**: the same rows (stream, step, time, metric set, float64 blob) built in
      memory first, then only ``Store.insert_rows`` + commit is timed, in transactions as
      large as the daemon's mean commit, in a fresh store, on the same CPU. Disk timing is
      noisy, so this runs ``--ceiling-repeats`` times and the median counts.

Frames are realistic: by default 200 metrics (names like the hook's) x 10 steps, what a
hook flushing once a second sends at 10 steps/s. They are encoded once with
``protocol.encode_block`` / ``protocol.samples_frame``; per frame a client only patches the
sequence number, steps and times in place, so every frame is new data and the client
stays cheap.

Both measurements also report how their CPU spent the time (/proc/stat): the measured
code, other tasks, idle, I/O wait and hypervisor steal, so a disturbed run shows itself.
The stores go to the system temp folder (a disk here); ``--dir /dev/shm`` takes the disk
out of both and leaves CPU cost alone.

Targets (from the spec): ingest >= 0.5 x ceiling, and >= 500,000 points/s on one core.
The exit status is 0 whether or not they are met; it is 1 on an error, 2 on bad
arguments, and 3 when the store holds fewer points than were acknowledged.

    .venv/bin/python bench/ingest.py [--duration 10] [--metrics 200] [--steps-per-frame 10]
                                     [--ranks 4] [--dir /dev/shm] [--json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runwatch.daemon import protocol
from runwatch.daemon.client import Client
from runwatch.daemon.protocol import Kind
from runwatch.daemon.store import Store, count_points

TARGET_RATIO = 0.5
TARGET_POINTS_PER_SECOND = 500_000
STEP_SECONDS = 0.1  # the synthetic training clock: 10 steps per second
RUN_NAME = "bench"
EXIT_ERROR = 1
EXIT_LOST_POINTS = 3
_SEQ = struct.Struct("<Q")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The benchmark could not run; the message says what went wrong."""


# -- configuration ----------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    metrics: int
    steps_per_frame: int
    ranks: int
    duration: float
    warmup: float
    window: int
    daemon_cpu: int
    client_cpu: int
    ceiling_batch_frames: int | None
    ceiling_max_points: int
    ceiling_repeats: int
    folder: Path | None
    seed: int
    as_json: bool

    @property
    def points_per_frame(self) -> int:
        return self.metrics * self.steps_per_frame


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(
        description="Measure runwatch daemon ingest (points/s) against a plain SQLite insert ceiling."
    )
    p.add_argument("--metrics", type=int, default=200, help="metrics per step (default 200)")
    p.add_argument("--steps-per-frame", type=int, default=10, help="steps per SAMPLES frame (default 10)")
    p.add_argument("--ranks", type=int, default=4, help="client processes, one rank each (default 4)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring (default 2)")
    p.add_argument("--window", type=int, default=32, help="unacknowledged frames per client (default 32)")
    p.add_argument("--daemon-cpu", type=int, default=0, help="CPU the daemon and the ceiling run on")
    p.add_argument("--client-cpu", type=int, default=1, help="CPU the clients run on")
    p.add_argument("--ceiling-batch-frames", type=int, default=None,
                   help="frames per ceiling transaction (default: the daemon's mean frames per commit)")
    p.add_argument("--ceiling-max-points", type=int, default=200_000_000,
                   help="at most this many points are inserted for the ceiling (default 200M)")
    p.add_argument("--ceiling-repeats", type=int, default=3,
                   help="ceiling trials, each into a fresh store; the median is reported (default 3)")
    p.add_argument("--dir", type=Path, default=None,
                   help="where the temporary stores go (default: the system temp folder; "
                        "/dev/shm takes the disk out of both measurements)")
    p.add_argument("--seed", type=int, default=0, help="seed of the metric values")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    a = p.parse_args(argv)
    counts = (a.metrics, a.steps_per_frame, a.ranks, a.window, a.ceiling_repeats)
    if min(counts) < 1 or a.duration <= 0 or a.warmup < 0:
        p.error("--metrics, --steps-per-frame, --ranks, --window and --ceiling-repeats must be >= 1;"
                " --duration > 0")
    if a.metrics > protocol.MAX_METRICS_PER_BLOCK:
        p.error(f"--metrics is at most {protocol.MAX_METRICS_PER_BLOCK} (one block per frame)")
    cpus = os.sched_getaffinity(0)
    for flag, cpu in (("--daemon-cpu", a.daemon_cpu), ("--client-cpu", a.client_cpu)):
        if cpu not in cpus:
            p.error(f"{flag} {cpu}: this process may only use CPUs {sorted(cpus)}")
    return Config(a.metrics, a.steps_per_frame, a.ranks, a.duration, a.warmup, a.window,
                  a.daemon_cpu, a.client_cpu, a.ceiling_batch_frames, a.ceiling_max_points,
                  a.ceiling_repeats, a.dir, a.seed, a.json)


# -- frames -----------------------------------------------------------------------------


def metric_names(n: int) -> tuple[str, ...]:
    """Keys like the hook's: loss, grad norms, learning rates, per-layer norms, then padding."""
    hook = ["loss", "grad_norm", "step_duration_seconds", "hook_dropped_points",
            "learning_rate/0", "learning_rate/1", "token_efficiency", "tokens_per_second",
            "microbatch_grad_norm", "microbatch_grad_norm_std"]
    layers = [f"{base}/blocks.{i}" for i in range(24) for base in ("group_grad_norm", "activation_norm")]
    names = (hook + layers)[:n]
    return tuple(names + [f"metric_{i:03d}" for i in range(len(names), n)])


def step_values(names: tuple[str, ...], steps_per_frame: int, seed: int) -> np.ndarray:
    """One frame's worth of plausible values, float64[steps, metrics]: a healthy run's few
    percent of step-to-step noise, so a rule pack judges them without firing."""
    rng = np.random.default_rng(seed)
    return rng.normal(1.0, 0.03, size=(steps_per_frame, len(names)))


@dataclass(frozen=True)
class FrameTemplate:
    """An encoded SAMPLES frame whose seq, steps and times are patched per use."""

    data: bytes
    steps_offset: int
    n_steps: int
    n_points: int

    @classmethod
    def build(cls, names: tuple[str, ...], values: np.ndarray) -> FrameTemplate:
        n_steps = values.shape[0]
        block = protocol.encode_block(names, np.arange(n_steps), np.zeros(n_steps), values)
        data = protocol.samples_frame(0, [block])
        names_len = len("\n".join(names).encode())
        offset = protocol.HEADER.size + protocol.SAMPLES_HEAD.size + protocol.BLOCK_HEAD.size + names_len
        return cls(data, offset, n_steps, int(values.size))

    def stamp(self, seq: int, first_step: int, clock0: float) -> bytearray:
        """A copy for frame ``seq`` carrying steps ``first_step ..``."""
        buf = bytearray(self.data)
        _SEQ.pack_into(buf, protocol.HEADER.size, seq)
        steps = np.arange(first_step, first_step + self.n_steps, dtype="<i8")
        np.frombuffer(buf, dtype="<i8", count=self.n_steps, offset=self.steps_offset)[:] = steps
        times_offset = self.steps_offset + 8 * self.n_steps
        times = np.frombuffer(buf, dtype="<f8", count=self.n_steps, offset=times_offset)
        times[:] = clock0 + steps * STEP_SECONDS
        return buf


# -- clients ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSpec:
    socket_path: str
    rank: int
    world_size: int
    names: tuple[str, ...]
    values: np.ndarray
    window: int
    cpu: int
    warmup: float
    duration: float


@dataclass(frozen=True)
class Schedule:
    """Monotonic-clock instants shared by every process (CLOCK_MONOTONIC is system-wide)."""

    start: float
    measure_from: float
    end: float

    @classmethod
    def starting(cls, start: float, warmup: float, duration: float) -> Schedule:
        return cls(start, start + warmup, start + warmup + duration)


@dataclass
class ClientResult:
    rank: int
    frames_sent: int = 0
    frames_acked: int = 0
    points_acked: int = 0
    points_acked_measured: int = 0
    error: str | None = None


def handshake(spec: ClientSpec) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60.0)
    sock.connect(spec.socket_path)
    hello = {"protocol": protocol.PROTOCOL_VERSION, "role": "hook", "run": RUN_NAME, "rank": spec.rank,
             "world_size": spec.world_size, "host": platform.node(), "pid": os.getpid(),
             "hook_version": "bench"}
    sock.sendall(protocol.json_frame(Kind.HELLO, hello))
    kind, payload = read_frame(sock)
    if kind != Kind.WELCOME:
        raise BenchError(f"rank {spec.rank}: daemon refused the handshake: {payload!r}")
    return sock


def read_frame(sock: socket.socket) -> tuple[Kind, bytes]:
    header = recv_exactly(sock, protocol.HEADER.size)
    kind, length = protocol.parse_header(header, 1 << 30)
    return kind, recv_exactly(sock, length)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise BenchError("daemon closed the connection")
        buf += chunk
    return bytes(buf)


def parse_acks(buf: bytearray) -> int:
    """Consume the complete frames at the front of ``buf``; return how many were ACKs."""
    acks, pos = 0, 0
    while len(buf) - pos >= protocol.HEADER.size:
        length, kind = protocol.HEADER.unpack_from(buf, pos)
        end = pos + protocol.HEADER.size + length
        if len(buf) < end:
            break
        payload = bytes(buf[pos + protocol.HEADER.size : end])
        if kind == Kind.ERROR:
            raise BenchError(f"daemon sent ERROR: {protocol.decode_json(payload)}")
        if kind != Kind.ACK:
            raise BenchError(f"daemon sent an unexpected frame of kind {kind}")
        acks += 1
        pos = end
    del buf[:pos]
    return acks


def pump(sock: socket.socket, template: FrameTemplate, window: int, when: Schedule,
         result: ClientResult) -> None:
    """Send frames until ``when.end`` keeping ``window`` unacknowledged, then drain the acks."""
    clock0 = time.time()
    inflight = 0
    pending = bytearray()
    while True:
        if time.monotonic() < when.end:
            while inflight < window:
                frame = template.stamp(result.frames_sent, result.frames_sent * template.n_steps, clock0)
                sock.sendall(frame)
                result.frames_sent += 1
                inflight += 1
        elif inflight == 0:
            return
        chunk = sock.recv(1 << 16)
        now = time.monotonic()
        if not chunk:
            raise BenchError("daemon closed the connection")
        pending += chunk
        acks = parse_acks(pending)
        inflight -= acks
        result.frames_acked += acks
        result.points_acked += acks * template.n_points
        if when.measure_from <= now < when.end:
            result.points_acked_measured += acks * template.n_points


def client_main(spec: ClientSpec, ready: Any, go: Any, start_at: Any, results: Any) -> None:
    """One rank: connect, report ready, wait for the start signal, pump, report."""
    os.sched_setaffinity(0, {spec.cpu})
    result = ClientResult(spec.rank)
    try:
        template = FrameTemplate.build(spec.names, spec.values)
        sock = handshake(spec)
        ready.put(spec.rank)
        go.wait()
        when = Schedule.starting(start_at.value, spec.warmup, spec.duration)
        with sock:
            pump(sock, template, spec.window, when, result)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        ready.put(spec.rank)  # do not leave the parent waiting
    results.put(asdict(result))


# -- the daemon -------------------------------------------------------------------------


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket_path: Path
    store_path: Path
    log_path: Path

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def start_daemon(folder: Path, cpu: int, rules: bool = False) -> Daemon:
    """The daemon pinned to ``cpu``; ``rules`` runs the shipped rule pack, else ``--no-rules``."""
    socket_path = folder / "runwatch.sock"
    state_dir = folder / "state"
    log_path = folder / "daemon.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNWATCH_")}
    env["RUNWATCH_SAMPLE_INTERVAL_SECONDS"] = "0"  # the node sampler's rows are not ingest
    cmd = [sys.executable, "-m", "runwatch.daemon", "daemon", "--socket", str(socket_path),
           "--state-dir", str(state_dir), "--exporter-port", "0", "--log-level", "warning",
           *([] if rules else ["--no-rules"])]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    daemon = Daemon(proc, socket_path, state_dir / "runwatch.db", log_path)
    wait_listening(daemon, timeout=60.0)
    return daemon


def wait_listening(daemon: Daemon, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise BenchError(f"daemon exited with {daemon.proc.returncode}:\n{daemon.log_tail()}")
        if daemon.socket_path.is_socket():
            try:
                with Client(daemon.socket_path, timeout=5.0):
                    return
            except Exception:
                pass
        time.sleep(0.05)
    raise BenchError(f"daemon not listening on {daemon.socket_path} after {timeout:g}s")


def stop_daemon(daemon: Daemon, timeout: float = 60.0) -> None:
    daemon.proc.send_signal(signal.SIGTERM)
    try:
        rc = daemon.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        daemon.proc.kill()
        daemon.proc.wait()
        raise BenchError(f"daemon did not stop within {timeout:g}s of SIGTERM") from None
    if rc != 0:
        raise BenchError(f"daemon exited with {rc} after SIGTERM:\n{daemon.log_tail()}")


@dataclass(frozen=True)
class CoreTicks:
    """One CPU's counters from /proc/stat, in clock ticks."""

    busy: int
    iowait: int
    idle: int
    steal: int

    @classmethod
    def read(cls, cpu: int) -> CoreTicks:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith(f"cpu{cpu} "):
                user, nice, system, idle, iowait, irq, softirq, steal = map(int, line.split()[1:9])
                return cls(user + nice + system + irq + softirq, iowait, idle, steal)
        raise BenchError(f"CPU {cpu} is not in /proc/stat")

    def __sub__(self, other: CoreTicks) -> CoreTicks:
        return CoreTicks(self.busy - other.busy, self.iowait - other.iowait, self.idle - other.idle,
                         self.steal - other.steal)


@dataclass(frozen=True)
class CoreLoad:
    """How one CPU spent an interval, as fractions: the measured code, other processes, rest."""

    measured: float
    others: float
    iowait: float
    idle: float
    steal: float

    @classmethod
    def between(cls, before: CoreTicks, after: CoreTicks, measured_cpu_seconds: float) -> CoreLoad:
        d = after - before
        total = max(1, d.busy + d.iowait + d.idle + d.steal)
        measured = min(measured_cpu_seconds * _CLK_TCK, d.busy) / total
        return cls(measured, d.busy / total - measured, d.iowait / total, d.idle / total, d.steal / total)

    def describe(self, who: str) -> str:
        return (f"{who} {self.measured:.0%}, other tasks {self.others:.0%}, idle {self.idle:.0%},"
                f" I/O wait {self.iowait:.0%}, stolen by the hypervisor {self.steal:.0%}")


@dataclass(frozen=True)
class CpuTimes:
    """Seconds of CPU used by the daemon: the event-loop (main) thread and all the others."""

    loop: float
    others: float

    @property
    def total(self) -> float:
        return self.loop + self.others

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.loop - other.loop, self.others - other.others)


def _stat_cpu(path: Path) -> float:
    # Fields after "(comm)": utime and stime are the 14th and 15th of the whole line.
    fields = path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def daemon_cpu(pid: int) -> CpuTimes:
    loop, others = 0.0, 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            seconds = _stat_cpu(task / "stat")
        except (OSError, IndexError):
            continue  # a thread that ended meanwhile
        if int(task.name) == pid:
            loop += seconds
        else:
            others += seconds
    return CpuTimes(loop, others)


@dataclass(frozen=True)
class Counters:
    """The daemon's own counters, from its status query and Prometheus exporter."""

    frames: float
    points: float
    commits: float
    commit_seconds: float

    def __sub__(self, other: Counters) -> Counters:
        return Counters(self.frames - other.frames, self.points - other.points,
                        self.commits - other.commits, self.commit_seconds - other.commit_seconds)


def daemon_counters(socket_path: Path) -> Counters:
    with Client(socket_path) as client:
        status = client.query("status")
    values: dict[str, float] = {}
    url = status["daemon"]["exporter"]
    if url:
        with urllib.request.urlopen(url, timeout=10) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("runwatch_store_commit_duration_seconds_"):
                    name, _, value = line.partition(" ")
                    values[name] = float(value)
    return Counters(
        float(status["ingest"]["frames_total"]),
        float(status["ingest"]["points_total"]),
        values.get("runwatch_store_commit_duration_seconds_count", float("nan")),
        values.get("runwatch_store_commit_duration_seconds_sum", float("nan")),
    )


# -- the ingest run ---------------------------------------------------------------------


@dataclass
class IngestResult:
    points_per_second: float
    points_measured: int
    seconds: float
    points_acked_total: int
    points_stored: int
    frames_acked_per_rank: list[int]
    daemon_cpu_seconds: float
    daemon_loop_cpu_seconds: float
    daemon_other_threads_cpu_seconds: float
    points_per_daemon_cpu_second: float
    core: CoreLoad
    commits: float
    frames_per_commit: float
    mean_commit_ms: float
    writer_commit_busy_fraction: float


def sleep_until(instant: float) -> None:
    delay = instant - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def run_ingest(cfg: Config, names: tuple[str, ...], values: np.ndarray, folder: Path,
               rules: bool = False) -> IngestResult:
    os.sched_setaffinity(0, {cfg.client_cpu})  # keep this process off the daemon's CPU
    daemon = start_daemon(folder, cfg.daemon_cpu, rules)
    try:
        result = drive_clients(cfg, names, values, daemon)
    except BaseException:
        daemon.proc.kill()
        daemon.proc.wait()
        raise
    stop_daemon(daemon)
    conn = Store.reader(daemon.store_path)
    try:
        result.points_stored = count_points(conn)
    finally:
        conn.close()
    shutil.rmtree(daemon.store_path.parent)  # its pending writeback must not slow the ceiling down
    return result


def drive_clients(cfg: Config, names: tuple[str, ...], values: np.ndarray, daemon: Daemon) -> IngestResult:
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    start_at = ctx.Value("d", 0.0)
    procs = [
        ctx.Process(target=client_main, name=f"bench-rank-{rank}", args=(
            ClientSpec(str(daemon.socket_path), rank, cfg.ranks, names, values, cfg.window,
                       cfg.client_cpu, cfg.warmup, cfg.duration),
            ready, go, start_at, results))
        for rank in range(cfg.ranks)
    ]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        start = time.monotonic() + 0.1
        start_at.value = start
        go.set()
        when = Schedule.starting(start, cfg.warmup, cfg.duration)
        sleep_until(when.measure_from)
        counters0 = daemon_counters(daemon.socket_path)
        cpu0, core0 = daemon_cpu(daemon.proc.pid), CoreTicks.read(cfg.daemon_cpu)
        sleep_until(when.end)
        cpu1, core1 = daemon_cpu(daemon.proc.pid), CoreTicks.read(cfg.daemon_cpu)
        counters1 = daemon_counters(daemon.socket_path)
        client_results = [ClientResult(**results.get(timeout=120)) for _ in procs]
    except queue.Empty:
        raise BenchError(f"a client did not report within 120 s\ndaemon log:\n{daemon.log_tail()}") from None
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    errors = [f"rank {r.rank}: {r.error}" for r in client_results if r.error]
    if errors:
        raise BenchError("client failed: " + "; ".join(errors) + f"\ndaemon log:\n{daemon.log_tail()}")
    core = CoreLoad.between(core0, core1, (cpu1 - cpu0).total)
    return summarize(cfg, client_results, cpu1 - cpu0, core, counters1 - counters0)


def summarize(cfg: Config, clients: list[ClientResult], cpu: CpuTimes, core: CoreLoad,
              counters: Counters) -> IngestResult:
    measured = sum(r.points_acked_measured for r in clients)
    commits = counters.commits
    return IngestResult(
        points_per_second=measured / cfg.duration,
        points_measured=measured,
        seconds=cfg.duration,
        points_acked_total=sum(r.points_acked for r in clients),
        points_stored=-1,
        frames_acked_per_rank=[r.frames_acked for r in sorted(clients, key=lambda r: r.rank)],
        daemon_cpu_seconds=cpu.total,
        daemon_loop_cpu_seconds=cpu.loop,
        daemon_other_threads_cpu_seconds=cpu.others,
        points_per_daemon_cpu_second=measured / cpu.total if cpu.total > 0 else float("nan"),
        core=core,
        commits=commits,
        frames_per_commit=counters.frames / commits if commits else float("nan"),
        mean_commit_ms=1000 * counters.commit_seconds / commits if commits else float("nan"),
        writer_commit_busy_fraction=counters.commit_seconds / cfg.duration,
    )


# -- the ceiling ------------------------------------------------------------------------


Row = tuple[int, int, float, int, bytes]


@dataclass
class CeilingTrial:
    points_per_second: float
    seconds: float
    cpu_seconds: float
    core: CoreLoad


@dataclass
class CeilingResult:
    """The median of ``trials``, each into a fresh store."""

    points_per_second: float
    points: int
    rows: int
    seconds: float
    cpu_seconds: float
    core: CoreLoad
    batch_frames: int
    transactions: int
    trials: list[CeilingTrial]


def ceiling_batches(frames_per_rank: list[int], stream_ids: list[int], set_id: int, values: np.ndarray,
                    batch_frames: int, clock0: float) -> Iterator[list[Row]]:
    """The daemon's rows, frame by frame round-robin over ranks, ``batch_frames`` per list."""
    blobs = [row.tobytes() for row in values]
    n_steps = len(blobs)
    batch: list[Row] = []
    frames_in_batch = 0
    for frame in range(max(frames_per_rank, default=0)):
        for rank, stream_id in enumerate(stream_ids):
            if frame >= frames_per_rank[rank]:
                continue
            first = frame * n_steps
            batch.extend((stream_id, first + i, clock0 + (first + i) * STEP_SECONDS, set_id, blobs[i])
                         for i in range(n_steps))
            frames_in_batch += 1
            if frames_in_batch == batch_frames:
                yield batch
                batch, frames_in_batch = [], 0
    if batch:
        yield batch


def cap_frames(frames_per_rank: list[int], points_per_frame: int, max_points: int) -> list[int]:
    total = sum(frames_per_rank) * points_per_frame
    if total <= max_points:
        return frames_per_rank
    scale = max_points / total
    return [max(1, int(f * scale)) for f in frames_per_rank]


def run_ceiling(cfg: Config, names: tuple[str, ...], values: np.ndarray, frames_per_rank: list[int],
                batch_frames: int, folder: Path) -> CeilingResult:
    frames = cap_frames(frames_per_rank, cfg.points_per_frame, cfg.ceiling_max_points)
    trials: list[CeilingTrial] = []
    rows = transactions = 0
    for n in range(cfg.ceiling_repeats):
        path = folder / f"ceiling-{n}" / "runwatch.db"
        rows, transactions, seconds, cpu_seconds, core = ceiling_trial(
            cfg, names, values, frames, batch_frames, path)
        trials.append(CeilingTrial(rows * cfg.metrics / seconds, seconds, cpu_seconds, core))
        shutil.rmtree(path.parent)
    median = sorted(trials, key=lambda t: t.points_per_second)[len(trials) // 2]
    return CeilingResult(median.points_per_second, rows * cfg.metrics, rows, median.seconds,
                         median.cpu_seconds, median.core, batch_frames, transactions, trials)


def ceiling_trial(cfg: Config, names: tuple[str, ...], values: np.ndarray, frames_per_rank: list[int],
                  batch_frames: int, path: Path) -> tuple[int, int, float, float, CoreLoad]:
    """Rows, transactions, wall and CPU seconds and the CPU's load, of one timed insert."""
    store = Store.open(path)
    try:
        stream_ids = [store.register_stream(RUN_NAME, rank, cfg.ranks, platform.node(), os.getpid(),
                                            os.getuid(), "bench").id for rank in range(cfg.ranks)]
        with store.conn:
            set_id = store.metric_set_id(names)
        batches = list(ceiling_batches(frames_per_rank, stream_ids, set_id, values, batch_frames,
                                       time.time()))
        seconds, cpu_seconds, core = time_inserts(store, batches, cfg.daemon_cpu)
    finally:
        store.close()
    return sum(len(b) for b in batches), len(batches), seconds, cpu_seconds, core


def time_inserts(store: Store, batches: list[list[Row]], cpu: int) -> tuple[float, float, CoreLoad]:
    """Wall and CPU seconds of inserting and committing every batch, pinned to ``cpu``."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        core0, cpu0, t0 = CoreTicks.read(cpu), time.process_time(), time.perf_counter()
        for batch in batches:
            with store.conn:
                store.insert_rows(batch)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
        return seconds, cpu_seconds, CoreLoad.between(core0, CoreTicks.read(cpu), cpu_seconds)
    finally:
        os.sched_setaffinity(0, before)


# -- the report -------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


@dataclass
class Report:
    machine: dict[str, Any]
    config: dict[str, Any]
    frame_points: int
    frame_bytes: int
    ingest: IngestResult
    ceiling: CeilingResult
    ratio: float = field(init=False)
    meets_ratio: bool = field(init=False)
    meets_rate: bool = field(init=False)
    points_lost: int = field(init=False)

    def __post_init__(self) -> None:
        self.ratio = self.ingest.points_per_second / self.ceiling.points_per_second
        self.meets_ratio = self.ratio >= TARGET_RATIO
        self.meets_rate = self.ingest.points_per_second >= TARGET_POINTS_PER_SECOND
        self.points_lost = max(0, self.ingest.points_acked_total - self.ingest.points_stored)


def _met(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def format_report(r: Report) -> str:
    m, c, i, ce = r.machine, r.config, r.ingest, r.ceiling
    store_check = (
        "OK" if i.points_stored == i.points_acked_total
        else f"LOST {r.points_lost:,}" if r.points_lost
        else f"{i.points_stored - i.points_acked_total:,} more than acknowledged"
    )
    lines = [
        "runwatch daemon ingest benchmark",
        f"  machine    {m['cpu_model']}, {m['cores']} cores; daemon and ceiling on CPU {c['daemon_cpu']},"
        f" clients on CPU {c['client_cpu']}",
        f"  date       {m['date']}",
        f"  software   Python {m['python']}, SQLite {m['sqlite']}, numpy {m['numpy']}",
        f"  frame      {c['metrics']} metrics x {c['steps_per_frame']} steps = {r.frame_points:,} points,"
        f" {r.frame_bytes:,} bytes",
        f"  load       {c['ranks']} ranks, window {c['window']} frames each; {c['warmup']:g} s warm-up,"
        f" {c['duration']:g} s measured; rules off (--no-rules)",
        "",
        "ingest (real daemon over its Unix socket; ACK = committed)",
        f"  rate                 {i.points_per_second:>14,.0f} points/s"
        f"  ({i.points_measured:,} points in {i.seconds:g} s)",
        f"  daemon CPU           {i.daemon_cpu_seconds:>14.2f} s"
        f"  ({100 * i.daemon_cpu_seconds / i.seconds:.0f}% of one core: event loop"
        f" {i.daemon_loop_cpu_seconds:.2f} s, writer and exporter threads"
        f" {i.daemon_other_threads_cpu_seconds:.2f} s)",
        f"  per daemon CPU-s     {i.points_per_daemon_cpu_second:>14,.0f} points",
        f"  CPU {c['daemon_cpu']}                {i.core.describe('daemon')}",
        f"  commits              {i.commits:>14,.0f}  ({i.frames_per_commit:.1f} frames each,"
        f" mean {i.mean_commit_ms:.2f} ms; writer in commit {100 * i.writer_commit_busy_fraction:.0f}%"
        " of the time)",
        f"  store check          {i.points_stored:>14,} stored, {i.points_acked_total:,} acknowledged:"
        f" {store_check}",
        "",
        "ceiling (Store.insert_rows + commit of the same rows, built in memory first)",
        f"  rate                 {ce.points_per_second:>14,.0f} points/s"
        f"  ({ce.points:,} points, {ce.rows:,} rows in {ce.seconds:.2f} s,"
        f" CPU {ce.cpu_seconds:.2f} s)",
        f"  per CPU-s            {ce.points / ce.cpu_seconds:>14,.0f} points",
        f"  CPU {c['daemon_cpu']}                {ce.core.describe('inserts')}",
        f"  transactions         {ce.transactions:>14,}  ({ce.batch_frames} frames each)",
        f"  trials               {len(ce.trials):>14}  (median shown; "
        + ", ".join(f"{t.points_per_second:,.0f}" for t in ce.trials) + " points/s)",
        "",
        "targets",
        f"  ingest / ceiling     {r.ratio:>14.2f}   target >= {TARGET_RATIO:g}: {_met(r.meets_ratio)}",
        f"  ingest points/s      {i.points_per_second:>14,.0f}   target >= {TARGET_POINTS_PER_SECOND:,}:"
        f" {_met(r.meets_rate)}",
    ]
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------


def mean_batch_frames(ingest: IngestResult, fallback: int = 10) -> int:
    """The daemon's mean frames per commit, or ``fallback`` when its exporter gave none."""
    mean = ingest.frames_per_commit
    return max(1, round(mean)) if math.isfinite(mean) else fallback


def benchmark(cfg: Config) -> Report:
    names = metric_names(cfg.metrics)
    values = step_values(names, cfg.steps_per_frame, cfg.seed)
    template = FrameTemplate.build(names, values)
    with tempfile.TemporaryDirectory(prefix="runwatch-bench-", dir=cfg.folder) as tmp:
        folder = Path(tmp)
        ingest = run_ingest(cfg, names, values, folder)
        batch_frames = cfg.ceiling_batch_frames or mean_batch_frames(ingest)
        ceiling = run_ceiling(cfg, names, values, ingest.frames_acked_per_rank, batch_frames, folder)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items() if k != "as_json"}
    config["folder"] = str(cfg.folder or tempfile.gettempdir())
    return Report(machine(), config, template.n_points, len(template.data), ingest, ceiling)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        report = benchmark(cfg)
    except (BenchError, OSError, sqlite3.Error) as exc:
        print(f"bench/ingest.py: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if cfg.as_json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print(format_report(report))
    if report.points_lost:
        print(f"bench/ingest.py: the store holds {report.ingest.points_stored:,} points but"
              f" {report.ingest.points_acked_total:,} were acknowledged: {report.points_lost:,} LOST",
              file=sys.stderr)
        return EXIT_LOST_POINTS
    return 0


if __name__ == "__main__":
    sys.exit(main())
