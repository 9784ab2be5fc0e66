"""The daemon's SQLite store (WAL): runs, their rank streams, and every sample.

Layout. A *stream* is one (run, rank). Each step of a stream is one row of ``samples``
holding all the metrics the hook reported for that step as a little-endian float64 blob,
whose column names are the row's *metric set*. One row per step, not per point, is what
lets a Python daemon store millions of points a second (a row per point costs ~2 µs of
binding each; see BENCHMARKS.md). Ingest is idempotent on (stream, step): the unique index
makes a replayed step a no-op, so (run, rank, step, metric) is never stored twice.

NaN and ±Inf survive the blob unchanged (SQLite would turn a REAL NaN into NULL).

Threading: one :class:`Store` is used by the writer thread only (it is opened before that
thread starts, hence ``check_same_thread=False``); readers open their own read-only
connection with :meth:`Store.reader`. WAL lets them read while the writer commits.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import sqlite_utils

from runwatch.daemon import history

SCHEMA_VERSION = 3


class StoreError(Exception):
    """The store cannot be opened or written; the message says which file and why."""


@dataclass(frozen=True)
class StreamInfo:
    id: int
    run: str
    rank: int
    world_size: int
    host: str
    pid: int
    uid: int
    hook_version: str


class StoreFull(StoreError):
    """History is paused because the store's disk is full; the frames were not stored."""


