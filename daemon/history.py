"""Metric history retention: raw steps for a short window, 1-minute and 1-hour rollups for longer.

Raw rows (one per step, see store.py) are what rules, reports and rewinds read; they are also
what fills the disk (about 5 GB an hour at 64 ranks x 200 metrics x 10 steps/s). So the writer
thread, every ``maintenance_seconds``, does two bounded pieces of work:

* **roll up** the rows stored since the last pass into ``rollups``: per stream, metric set and
  bucket (60 s and 3600 s of the step's own time), for every column the sum and count of its
  finite values, their min and max, and the value of the bucket's last step. Partial buckets are
  merged, so a row that arrives late (a hook's spool replayed after an outage) still lands in
  its bucket. Progress is a rowid watermark in ``meta``: rows are rolled once, in insert order.
* **prune** raw rows stored more than ``raw_hours`` ago (only rows already rolled) from the
  oldest end, and rollups older than their own retention. "Stored when" is the daemon's clock,
  not the hook's: each pass notes (now, newest rowid) in ``history_marks``, and pruning takes
  rowids up to the newest mark older than the window. A rank whose clock is off by days would
  otherwise pin the oldest rows (nothing behind them pruned) or lose its own at once. SQLite
  reuses the freed pages, so the file levels off instead of growing; it does not shrink (that
  would need a VACUUM, which we never run because it can renumber rowids and stalls the writer).

Each call does at most ``chunk_rows`` rows of each kind and says whether more is left, so the
caller can spread a backlog over several writer turns and keep ingest lag low.

The newest raw row is never pruned: without AUTOINCREMENT, SQLite gives a new row max(rowid)+1,
and an empty table would hand out rowids below the watermark, which would never be rolled.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

RESOLUTIONS: dict[str, int] = {"1m": 60, "1h": 3600}
STATS = ("sum", "count", "min", "max", "last")  # rows of a rollup's data blob, each C float64
WATERMARK_KEY = "history_rolled_rowid"


class HistorySettings(BaseModel):
    """``[history]``: how long each resolution of metric history is kept."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    raw_hours: float = Field(default=24.0, gt=0, description="Raw steps (what rules and reports read).")
    minute_days: float = Field(default=14.0, gt=0, description="1-minute rollups.")
    hour_days: float = Field(default=400.0, gt=0, description="1-hour rollups.")
    maintenance_seconds: float = Field(default=30.0, gt=0, le=3600,
                                       description="How often rolling up and pruning run.")
    chunk_rows: int = Field(default=5000, ge=100, description="Rows per writer turn (bounds ingest lag).")

    def keep_seconds(self, resolution: str) -> float:
        return (self.minute_days if resolution == "1m" else self.hour_days) * 86400.0


