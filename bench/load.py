"""Soak and load: what one node daemon holds with many ranks streaming at once (issue 11).

    python bench/load.py [--ranks 64] [--metrics 200] [--rate 10] [--duration 600]
                         [--ramp 1.5 --stage 60] [--json FILE]

A real daemon (default rule pack, drift monitors, exporter) runs as a subprocess. ``--ranks``
separate processes each speak the real protocol through the hook's own ``Sender`` (handshake,
SAMPLES frames, ACKs, spool): one step of ``--metrics`` values every 1/``--rate`` seconds, one
frame per step (the hook's most frame-hungry setting), a 130-bin histogram every 16 steps for
the drift monitor. Meanwhile the harness scrapes ``/metrics`` every 5 s and, every 50 ms, asks
the store (read-only) for each rank's newest step.

Reported: daemon CPU (share of one core), resident memory over time (and its slope over the
second half: flat means it levelled off), store size growth, ingest lag (from a step's send
time to its first sight in the store, measured to within the 50 ms probe), and points lost
(every step a rank sent, after its sender flushed, must be in the store).

With ``--ramp F`` the rate is multiplied by F every ``--stage`` seconds until the lag p99 of
a stage passes 1 s; then one more stage runs at twice that rate, to see how the daemon
degrades (memory, hooks spooling or dropping, the longest time a step spent handing its
values to the sender).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import psutil

import runwatch.daemon
from runwatch.daemon.client import Client, DaemonUnreachable


def _load_sender() -> Any:
    """The hook's sender module without ``runwatch.hooks`` (whose import pulls in torch: 64
    processes of it would not fit this machine's memory). The sender itself needs no torch."""
    path = Path(runwatch.daemon.__file__).parent.parent / "hooks" / "sender.py"
    spec = importlib.util.spec_from_file_location("runwatch_bench_sender", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


_sender = _load_sender()
Batch, Sender = _sender.Batch, _sender.Sender

HIST_BINS = 130
RULE_METRICS = ("loss", "grad_norm", "tokens_per_second", "token_efficiency", "step_duration_seconds",
                "data_wait_seconds", "forward_seconds", "learning_rate/0", "activation_norm/blocks.0",
                "activation_norm/blocks.1")


def metric_names(n: int) -> tuple[str, ...]:
    return RULE_METRICS + tuple(f"extra/m{i:03d}" for i in range(max(0, n - len(RULE_METRICS))))


def rank_main(sock: str, rank: int, ranks: int, metrics: int, rate: Any, stop: Any, spool: str,
              results: Any) -> None:
    """One simulated rank: a step of values every 1/rate s through the hook's real sender."""
    hello = {"protocol": 1, "role": "hook", "run": "load", "rank": rank, "world_size": ranks,
             "host": "bench", "pid": os.getpid(), "hook_version": "bench"}
    sender = Sender(Path(sock), hello, Path(spool) / f"load.rank{rank}.spool")
    names = metric_names(metrics)
    hist_names = names + tuple(f"hist/load/{i}" for i in range(HIST_BINS))
    rng = np.random.default_rng(rank)
    level = np.abs(rng.normal(1.0, 0.3, len(names))) + 0.1
    step, next_at, put_max = 0, time.monotonic(), 0.0
    while not stop.is_set():
        values = level * (1 + rng.normal(0, 0.02, len(names)))
        if step % 16 == 15:
            counts = np.histogram(rng.normal(0, 1, 256), bins=HIST_BINS - 2, range=(-4, 4))[0]
            row = np.concatenate([values, [0.0], counts, [0.0]])[None, :]
            batch = Batch(hist_names, np.array([step]), np.array([time.time()]), row)
        else:
            batch = Batch(names, np.array([step]), np.array([time.time()]), values[None, :])
        t0 = time.perf_counter()
        sender.put(batch)  # what a training step pays: it must never wait for the daemon
        put_max = max(put_max, time.perf_counter() - t0)
        step += 1
        next_at += 1.0 / rate.value
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_at = time.monotonic()  # behind: do not burst to catch up
    flushed = sender.flush(60)
    sender.close(10)
    results.put({"rank": rank, "steps": step, "dropped_points": sender.dropped_points, "flushed": flushed,
                 "put_max_s": put_max})


def probe_lag(db: Path, seen: dict[int, int]) -> list[float]:
    """Lag of each step first seen now: now minus its send time (the stored sample time)."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        rows = conn.execute("SELECT s.stream_id, s.step, s.time FROM samples s JOIN (SELECT stream_id,"
                            " MAX(step) AS m FROM samples GROUP BY stream_id) n ON s.stream_id = n.stream_id"
                            " AND s.step = n.m").fetchall()
        conn.close()
    except sqlite3.Error:
        return []
    now = time.time()
    lags = []
    for sid, step, t in rows:
        if step > seen.get(sid, -1):
            seen[sid] = step
            lags.append(now - t)
    return lags


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=64)
    p.add_argument("--metrics", type=int, default=200)
    p.add_argument("--rate", type=float, default=10.0, help="steps per second per rank")
    p.add_argument("--duration", type=float, default=600.0)
    p.add_argument("--ramp", type=float, default=0.0, help="multiply the rate by this every --stage s")
    p.add_argument("--stage", type=float, default=60.0)
    p.add_argument("--json")
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rw-load-"))
    sock, state, spool = root / "runwatch.sock", root / "state", root / "spool"
    spool.mkdir()
    log = open(root / "daemon.log", "wb")  # noqa: SIM115
    daemon = subprocess.Popen([sys.executable, "-m", "runwatch.daemon", "daemon", "--socket", str(sock),
                               "--state-dir", str(state), "--exporter-port", "0"], stdout=log,
                              stderr=subprocess.STDOUT,
                              env={**os.environ, "RUNWATCH_SAMPLE_INTERVAL_SECONDS": "5"})
    deadline = time.monotonic() + 60
    while True:
        try:
            with Client(sock) as c:
                exporter = c.query("status")["daemon"]["exporter"]
            break
        except DaemonUnreachable:
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit(f"daemon did not start; see {root / 'daemon.log'}") from None
            time.sleep(0.1)
    proc = psutil.Process(daemon.pid)
    db = state / "runwatch.db"
    ctx = mp.get_context("spawn")
    rate, stop, results = ctx.Value("d", a.rate), ctx.Event(), ctx.Queue()
    ranks = [ctx.Process(target=rank_main, args=(str(sock), r, a.ranks, a.metrics, rate, stop, str(spool),
                                                  results)) for r in range(a.ranks)]
    for r in ranks:
        r.start()
    started = time.monotonic()
    seen: dict[int, int] = {}
    timeline: list[dict[str, float]] = []
    stages: list[dict[str, float]] = []
    stage_lags: list[float] = []
    all_lags: list[float] = []
    stage_start, next_sample, scrapes = started, started, 0
    overloaded = False
    cpu0 = sum(proc.cpu_times()[:2])
    while time.monotonic() - started < a.duration:
        lags = probe_lag(db, seen)
        stage_lags += lags
        if time.monotonic() - started > 30:  # warm-up: connects, first commits, rule baselines
            all_lags += lags
        now = time.monotonic()
        if now >= next_sample:
            with urllib.request.urlopen(exporter, timeout=10) as r:
                scrapes += len(r.read()) > 0
            size = sum(f.stat().st_size for f in state.glob("runwatch.db*"))
            cpu = sum(proc.cpu_times()[:2])
            timeline.append({"t": round(now - started, 1), "rss_mb": proc.memory_info().rss / 2**20,
                             "store_mb": size / 2**20, "cpu_share": (cpu - cpu0) / 5.0})
            cpu0 = cpu
            next_sample += 5.0
        if a.ramp and now - stage_start >= a.stage:
            p99 = pct(stage_lags, 99)
            stages.append({"rate": rate.value, "points_per_s": rate.value * a.ranks * a.metrics,
                           "lag_p50": pct(stage_lags, 50), "lag_p99": p99, "rss_mb": timeline[-1]["rss_mb"]})
            print(f"stage: {rate.value:.1f} steps/s/rank ({stages[-1]['points_per_s']:,.0f} points/s): "
                  f"lag p50 {stages[-1]['lag_p50']:.3f}s p99 {p99:.3f}s, RSS {timeline[-1]['rss_mb']:.0f} MB",
                  flush=True)
            if overloaded:
                break
            if p99 > 1.0:
                # Fallen behind: one more stage at twice the rate, to see how it degrades.
                overloaded = True
                rate.value *= 2 / a.ramp
            rate.value *= a.ramp
            stage_lags, stage_start = [], now
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    stop.set()
    sent = [results.get(timeout=120) for _ in ranks]
    for r in ranks:
        r.join(timeout=30)
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(timeout=120)
    conn = sqlite3.connect(db)
    stored = dict(conn.execute("SELECT st.rank, COUNT(*) FROM samples s JOIN streams st"
                               " ON st.id = s.stream_id JOIN runs r ON r.id = st.run_id"
                               " WHERE r.name = 'load' GROUP BY st.rank"))
    conn.close()
    lost = sum(max(0, s["steps"] - stored.get(s["rank"], 0)) for s in sent)
    half = [x for x in timeline if x["t"] >= elapsed / 2]
    slope = float("nan")
    if len(half) > 2:
        slope = float(np.polyfit([x["t"] for x in half], [x["rss_mb"] for x in half], 1)[0]) * 60
    steps = sum(s["steps"] for s in sent)
    result = {
        "ranks": a.ranks, "metrics": a.metrics, "rate_steps_per_s": a.rate, "seconds": round(elapsed, 1),
        "steps_sent": steps, "points_sent": steps * a.metrics, "steps_lost": lost,
        "points_per_second": round(steps * a.metrics / elapsed),
        "dropped_points_in_hooks": sum(s["dropped_points"] for s in sent),
        "hook_put_max_s": round(max(s["put_max_s"] for s in sent), 4),
        "lag_p50_s": round(pct(all_lags, 50), 3), "lag_p99_s": round(pct(all_lags, 99), 3),
        "lag_max_s": round(max(all_lags, default=float("nan")), 3),
        "daemon_cpu_share_mean": round(float(np.mean([x["cpu_share"] for x in timeline[6:]] or [np.nan])), 3),
        "rss_mb_start": round(timeline[min(6, len(timeline) - 1)]["rss_mb"], 1),
        "rss_mb_end": round(timeline[-1]["rss_mb"], 1),
        "rss_mb_per_minute_second_half": round(slope, 2),
        "store_mb_end": round(timeline[-1]["store_mb"], 1),
        "store_mb_per_hour": round(timeline[-1]["store_mb"] / elapsed * 3600, 1),
        "scrapes": scrapes, "stages": stages, "timeline": timeline[::6],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "timeline"}, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return 0 if lost == 0 else 3


if __name__ == "__main__":
    sys.exit(main())