class DiskReserve:
    """Disk set aside beside the store so that alerts still have room when the disk fills.

    Alerts take priority over history. When a commit fails because the disk is full, the
    writer calls :meth:`give_up`: the reserve file is deleted, and its space serves alert
    events, notifications and hook handshakes. History writes are then refused without trying
    (unacknowledged, so hooks keep and resend them) until :meth:`recovered` sees room for the
    reserve plus a margin again and takes it back. Writer thread only.
    """

    MARGIN = 16 << 20
    CHECK_SECONDS = 1.0

    def __init__(self, path: Path, size: int, clock: Any = time.monotonic) -> None:
        self.path = path
        self.size = size
        self.full = False
        self._clock = clock
        self._checked = -math.inf

    def take(self) -> bool:
        """Set the reserve aside (at start and on recovery); False when there is no room."""
        if self.size == 0:
            return True
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
            finally:
                os.close(fd)
        except OSError:
            with contextlib.suppress(OSError):
                self.path.unlink()
            return False
        return True

    def give_up(self) -> None:
        self.full = True
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def recovered(self) -> bool:
        """While full: True once free space holds the reserve again (and it is taken back)."""
        now = self._clock()
        if now - self._checked < self.CHECK_SECONDS:
            return False
        self._checked = now
        disk = shutil.disk_usage(self.path.parent)
        # The margin keeps history from flapping on and off at the edge (smaller on small disks).
        if disk.free < self.size + min(self.MARGIN, disk.total // 10) or not self.take():
            return False
        self.full = False
        return True


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode is durable against a crash of this process (kill -9); only an
    # OS crash or power loss can drop the last commits. That is the guarantee we ack on.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


class Store:
    """Owns the schema and the write path. Not thread-safe: one writer thread uses it."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn
        self.db = sqlite_utils.Database(conn)
        self._metric_sets: dict[tuple[str, ...], int] = {}
        self._run_ids: dict[str, int] = {}

    # -- opening ----------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path) -> Store:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            store = cls(path, _connect(path))
            store._create_schema()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"store {path}: {exc}") from None
        return store

    @classmethod
    def reader(cls, path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def _create_schema(self) -> None:
        db = self.db
        with self.conn:
            db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
            db["runs"].create(
                {"id": int, "name": str, "owner_uid": int, "created": float},
                pk="id",
                not_null={"name"},
                if_not_exists=True,
            )
            db["runs"].create_index(["name"], unique=True, if_not_exists=True)
            db["streams"].create(
                {
                    "id": int,
                    "run_id": int,
                    "rank": int,
                    "world_size": int,
                    "host": str,
                    "pid": int,
                    "uid": int,
                    "hook_version": str,
                    "first_seen": float,
                    "last_seen": float,
                },
                pk="id",
                not_null={"run_id", "rank"},
                foreign_keys=[("run_id", "runs", "id")],
                if_not_exists=True,
            )
            db["streams"].create_index(["run_id", "rank"], unique=True, if_not_exists=True)
            db["metric_sets"].create(
                {"id": int, "names": str}, pk="id", not_null={"names"}, if_not_exists=True
            )
            db["metric_sets"].create_index(["names"], unique=True, if_not_exists=True)
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS samples ("
                " stream_id INTEGER NOT NULL REFERENCES streams(id),"
                " step INTEGER NOT NULL,"
                " time REAL NOT NULL,"
                " metric_set_id INTEGER NOT NULL REFERENCES metric_sets(id),"
                " data BLOB NOT NULL,"
                " UNIQUE (stream_id, step))"
            )
            # Every firing and resolution of a rule, as judged (value NULL = NaN), and the
            # decisions (actions) a firing named, for the interventions to carry out.
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS alert_events ("
                " id INTEGER PRIMARY KEY, time REAL NOT NULL, rule TEXT NOT NULL,"
                " rule_version TEXT NOT NULL, severity TEXT NOT NULL, state TEXT NOT NULL,"
                " run TEXT NOT NULL, rank INTEGER NOT NULL, metric TEXT NOT NULL, step INTEGER NOT NULL,"
                " sample_time REAL, value REAL, baseline REAL, window TEXT, summary TEXT,"
                " actions TEXT, labels TEXT, shard REAL, context TEXT)"
            )
            self.conn.execute("CREATE INDEX IF NOT EXISTS alert_events_series"
                              " ON alert_events (rule, run, rank, metric, id)")
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS decisions ("
                " id INTEGER PRIMARY KEY, event_id INTEGER NOT NULL REFERENCES alert_events(id),"
                " time REAL NOT NULL, rule TEXT NOT NULL, run TEXT NOT NULL, rank INTEGER NOT NULL,"
                " step INTEGER NOT NULL, action TEXT NOT NULL, status TEXT NOT NULL)"
            )
            # Notifications (daemon/notify): what each receiver was told about each group, the
            # durable outbox of messages still to deliver, and silences.
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS notify_log (receiver TEXT NOT NULL, group_key TEXT NOT NULL,"
                " firing TEXT NOT NULL, resolved TEXT NOT NULL, at REAL NOT NULL, ref TEXT,"
                " PRIMARY KEY (receiver, group_key))"
            )
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY, receiver TEXT NOT NULL,"
                " group_key TEXT NOT NULL, created REAL NOT NULL, payload TEXT NOT NULL,"
                " state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL,"
                " last_error TEXT, sent_at REAL)"
            )
            self.conn.execute("CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (receiver, state, id)")
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS silences (id INTEGER PRIMARY KEY, matchers TEXT NOT NULL,"
                " starts_at REAL NOT NULL, ends_at REAL NOT NULL, comment TEXT NOT NULL,"
                " created_by TEXT NOT NULL)"
            )
            # Interventions (daemon/playbook.py): what runs said back (idempotent on their
            # sequence numbers), commands to runs and each rank's acknowledgement, the
            # checkpoints runs registered, incidents with their timelines, and each run's
            # control state (paused, learning-rate scale, folders).
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS hook_events (id INTEGER PRIMARY KEY,"
                " stream_id INTEGER NOT NULL REFERENCES streams(id), seq INTEGER NOT NULL,"
                " time REAL NOT NULL, type TEXT NOT NULL, body TEXT NOT NULL, UNIQUE (stream_id, seq))"
            )
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS commands (id INTEGER PRIMARY KEY, run TEXT NOT NULL,"
                " action TEXT NOT NULL, args TEXT NOT NULL, created REAL NOT NULL, created_by TEXT NOT NULL,"
                " incident_id INTEGER, state TEXT NOT NULL, step INTEGER, result TEXT, updated REAL NOT NULL)"
            )
            self.conn.execute("CREATE INDEX IF NOT EXISTS commands_run ON commands (run, state, id)")
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS command_acks ("
                " command_id INTEGER NOT NULL REFERENCES commands(id), rank INTEGER NOT NULL,"
                " step INTEGER, state TEXT NOT NULL, result TEXT, time REAL NOT NULL,"
                " PRIMARY KEY (command_id, rank))"
            )
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS checkpoints (id INTEGER PRIMARY KEY, run TEXT NOT NULL,"
                " step INTEGER NOT NULL, path TEXT NOT NULL, format TEXT NOT NULL, size_bytes INTEGER,"
                " saved_at REAL NOT NULL, registered REAL NOT NULL, UNIQUE (run, path))"
            )
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS incidents (id INTEGER PRIMARY KEY, run TEXT NOT NULL,"
                " opened REAL NOT NULL, updated REAL NOT NULL, state TEXT NOT NULL, rule TEXT NOT NULL,"
                " rank INTEGER, metric TEXT, first_step INTEGER, rewinds INTEGER NOT NULL DEFAULT 0,"
                " watch_from INTEGER, summary TEXT NOT NULL)"
            )
            self.conn.execute("CREATE INDEX IF NOT EXISTS incidents_run ON incidents (run, state)")
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS incident_events (id INTEGER PRIMARY KEY,"
                " incident_id INTEGER NOT NULL REFERENCES incidents(id), time REAL NOT NULL,"
                " kind TEXT NOT NULL, text TEXT NOT NULL, detail TEXT NOT NULL)"
            )
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS run_control (run TEXT PRIMARY KEY, state TEXT NOT NULL,"
                " step INTEGER, lr_scale REAL NOT NULL DEFAULT 1.0, heartbeat REAL,"
                " checkpoint_dir TEXT, data_dir TEXT, updated REAL NOT NULL)"
            )
            # Each launch of a run (the hooks' launch id; '' from hooks that send none): when it
            # first connected, whether its global rank 0 is connected to this daemon (which then
            # owns the run's interventions), and what its hooks speak.
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS run_launches (run TEXT NOT NULL, launch TEXT NOT NULL,"
                " started REAL NOT NULL, rank0_here INTEGER NOT NULL, world_size INTEGER NOT NULL,"
                " capabilities TEXT NOT NULL, PRIMARY KEY (run, launch))"
            )
            history.create_tables(self.conn)
            db["meta"].upsert({"key": "schema_version", "value": str(SCHEMA_VERSION)}, pk="key")
        for set_id, names in self.conn.execute("SELECT id, names FROM metric_sets"):
            self._metric_sets[tuple(names.split("\n"))] = set_id

    def close(self) -> None:
        self.conn.close()

    # -- writes (writer thread) -------------------------------------------------------

    def register_stream(
        self,
        run: str,
        rank: int,
        world_size: int,
        host: str,
        pid: int,
        uid: int,
        hook_version: str,
    ) -> StreamInfo:
        now = time.time()
        try:
            return self._register_stream(run, rank, world_size, host, pid, uid, hook_version, now)
        except BaseException:
            self.forget_uncommitted()
            raise

    def _register_stream(self, run: str, rank: int, world_size: int, host: str, pid: int, uid: int,
                         hook_version: str, now: float) -> StreamInfo:
        with self.conn:
            run_id = self._run_ids.get(run)
            if run_id is None:
                row = self.conn.execute("SELECT id FROM runs WHERE name = ?", (run,)).fetchone()
                if row is None:
                    cur = self.conn.execute(
                        "INSERT INTO runs (name, owner_uid, created) VALUES (?, ?, ?)",
                        (run, uid, now),
                    )
                    run_id = int(cur.lastrowid or 0)
                else:
                    run_id = int(row[0])
                self._run_ids[run] = run_id
            self.conn.execute(
                "INSERT INTO streams (run_id, rank, world_size, host, pid, uid, hook_version,"
                " first_seen, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (run_id, rank) DO UPDATE SET world_size = excluded.world_size,"
                " host = excluded.host, pid = excluded.pid, uid = excluded.uid,"
                " hook_version = excluded.hook_version, last_seen = excluded.last_seen",
                (run_id, rank, world_size, host, pid, uid, hook_version, now, now),
            )
            stream_id = self.conn.execute(
                "SELECT id FROM streams WHERE run_id = ? AND rank = ?", (run_id, rank)
            ).fetchone()[0]
        return StreamInfo(int(stream_id), run, rank, world_size, host, pid, uid, hook_version)

    def forget_uncommitted(self) -> None:
        """After a rollback: drop cached ids that may belong to the rolled-back transaction."""
        self._run_ids.clear()
        self._metric_sets = {
            tuple(names.split("\n")): set_id
            for set_id, names in self.conn.execute("SELECT id, names FROM metric_sets")
        }

    def metric_set_id(self, names: tuple[str, ...]) -> int:
        """Intern a metric set. Call inside the writer's transaction."""
        set_id = self._metric_sets.get(names)
        if set_id is None:
            joined = "\n".join(names)
            self.conn.execute("INSERT OR IGNORE INTO metric_sets (names) VALUES (?)", (joined,))
            set_id = int(
                self.conn.execute("SELECT id FROM metric_sets WHERE names = ?", (joined,)).fetchone()[0]
            )
            self._metric_sets[names] = set_id
        return set_id

    def insert_rows(self, rows: Iterable[tuple[int, int, float, int, bytes | memoryview]]) -> int:
        """Rows of (stream_id, step, time, metric_set_id, data). Call inside a transaction.
        Returns how many were new (a step already stored is ignored)."""
        return self.conn.executemany("INSERT OR IGNORE INTO samples VALUES (?, ?, ?, ?, ?)", rows).rowcount

    def touch_streams(self, last_seen: Sequence[tuple[float, int]]) -> None:
        self.conn.executemany("UPDATE streams SET last_seen = ? WHERE id = ?", last_seen)

    def insert_event(self, now: float, e: AlertRow) -> int:
        """Store one firing or resolution and, for a firing, a pending decision per action
        other than ``alert``. Call inside a transaction; returns the event id."""
        cur = self.conn.execute(
            "INSERT INTO alert_events (time, rule, rule_version, severity, state, run, rank, metric, step,"
            " sample_time, value, baseline, window, summary, actions, labels, shard, context)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (now, e.rule, e.version, e.severity, e.state, e.run, e.rank, e.metric, e.step, e.sample_time,
             _real(e.value), _real(e.baseline), e.window, e.summary, json.dumps(list(e.actions)),
             json.dumps(e.labels), e.shard, json.dumps(e.context)),
        )
        event_id = int(cur.lastrowid or 0)
        if e.state == "firing":
            self.conn.executemany(
                "INSERT INTO decisions (event_id, time, rule, run, rank, step, action, status)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'pending')",
                [(event_id, now, e.rule, e.run, e.rank, e.step, a) for a in e.actions if a != "alert"],
            )
        return event_id


