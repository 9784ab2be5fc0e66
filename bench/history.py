"""Metric-history retention under the soak's load, in compressed time (issue 11).

    python bench/history.py [--ranks 64] [--metrics 200] [--rate 10] [--hours 3] [--raw-hours 1]

Writes what ``--ranks`` ranks x ``--metrics`` metrics x ``--rate`` steps/s would store over
``--hours`` of (injected) time into a real store, a simulated minute at a time, and runs the
daemon's history maintenance after each minute as the daemon does. Reports the cost of
rolling up and pruning per raw row, how the store's size levels off once the raw window is
full, and the bytes a 1-minute and a 1-hour rollup take, from which a week's disk is projected.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from runwatch.daemon.history import History, HistorySettings
from runwatch.daemon.store import Store


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=64)
    p.add_argument("--metrics", type=int, default=200)
    p.add_argument("--rate", type=float, default=10.0, help="steps per second per rank")
    p.add_argument("--hours", type=float, default=3.0, help="simulated time")
    p.add_argument("--raw-hours", type=float, default=1.0)
    p.add_argument("--dir", type=Path, default=None)
    a = p.parse_args()

    folder = Path(a.dir or tempfile.mkdtemp(prefix="rw-history-"))
    store = Store.open(folder / "runwatch.db")
    ids = [store.register_stream("load", r, a.ranks, "bench", 1, 0, "bench").id for r in range(a.ranks)]
    names = tuple(f"m{i:03d}" for i in range(a.metrics))
    now = [1_699_999_200.0]
    settings = HistorySettings(raw_hours=a.raw_hours)
    history = History(lambda: settings, lambda: now[0])
    rng = np.random.default_rng(0)
    per_minute = int(60 * a.rate)
    step, minutes = 0, int(a.hours * 60)
    rolled = pruned = 0
    maintain_s = insert_s = 0.0
    sizes: list[tuple[int, float]] = []
    values = rng.random((per_minute, a.metrics))
    with store.conn:
        set_id = store.metric_set_id(names)
    for minute in range(minutes):
        steps = np.arange(step, step + per_minute)
        times = now[0] + (steps - step) / a.rate
        t0 = time.perf_counter()
        with store.conn:
            for sid in ids:
                store.insert_rows((sid, int(s), float(t), set_id, v.tobytes())
                                  for s, t, v in zip(steps, times, values, strict=True))
        insert_s += time.perf_counter() - t0
        step += per_minute
        now[0] += 60
        t0 = time.perf_counter()
        while True:
            done = history.maintain(store.conn)
            rolled += done.rolled
            pruned += done.pruned_raw
            if not done.more:
                break
        maintain_s += time.perf_counter() - t0
        if minute % 15 == 14:
            page = store.conn.execute("PRAGMA page_size").fetchone()[0]
            size = store.conn.execute("PRAGMA page_count").fetchone()[0] * page
            sizes.append((minute + 1, size / 1e9))
            print(f"  {minute + 1:4d} min: store {size / 1e9:6.2f} GB,"
                  f" rows rolled {rolled:,}, pruned {pruned:,}", flush=True)
    # The blob plus about 64 bytes of row, key and index entry.
    rollup_bytes = {res: store.conn.execute("SELECT avg(length(data)) + 64 FROM rollups WHERE resolution = ?",
                                            (s,)).fetchone()[0] for res, s in (("1m", 60), ("1h", 3600))}
    # A raw row on disk, measured: the store's size when the raw window first filled, per row.
    full = [gb for minute, gb in sizes if minute >= a.raw_hours * 60]
    raw_row = (full[0] * 1e9 if full else sizes[-1][1] * 1e9) / (per_minute * a.ranks * min(
        minutes, a.raw_hours * 60))
    raw_window_gb = a.ranks * a.rate * 3600 * a.raw_hours * raw_row / 1e9
    week_1m = a.ranks * min(7, settings.minute_days) * 1440 * rollup_bytes["1m"] / 1e9
    week_1h = a.ranks * 7 * 24 * rollup_bytes["1h"] / 1e9
    print(f"load: {a.ranks} ranks x {a.metrics} metrics x {a.rate:g} steps/s; raw window {a.raw_hours:g} h;"
          f" {a.hours:g} h simulated")
    print(f"insert: {insert_s / max(rolled, 1) * 1e6:.1f} us/row;"
          f" maintenance (roll up + prune): {maintain_s / max(rolled, 1) * 1e6:.1f} us per raw row,"
          f" {maintain_s / minutes * 1e3:.0f} ms per simulated minute"
          f" ({maintain_s / minutes / 60 * 100:.1f} % of one core at this load)")
    print(f"store size by simulated minute (GB): {sizes}")
    print(f"bytes per rollup row: 1m {rollup_bytes['1m']:.0f}, 1h {rollup_bytes['1h']:.0f}"
          f" (raw row {raw_row:.0f}, measured)")
    print(f"a week at this load: raw window {raw_window_gb:.1f} GB + 1m rollups {week_1m:.1f} GB"
          f" + 1h rollups {week_1h:.2f} GB = {raw_window_gb + week_1m + week_1h:.1f} GB"
          f" (without retention: {a.ranks * a.rate * 86400 * 7 * raw_row / 1e9:.0f} GB)")


if __name__ == "__main__":
    main()