def create_tables(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS rollups ("
        " stream_id INTEGER NOT NULL REFERENCES streams(id),"
        " resolution INTEGER NOT NULL,"  # seconds
        " bucket REAL NOT NULL,"  # start of the bucket, unix time
        " metric_set_id INTEGER NOT NULL REFERENCES metric_sets(id),"
        " rows INTEGER NOT NULL, first_step INTEGER NOT NULL, last_step INTEGER NOT NULL,"
        " data BLOB NOT NULL,"  # STATS x columns, little-endian float64
        " UNIQUE (stream_id, resolution, bucket, metric_set_id))"
    )
    conn.execute("CREATE INDEX IF NOT EXISTS rollups_age ON rollups (resolution, bucket)")
    # When (daemon clock) the store held which rowids: raw retention is judged by this clock.
    conn.execute("CREATE TABLE IF NOT EXISTS history_marks (time REAL PRIMARY KEY,"
                 " rowid_seen INTEGER NOT NULL)")


@dataclass
class Pass:
    """What one :meth:`History.maintain` call did."""

    rolled: int = 0
    pruned_raw: int = 0
    pruned_rollups: int = 0
    more: bool = False  # work is left: call again soon


class History:
    """Rolls up and prunes the store's metric history. Writer thread only (it writes)."""

    def __init__(self, settings: Callable[[], HistorySettings],
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock

    def maintain(self, conn: sqlite3.Connection) -> Pass:
        s = self.settings()
        done = Pass()
        with conn:
            now = self.clock()
            conn.execute("INSERT OR REPLACE INTO history_marks VALUES (?, (SELECT coalesce(max(rowid), 0)"
                         " FROM samples))", (now,))
            done.rolled = self._roll(conn, s.chunk_rows)
            done.pruned_raw = self._prune_raw(conn, s)
            done.pruned_rollups = self._prune_rollups(conn, s)
        done.more = (done.rolled == s.chunk_rows or done.pruned_raw >= s.chunk_rows
                     or done.pruned_rollups >= s.chunk_rows)
        return done

    # -- rolling up ------------------------------------------------------------------------

    def _roll(self, conn: sqlite3.Connection, limit: int) -> int:
        mark = watermark(conn)
        rows = conn.execute(
            "SELECT rowid, stream_id, step, time, metric_set_id, data FROM samples"
            " WHERE rowid > ? ORDER BY rowid LIMIT ?", (mark, limit)).fetchall()
        if not rows:
            return 0
        groups: dict[tuple[int, int], list[tuple[int, float, bytes]]] = {}
        for _, stream_id, step, t, set_id, data in rows:
            groups.setdefault((stream_id, set_id), []).append((step, t, data))
        for (stream_id, set_id), members in groups.items():
            steps = np.fromiter((m[0] for m in members), np.int64, len(members))
            times = np.fromiter((m[1] for m in members), np.float64, len(members))
            values = np.frombuffer(b"".join(m[2] for m in members), "<f8").reshape(len(members), -1)
            for seconds in RESOLUTIONS.values():
                for bucket, part in _aggregate(steps, times, values, seconds):
                    _merge(conn, stream_id, seconds, bucket, set_id, part)
        conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET"
                     " value = excluded.value", (WATERMARK_KEY, str(rows[-1][0])))
        return len(rows)

    # -- pruning ---------------------------------------------------------------------------

    def _prune_raw(self, conn: sqlite3.Connection, s: HistorySettings) -> int:
        cutoff = self.clock() - s.raw_hours * 3600.0
        row = conn.execute("SELECT max(rowid_seen) FROM history_marks WHERE time <= ?", (cutoff,)).fetchone()
        if row[0] is None:
            return 0
        conn.execute("DELETE FROM history_marks WHERE time < (SELECT max(time) FROM history_marks"
                     " WHERE time <= ?)", (cutoff,))
        # Oldest rowids first, through the rowid index: a bounded read however large the table.
        return conn.execute(
            "DELETE FROM samples WHERE rowid IN (SELECT rowid FROM samples WHERE rowid <= ? AND rowid <= ?"
            " AND rowid < (SELECT max(rowid) FROM samples) ORDER BY rowid LIMIT ?)",
            (row[0], watermark(conn), s.chunk_rows)).rowcount

    def _prune_rollups(self, conn: sqlite3.Connection, s: HistorySettings) -> int:
        pruned = 0
        now = self.clock()
        for name, seconds in RESOLUTIONS.items():
            pruned += conn.execute(
                "DELETE FROM rollups WHERE rowid IN (SELECT rowid FROM rollups"
                " WHERE resolution = ? AND bucket < ? LIMIT ?)",
                (seconds, now - s.keep_seconds(name), s.chunk_rows)).rowcount
        return pruned


@dataclass
class _Part:
    rows: int
    first_step: int
    last_step: int
    stats: np.ndarray  # len(STATS) x C


def _aggregate(steps: np.ndarray, times: np.ndarray, values: np.ndarray,
               seconds: int) -> list[tuple[float, _Part]]:
    """Per-bucket statistics of rows of one metric set, vectorised over buckets and columns."""
    buckets = np.floor(times / seconds) * seconds
    order = np.lexsort((steps, buckets))
    buckets, steps, values = buckets[order], steps[order], values[order]
    starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]])
    ends = np.r_[starts[1:], len(buckets)] - 1
    finite = np.isfinite(values)
    with np.errstate(invalid="ignore"):
        total = np.add.reduceat(np.where(finite, values, 0.0), starts, axis=0)
        count = np.add.reduceat(finite, starts, axis=0).astype(np.float64)
        low = np.minimum.reduceat(np.where(finite, values, np.inf), starts, axis=0)
        high = np.maximum.reduceat(np.where(finite, values, -np.inf), starts, axis=0)
    low[count == 0] = np.nan
    high[count == 0] = np.nan
    last = values[ends]  # rows are in step order within a bucket: the bucket's last step
    out = []
    for i, (a, b) in enumerate(zip(starts, ends, strict=True)):
        stats = np.stack([total[i], count[i], low[i], high[i], last[i]])
        out.append((float(buckets[a]), _Part(int(b - a + 1), int(steps[a]), int(steps[b]), stats)))
    return out