class AlertRow(Protocol):
    rule: str
    version: str
    severity: str
    state: str
    run: str
    rank: int
    metric: str
    step: int
    sample_time: float
    value: float
    baseline: float
    window: str
    summary: str
    actions: tuple[str, ...]
    labels: dict[str, str]
    shard: float | None
    context: dict[str, str]


def _real(x: float) -> float | None:
    # SQLite stores NaN as NULL anyway; say so explicitly. ±Inf is stored as is.
    return None if math.isnan(x) else x


# -- reads (any thread, own connection) -------------------------------------------------


def metric_sets(conn: sqlite3.Connection) -> dict[int, tuple[str, ...]]:
    return {i: tuple(n.split("\n")) for i, n in conn.execute("SELECT id, names FROM metric_sets")}


def streams(conn: sqlite3.Connection, seen_since: float | None = None) -> list[StreamInfo]:
    rows = conn.execute(
        "SELECT s.id, r.name, s.rank, s.world_size, s.host, s.pid, s.uid, s.hook_version"
        " FROM streams s JOIN runs r ON r.id = s.run_id WHERE s.last_seen >= ? ORDER BY r.name, s.rank",
        (-math.inf if seen_since is None else seen_since,),
    )
    return [StreamInfo(*row) for row in rows]


def latest_rows(conn: sqlite3.Connection) -> list[tuple[int, int, float, int, bytes]]:
    """The newest stored row of every (stream, metric set): what the exporter shows at start."""
    return conn.execute(
        "SELECT stream_id, MAX(step), time, metric_set_id, data FROM samples"
        " GROUP BY stream_id, metric_set_id"
    ).fetchall()


