"""Metric history retention: rollups that agree with the raw steps, pruning that only takes
rolled rows past the raw window, and a store file that levels off (issue 11)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DaemonProcess, wait_for

from runwatch.daemon import history
from runwatch.daemon.history import History, HistorySettings
from runwatch.daemon.store import Store

T0 = 1_699_999_200.0  # a whole hour (of unix time), so bucket edges are easy to reason about


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "runwatch.db")


def _insert(store: Store, stream_id: int, names: tuple[str, ...], steps: np.ndarray, times: np.ndarray,
            values: np.ndarray) -> None:
    with store.conn:
        set_id = store.metric_set_id(names)
        store.insert_rows((stream_id, int(s), float(t), set_id, v.astype("<f8").tobytes())
                          for s, t, v in zip(steps, times, values, strict=True))


def _drain(h: History, store: Store) -> None:
    while h.maintain(store.conn).more:
        pass


def test_rollups_agree_with_the_raw_steps_including_nonfinite_and_late_rows(tmp_path: Path) -> None:
    store = _store(tmp_path)
    a = store.register_stream("run-a", 0, 1, "h", 1, 0, "t").id
    rng = np.random.default_rng(0)
    # Two hours of steps every 7 s; every 10th step also carries a second metric set.
    steps = np.arange(0, 2 * 3600 // 7)
    times = T0 + steps * 7.0
    loss = rng.normal(3.0, 0.5, len(steps))
    loss[[5, 77, 300]] = [math.nan, math.inf, -math.inf]
    plain = steps % 10 != 0
    other = ~plain
    _insert(store, a, ("loss", "lr"), steps[plain], times[plain],
            np.c_[loss[plain], np.full(plain.sum(), 1e-3)])
    _insert(store, a, ("extra", "loss"), steps[other], times[other], np.c_[np.ones(other.sum()), loss[other]])
    clock = Clock(T0 + 2 * 3600 + 10)
    h = History(lambda: HistorySettings(chunk_rows=100), clock)  # many small passes: buckets merge
    _drain(h, store)

    conn = Store.reader(store.path)
    for resolution, seconds in history.RESOLUTIONS.items():
        got = history.points(conn, "run-a", 0, "loss", resolution)
        buckets = np.floor(times / seconds) * seconds
        assert [p["time"] for p in got] == sorted(set(buckets.tolist()))
        for p in got:
            inside = buckets == p["time"]
            values = loss[inside]
            finite = values[np.isfinite(values)]
            assert p["steps"] == inside.sum()
            assert (p["first_step"], p["last_step"]) == (steps[inside][0], steps[inside][-1])
            assert p["nonfinite"] == len(values) - len(finite)
            assert p["mean"] == pytest.approx(finite.mean(), rel=1e-12)
            assert (p["min"], p["max"]) == (finite.min(), finite.max())
            last = values[-1]
            assert p["last"] == last or (math.isnan(last) and math.isnan(p["last"]))

    # A hook's spool replayed after an outage: an old step arrives after its bucket was rolled.
    _insert(store, a, ("loss", "lr"), np.array([100_000]), np.array([T0 + 30.0]),
            np.array([[1000.0, 1e-3]]))
    _drain(h, store)
    first = history.points(conn, "run-a", 0, "loss", "1m")[0]
    buckets_first = np.floor(times / 60) * 60 == T0
    assert first["steps"] == 1 + buckets_first.sum()
    assert first["max"] == 1000.0 and first["last_step"] == 100_000 and first["last"] == 1000.0
    old = loss[buckets_first][np.isfinite(loss[buckets_first])]
    assert first["mean"] == pytest.approx((old.sum() + 1000.0) / (len(old) + 1))
    with pytest.raises(history.HistoryError, match="no metric 'nope'"):
        history.points(conn, "run-a", 0, "nope", "1m")
    with pytest.raises(history.HistoryError, match="no rank 3"):
        history.points(conn, "run-a", 3, "loss", "1m")


def test_pruning_keeps_the_raw_window_by_the_daemons_clock_and_never_an_unrolled_row(tmp_path: Path) -> None:
    store = _store(tmp_path)
    a = store.register_stream("run-a", 0, 1, "h", 1, 0, "t").id
    skewed = store.register_stream("run-a", 1, 2, "h", 1, 0, "t").id  # its clock is ten days fast
    clock = Clock(T0)
    settings = HistorySettings(raw_hours=0.25, minute_days=1 / 24, hour_days=1, chunk_rows=500)
    h = History(lambda: settings, clock)
    for minute in range(60):  # an hour, one step a second, arriving a minute at a time
        steps = np.arange(minute * 60, minute * 60 + 60)
        _insert(store, a, ("loss",), steps, T0 + steps, np.ones((60, 1)))
        _insert(store, skewed, ("loss",), steps, T0 + 10 * 86400 + steps, np.ones((60, 1)))
        clock.now = T0 + (minute + 1) * 60
        _drain(h, store)
    conn = Store.reader(store.path)
    for rank in (0, 1):
        raw = history.points(conn, "run-a", rank, "loss", "raw")
        # Stored in the last 15 minutes of the daemon's clock (the pass at minute 45 saw up to 2699).
        assert [p["step"] for p in raw] == list(range(2700, 3600)), rank
        assert sum(p["steps"] for p in history.points(conn, "run-a", rank, "loss", "1m")) == 3600

    # Rolled-up rows only: with a backlog not yet rolled, one pass prunes no further than it rolled.
    store2 = _store(tmp_path / "second")
    b = store2.register_stream("run-b", 0, 1, "h", 1, 0, "t").id
    clock.now = T0
    h2 = History(lambda: settings, clock)
    h2.maintain(store2.conn)  # a mark before anything is stored
    _insert(store2, b, ("loss",), np.arange(3000), T0 + np.arange(3000), np.ones((3000, 1)))
    h2.maintain(store2.conn)  # rolls 500
    clock.now = T0 + 3600
    done = h2.maintain(store2.conn)
    assert done.rolled == 500 and done.pruned_raw == 500 and done.more  # the first 500 only
    assert store2.conn.execute("SELECT min(step) FROM samples").fetchone()[0] == 500

    # Two hours on, the minute rollups are past their retention and go; hours stay.
    clock.now = T0 + 3 * 3600
    _drain(h, store)
    assert history.points(conn, "run-a", 0, "loss", "1m") == []
    assert [p["steps"] for p in history.points(conn, "run-a", 0, "loss", "1h")] == [3600]
    # The newest row is never pruned, so new rows keep getting rowids above the watermark.
    assert [p["step"] for p in history.points(conn, "run-a", 1, "loss", "raw")] == [3599]
    _insert(store, a, ("loss",), np.array([5000]), np.array([clock.now]), np.ones((1, 1)))
    _drain(h, store)
    assert history.points(conn, "run-a", 0, "loss", "1h")[-1]["first_step"] == 5000


def test_the_store_file_levels_off_under_steady_load(tmp_path: Path) -> None:
    """Freed pages are reused: after the raw window is full the file stops growing."""
    store = _store(tmp_path)
    ids = [store.register_stream("run-a", r, 4, "h", 1, 0, "t").id for r in range(4)]
    names = tuple(f"m{i}" for i in range(200))
    settings = HistorySettings(raw_hours=10 / 60, chunk_rows=5000)
    clock = Clock(T0)
    h = History(lambda: settings, clock)
    sizes = []
    step = 0
    for minute in range(60):  # an hour at 4 ranks x 1 step/s x 200 metrics; raw window 10 min
        steps = np.arange(step, step + 60)
        step += 60
        for sid in ids:
            _insert(store, sid, names, steps, T0 + steps, np.random.default_rng(minute).random((60, 200)))
        clock.now = T0 + step
        _drain(h, store)
        pages = store.conn.execute("PRAGMA page_count").fetchone()[0]
        sizes.append(pages * store.conn.execute("PRAGMA page_size").fetchone()[0])
    grown_late = sizes[-1] - sizes[29]
    raw_half_hour = 4 * 1800 * 200 * 8  # what 30 more minutes of raw steps would have added
    mb = [f"{sizes[i] / 1e6:.1f}" for i in (9, 29, 59)]
    print(f"store size after 10/30/60 min: {'/'.join(mb)} MB; the last 30 min added"
          f" {grown_late / 1e6:.2f} MB (rollups) against {raw_half_hour / 1e6:.1f} MB raw")
    assert grown_late < 0.15 * raw_half_hour, sizes


def test_a_daemon_rolls_up_prunes_and_the_cli_reads_history(rootdir: Path) -> None:
    root = rootdir
    d = DaemonProcess(root, env={"RUNWATCH_HISTORY": json.dumps(
        {"raw_hours": 4 / 3600, "maintenance_seconds": 0.5})}).start()
    record = root / "r.jsonl"
    try:
        r = subprocess.run([sys.executable, "-m", "runwatch.hooks.tinygpt", "--run", "hist", "--steps", "60",
                            "--socket", str(d.socket), "--record", str(record), "--sleep", "0.1"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        losses = [json.loads(line)["loss"] for line in record.read_text().splitlines()]

        def rolled() -> list | None:
            r = subprocess.run([sys.executable, "-m", "runwatch.daemon", "history", "hist", "loss",
                                "--resolution", "1h", "--store", str(d.store_path), "--json"],
                               capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            got = json.loads(r.stdout)
            return got if sum(p["steps"] for p in got) == len(losses) else None

        got = wait_for(rolled, 60, "every step rolled up")
        assert sum(p["mean"] * p["steps"] for p in got) == pytest.approx(sum(losses), rel=1e-9)

        def pruned() -> list | None:
            r = subprocess.run([sys.executable, "-m", "runwatch.daemon", "history", "hist", "loss",
                                "--resolution", "raw", "--store", str(d.store_path), "--json"],
                               capture_output=True, text=True)
            raw = json.loads(r.stdout)
            return raw if len(raw) < len(losses) else None

        raw = wait_for(pruned, 60, "raw steps older than 4 s pruned")
        assert raw[-1]["step"] == len(losses) - 1  # the newest row stays
        text = d.metrics_text()
        assert 'runwatch_history_rows_total{action="pruned_raw"}' in text
        assert 'runwatch_store_bytes{kind="file"}' in text
        # Asking for what is not there says what and exits non-zero, as every command does.
        r = subprocess.run([sys.executable, "-m", "runwatch.daemon", "history", "hist", "nope",
                            "--store", str(d.store_path)], capture_output=True, text=True)
        assert r.returncode != 0 and "no metric 'nope'" in r.stderr
    finally:
        d.terminate()