def _merge(conn: sqlite3.Connection, stream_id: int, seconds: int, bucket: float, set_id: int,
           part: _Part) -> None:
    old = conn.execute(
        "SELECT rows, first_step, last_step, data FROM rollups WHERE stream_id = ? AND resolution = ?"
        " AND bucket = ? AND metric_set_id = ?", (stream_id, seconds, bucket, set_id)).fetchone()
    if old is not None:
        stats = np.frombuffer(old[3], "<f8").reshape(len(STATS), -1).copy()
        with np.errstate(invalid="ignore"):
            stats[0] += part.stats[0]
            stats[1] += part.stats[1]
            stats[2] = np.fmin(stats[2], part.stats[2])
            stats[3] = np.fmax(stats[3], part.stats[3])
        if part.last_step > old[2]:
            stats[4] = part.stats[4]
        part = _Part(old[0] + part.rows, min(old[1], part.first_step), max(old[2], part.last_step), stats)
    conn.execute(
        "INSERT INTO rollups (stream_id, resolution, bucket, metric_set_id, rows, first_step, last_step,"
        " data) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (stream_id, resolution, bucket, metric_set_id)"
        " DO UPDATE SET rows = excluded.rows, first_step = excluded.first_step,"
        " last_step = excluded.last_step, data = excluded.data",
        (stream_id, seconds, bucket, set_id, part.rows, part.first_step, part.last_step,
         part.stats.astype("<f8").tobytes()))


def watermark(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (WATERMARK_KEY,)).fetchone()
    return int(row[0]) if row else 0


# -- reading ---------------------------------------------------------------------------------


class HistoryError(ValueError):
    """A history query the store cannot answer (unknown run, rank, metric or resolution)."""


def points(conn: sqlite3.Connection, run: str, rank: int, metric: str, resolution: str,
           since: float | None = None) -> list[dict[str, Any]]:
    """One metric of one rank at ``raw``, ``1m`` or ``1h``, oldest first.

    Rollup points carry ``time`` (bucket start), ``steps`` (rows in the bucket), ``first_step``,
    ``last_step``, ``mean``/``min``/``max`` of the finite values, ``last`` and ``nonfinite``.
    """
    row = conn.execute("SELECT s.id FROM streams s JOIN runs r ON r.id = s.run_id WHERE r.name = ?"
                       " AND s.rank = ?", (run, rank)).fetchone()
    if row is None:
        raise HistoryError(f"no rank {rank} of run {run!r} in this store")
    stream_id = row[0]
    sets = {i: names.index(metric) for i, names in _metric_sets(conn).items() if metric in names}
    if not sets:
        raise HistoryError(f"no metric {metric!r} was ever stored")
    since = -math.inf if since is None else since
    seconds = RESOLUTIONS.get(resolution, 1)
    first_bucket = math.floor(since / seconds) * seconds if math.isfinite(since) else since
    if resolution == "raw":
        out = []
        for step, t, set_id, data in conn.execute(
                "SELECT step, time, metric_set_id, data FROM samples WHERE stream_id = ? AND time >= ?"
                " ORDER BY step", (stream_id, since)):
            col = sets.get(set_id)
            if col is not None:
                out.append({"step": step, "time": t, "value": float(np.frombuffer(data, "<f8")[col])})
        return out
    if resolution not in RESOLUTIONS:
        raise HistoryError(f"resolution {resolution!r}: use raw, {', '.join(RESOLUTIONS)}")
    merged: dict[float, _Part] = {}
    for bucket, set_id, rows, first, last, data in conn.execute(
            "SELECT bucket, metric_set_id, rows, first_step, last_step, data FROM rollups"
            " WHERE stream_id = ? AND resolution = ? AND bucket >= ? ORDER BY bucket",
            (stream_id, seconds, first_bucket)):
        col = sets.get(set_id)
        if col is None:
            continue
        stats = np.frombuffer(data, "<f8").reshape(len(STATS), -1)[:, col : col + 1].copy()
        part = _Part(rows, first, last, stats)
        seen = merged.get(bucket)
        if seen is not None:  # the metric in two metric sets within one bucket
            keep_last = seen.stats[4] if seen.last_step > last else stats[4]
            stats = np.stack([seen.stats[0] + stats[0], seen.stats[1] + stats[1],
                              np.fmin(seen.stats[2], stats[2]), np.fmax(seen.stats[3], stats[3]), keep_last])
            part = _Part(seen.rows + rows, min(seen.first_step, first), max(seen.last_step, last), stats)
        merged[bucket] = part
    out = []
    for bucket, p in sorted(merged.items()):
        total, count, low, high, last = (float(v[0]) for v in p.stats)
        out.append({"time": bucket, "steps": p.rows, "first_step": p.first_step, "last_step": p.last_step,
                    "mean": total / count if count else math.nan, "min": low, "max": high, "last": last,
                    "nonfinite": p.rows - int(count)})
    return out


def _metric_sets(conn: sqlite3.Connection) -> dict[int, list[str]]:
    return {i: names.split("\n") for i, names in conn.execute("SELECT id, names FROM metric_sets")}