def series(conn: sqlite3.Connection, run: str, rank: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric of one rank, in step order."""
    sets = {i: names.index(metric) for i, names in metric_sets(conn).items() if metric in names}
    if not sets:
        return np.empty(0, dtype=np.int64), np.empty(0)
    rows = conn.execute(
        "SELECT step, metric_set_id, data FROM samples WHERE stream_id = ("
        " SELECT s.id FROM streams s JOIN runs r ON r.id = s.run_id WHERE r.name = ? AND s.rank = ?)"
        " ORDER BY step",
        (run, rank),
    ).fetchall()
    steps, values = [], []
    for step, set_id, data in rows:
        col = sets.get(set_id)
        if col is not None:
            steps.append(step)
            values.append(np.frombuffer(data, dtype="<f8")[col])
    return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)


def count_points(conn: sqlite3.Connection) -> int:
    """Points stored: each row holds as many points as its metric set has names."""
    sizes = {i: len(n) for i, n in metric_sets(conn).items()}
    total = 0
    for set_id, n_rows in conn.execute(
        "SELECT metric_set_id, COUNT(*) FROM samples GROUP BY metric_set_id"
    ):
        total += sizes[set_id] * n_rows
    return total


def alert_events(conn: sqlite3.Connection, limit: int = 50, run: str | None = None) -> list[dict[str, Any]]:
    """The newest ``limit`` firings and resolutions, newest first, with their decisions."""
    where, args = ("WHERE run = ?", [run]) if run else ("", [])
    rows = conn.execute(
        "SELECT id, time, rule, rule_version, severity, state, run, rank, metric, step, value, baseline,"
        f" window, summary, actions, shard FROM alert_events {where} ORDER BY id DESC LIMIT ?",
        (*args, limit),
    ).fetchall()
    decided: dict[int, list[dict[str, Any]]] = {}
    if rows:
        for event_id, action, status in conn.execute(
            "SELECT event_id, action, status FROM decisions WHERE event_id >= ? ORDER BY id", (rows[-1][0],)
        ):
            decided.setdefault(event_id, []).append({"action": action, "status": status})
    keys = ("id", "time", "rule", "rule_version", "severity", "state", "run", "rank", "metric", "step",
            "value", "baseline", "window", "summary", "actions", "shard")
    out = []
    for row in rows:
        d = dict(zip(keys, row, strict=True))
        d["value"] = math.nan if d["value"] is None else d["value"]
        d["baseline"] = math.nan if d["baseline"] is None else d["baseline"]
        d["actions"] = json.loads(d["actions"] or "[]")
        d["decisions"] = decided.get(d["id"], [])
        out.append(d)
    return out


def open_alerts(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """The firing event of every series whose latest stored event is a firing."""
    cur = conn.execute(
        "SELECT e.rule, e.rule_version AS version, e.severity, e.state, e.run, e.rank, e.metric, e.step,"
        " e.sample_time, e.value, e.baseline, e.window, e.summary, e.actions, e.labels, e.shard, e.context"
        " FROM alert_events e"
        " JOIN (SELECT MAX(id) AS id FROM alert_events GROUP BY rule, run, rank, metric) last"
        " ON last.id = e.id WHERE e.state = 'firing'"
    )
    keys = [d[0] for d in cur.description]
    out = []
    for row in cur.fetchall():
        d = dict(zip(keys, row, strict=True))
        d["value"] = math.nan if d["value"] is None else d["value"]
        d["baseline"] = math.nan if d["baseline"] is None else d["baseline"]
        d["actions"] = tuple(json.loads(d["actions"] or "[]"))
        d["labels"] = json.loads(d["labels"] or "{}")
        d["context"] = json.loads(d["context"] or "{}")
        out.append(d)
    return out


def recent_rows(conn: sqlite3.Connection, stream_id: int, limit: int) -> list[tuple[int, float, int, bytes]]:
    """The newest ``limit`` rows of a stream, oldest first: (step, time, metric_set_id, data)."""
    rows = conn.execute(
        "SELECT step, time, metric_set_id, data FROM samples WHERE stream_id = ? ORDER BY step DESC LIMIT ?",
        (stream_id, limit),
    ).fetchall()
    return rows[::-1]
