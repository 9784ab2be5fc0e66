"""Drift monitors on the histograms hooks stream: one :class:`DriftMonitor` per stream and name.

A hook sends a histogram as the columns ``hist/<name>/0`` .. ``hist/<name>/<fine+1>`` of a step's
row (fine-grid counts since its previous flush; see :mod:`runwatch.hooks.histograms`). The
writer passes every block through :meth:`DriftMonitors.derive` before storing it; each window a
monitor completes (:mod:`runwatch.daemon.drift`) adds, to the row of the window's last step,

=================================  =========================================================
``drift_psi/<name>``               PSI of the window against the frozen reference
``drift_js/<name>``                Jensen-Shannon distance (base 2, in [0, 1])
``drift_warn_threshold/<name>``    the PSI at which this window would warn (size-aware)
``drift_state/<name>``             debounced tier: 0 ok, 1 warning, 2 critical
=================================  =========================================================

so they are stored, exported and judged by rules like any value a hook sends. The store keeps
one row per step, hence the derived values ride in the step's own row (blocks are split where
rows gain different columns).

Data shards. A hook that knows each batch's shard (``watch.batch(shard=...)``) also sends the
``seq_length`` counts of up to a few shards per flush in fixed slots, ``hist/<name>@shard<j>/<i>``
with the shard's number in ``hist/<name>@shard<j>/id``. Each shard's counts fill windows of
their own (``shard_window_values``) judged against the reference of the run's ``<name>`` monitor
(a shard is compared with the healthy data, not with itself), and every row that carries shard
counts gets ``drift_state/<name>@shards`` (the highest debounced state among the shards read in
the last ``SHARD_ACTIVE_STEPS`` steps) and, once a shard has been judged, ``drift_shard/<name>``
(that shard's number), ``drift_psi/<name>@shards``, ``drift_js/<name>@shards`` and
``drift_warn_threshold/<name>@shards`` of its last window. The series stay five however many
shards a run reads (the exporter shows ``drift_shard`` with a ``key`` label); a monitor follows
at most ``MAX_SHARDS`` shards at once. Per-shard windows live in memory only: after a restart
they fill again (the reference they are judged against is the saved one).

References. Where a monitor's reference comes from, in this order:

1. the store's ``drift_references`` table: every reference is saved there when it freezes, with
   its fine counts, coarse bins, step range and source, so a daemon restart (kill -9 included)
   resumes monitoring against the same reference. A saved reference is used unless the
   configuration now says something else for that monitor (``runwatch drift freeze`` ones are
   kept until the next freeze);
2. the first ``[[drift.references]]`` entry matching the run and histogram: a step range of the
   run itself (steps already stored are read back from the store, later ones are collected as
   they arrive), a step range of another run (read from the store), or another run's own saved
   reference. One that cannot be used (nothing stored there) is logged and the monitor learns;
3. learned: the steps after warm-up (``[drift]`` settings).

``runwatch drift freeze`` replaces a reference at any time from a stored step range of the run
or another run (:meth:`DriftMonitors.query`).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from runwatch.daemon.drift import CoarseBins, DriftConfig, DriftMonitor, DriftResult, Reference
from runwatch.daemon.protocol import Block
from runwatch.daemon.store import StreamInfo, metric_sets

log = logging.getLogger("runwatch.drift")

PREFIX = "hist/"
SHARD_MARK = "@shard"  # hist/<name>@shard<slot>/<i>: a slot of per-shard counts (hooks/watch.py)
SHARD_ID = "id"  # hist/<name>@shard<slot>/id: the shard the slot holds this flush
#: Histograms a rank may have monitored; more are refused (memory follows what hooks send).
MAX_MONITORS_PER_STREAM = 64
DERIVED = ("drift_psi", "drift_js", "drift_warn_threshold", "drift_state")


class ReferenceRule(Protocol):
    """One ``[[drift.references]]`` entry (:class:`runwatch.daemon.config.DriftReference`)."""

    monitor: str
    run: str
    steps: tuple[int, int] | None
    from_run: str | None
    from_rank: int | None


def create_tables(conn: sqlite3.Connection) -> None:
    """The saved references, one per (run, rank, monitor) (created by the monitors that save them)."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS drift_references (run TEXT NOT NULL, rank INTEGER NOT NULL,"
        " monitor TEXT NOT NULL, fine INTEGER NOT NULL, counts BLOB NOT NULL, starts TEXT NOT NULL,"
        " first_step INTEGER, last_step INTEGER, origin TEXT NOT NULL, spec TEXT, source TEXT NOT NULL,"
        " frozen_at REAL NOT NULL, PRIMARY KEY (run, rank, monitor))"
    )


@dataclass(frozen=True)
class SavedReference:
    """A row of ``drift_references``. ``origin``: learned, config or cli; ``spec``: the
    configured entry it was made from (JSON), for telling whether the configuration changed."""

    run: str
    rank: int
    monitor: str
    fine: int
    counts: np.ndarray
    starts: tuple[int, ...]
    first_step: int | None
    last_step: int | None
    origin: str
    spec: str | None
    source: str
    frozen_at: float

    @property
    def bins(self) -> CoarseBins:
        return CoarseBins(starts=self.starts, fine=self.fine)


_COLUMNS = ("run", "rank", "monitor", "fine", "counts", "starts", "first_step", "last_step", "origin", "spec",
            "source", "frozen_at")


def _saved(row: tuple[Any, ...]) -> SavedReference:
    d = dict(zip(_COLUMNS, row, strict=True))
    d["counts"] = np.frombuffer(d["counts"], dtype="<f8").copy()
    d["starts"] = tuple(json.loads(d["starts"]))
    return SavedReference(**d)


def saved_references(conn: sqlite3.Connection, run: str | None = None) -> list[SavedReference]:
    where, args = ("WHERE run = ?", (run,)) if run else ("", ())
    rows = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM drift_references {where}"
                        " ORDER BY run, rank, monitor", args).fetchall()
    return [_saved(r) for r in rows]


def load_reference(conn: sqlite3.Connection, run: str, rank: int, monitor: str) -> SavedReference | None:
    row = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM drift_references WHERE run = ? AND rank = ?"
                       " AND monitor = ?", (run, rank, monitor)).fetchone()
    return _saved(row) if row else None


def save_reference(conn: sqlite3.Connection, run: str, rank: int, monitor: str, ref: Reference,
                   origin: str, spec: str | None, source: str) -> None:
    """Insert or replace, in a transaction of its own (call outside any other)."""
    with conn:
        conn.execute(
            f"INSERT OR REPLACE INTO drift_references ({', '.join(_COLUMNS)})"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (run, rank, monitor, ref.bins.fine, ref.fine_counts.astype("<f8").tobytes(),
             json.dumps(list(ref.bins.starts)), ref.first_step, ref.last_step, origin, spec, source,
             time.time()))


def stored_histogram(conn: sqlite3.Connection, run: str, rank: int, name: str, first: int,
                     last: int) -> tuple[np.ndarray, int, int]:
    """(fine counts summed, first step, last step) of histogram ``name`` over the stored rows of
    steps ``first``..``last`` of one rank. LookupError, saying what is missing, when none hold it."""
    stream = conn.execute("SELECT s.id FROM streams s JOIN runs r ON r.id = s.run_id"
                          " WHERE r.name = ? AND s.rank = ?", (run, rank)).fetchone()
    if stream is None:
        raise LookupError(f"run {run!r} rank {rank} is not in the store")
    cols = {set_id: c[name] for set_id, names in metric_sets(conn).items()
            if name in (c := histogram_columns(names))}
    total: np.ndarray | None = None
    seen: list[int] = []
    for step, set_id, data in conn.execute(
            "SELECT step, metric_set_id, data FROM samples WHERE stream_id = ? AND step BETWEEN ? AND ?"
            " ORDER BY step", (stream[0], first, last)):
        idx = cols.get(set_id)
        if idx is None:
            continue
        counts = np.frombuffer(data, dtype="<f8")[idx]
        if not np.isfinite(counts).all():
            continue
        if total is not None and len(counts) != len(total):
            raise LookupError(f"run {run!r} rank {rank}: histogram {name!r} changed its grid within steps "
                              f"{first}-{last}")
        total = counts.copy() if total is None else total + counts
        seen.append(step)
    if total is None or total.sum() <= 0:
        raise LookupError(f"run {run!r} rank {rank} has no stored histogram {name!r} in steps {first}-{last}"
                          " (raw steps are kept for [history] raw_hours)")
    return total, seen[0], seen[-1]


def _parse(names: tuple[str, ...]) -> tuple[dict[str, dict[int, int]], dict[str, int]]:
    found: dict[str, dict[int, int]] = {}
    ids: dict[str, int] = {}
    for col, key in enumerate(names):
        if not key.startswith(PREFIX):
            continue
        name, _, index = key[len(PREFIX):].rpartition("/")
        if not name:
            continue
        if index == SHARD_ID:
            ids[name] = col
        elif index.isascii() and index.isdigit():
            found.setdefault(name, {})[int(index)] = col
    return found, ids


def _complete(bins: dict[int, int]) -> np.ndarray | None:
    n = len(bins)
    if n >= 3 and set(bins) == set(range(n)):  # fine >= 1: underflow, a bin, overflow
        return np.array([bins[i] for i in range(n)], dtype=np.intp)
    return None


def _shard_slot(name: str) -> tuple[str, int] | None:
    base, mark, slot = name.rpartition(SHARD_MARK)
    if mark and base and slot.isascii() and slot.isdigit():
        return base, int(slot)
    return None


def histogram_columns(names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """``{histogram name: column indices in bin order}`` of the complete histograms in ``names``
    (per-shard slots are not histograms of their own; see :func:`shard_columns`)."""
    found, _ = _parse(names)
    out = {}
    for name, bins in found.items():
        idx = _complete(bins)
        if idx is not None and _shard_slot(name) is None:
            out[name] = idx
    return out


def shard_columns(names: tuple[str, ...]) -> dict[str, list[tuple[np.ndarray, int]]]:
    """``{histogram name: [(bin columns, shard id column) per slot]}`` of the per-shard slots."""
    found, ids = _parse(names)
    out: dict[str, list[tuple[np.ndarray, int]]] = {}
    for name, bins in found.items():
        slot = _shard_slot(name)
        idx = _complete(bins)
        if slot is not None and idx is not None and name in ids:
            out.setdefault(slot[0], []).append((idx, ids[name]))
    return out


def _spec(rule: ReferenceRule | None) -> str | None:
    if rule is None:
        return None
    return json.dumps({"steps": list(rule.steps) if rule.steps else None, "from_run": rule.from_run,
                       "from_rank": rule.from_rank}, sort_keys=True)


def _steps(spec: str) -> tuple[int, int]:
    """``A:B`` (inclusive) as given to ``runwatch drift freeze --steps``."""
    first, sep, last = str(spec).partition(":")
    try:
        a, b = int(first), int(last)
    except ValueError:
        raise ValueError(f"steps {spec!r}: give FIRST:LAST, e.g. 1000:2000") from None
    if not sep or not 0 <= a <= b:
        raise ValueError(f"steps {spec!r}: give FIRST:LAST with 0 <= FIRST <= LAST")
    return a, b


@dataclass
class _Meta:
    """Where a monitor's reference came from, and what was last saved of it."""

    origin: str  # learned | config | cli
    spec: str | None
    source: str
    saved: Reference | None = None
    note: str = ""  # why a configured reference could not be used


class DriftMonitors:
    """Writer thread only. ``settings`` returns the monitor settings (the grid's lo/hi are
    placeholders: monitors work on counts), ``references`` the ``[[drift.references]]`` entries,
    and ``conn`` is the store's connection (the writer's), where references are saved and step
    ranges read; without one, nothing persists. Memory per monitor is a few fine-count vectors,
    plus a coarse window per followed shard."""

    def __init__(self, settings: Callable[[], DriftConfig] | None = None,
                 references: Callable[[], Sequence[ReferenceRule]] | None = None,
                 conn: sqlite3.Connection | None = None) -> None:
        self._settings = settings or (lambda: DriftConfig(lo=0.0, hi=1.0))
        self._references = references or (lambda: ())
        self._conn = conn
        if conn is not None:
            with conn:
                create_tables(conn)
        self._monitors: dict[tuple[int, str], DriftMonitor] = {}
        self._meta: dict[tuple[int, str], _Meta] = {}
        self._streams: dict[int, StreamInfo] = {}
        self._last_step: dict[tuple[int, str], int] = {}
        self._columns: dict[tuple[str, ...], tuple[dict[str, np.ndarray], dict[str, Any]]] = {}
        self._broken: set[tuple[int, str]] = set()

    def monitor(self, stream_id: int, name: str) -> DriftMonitor | None:
        return self._monitors.get((stream_id, name))

    def _config(self, fine: int) -> DriftConfig:
        base = self._settings()
        return DriftConfig(**{**base.__dict__, "lo": 0.0, "hi": 1.0, "fine": fine,
                              "bins": min(base.bins, fine)})

    def _monitor(self, stream: StreamInfo, name: str, fine: int, step: int) -> DriftMonitor:
        key = (stream.id, name)
        m = self._monitors.get(key)
        if m is not None and m.config.fine == fine:
            return m
        if m is None and sum(1 for sid, _ in self._monitors if sid == stream.id) >= MAX_MONITORS_PER_STREAM:
            raise ValueError(f"more than {MAX_MONITORS_PER_STREAM} histograms on one rank; {name!r} "
                             "is not monitored")
        m, meta = self._create(stream, name, self._config(fine), step)
        self._monitors[key], self._meta[key] = m, meta
        self._streams[stream.id] = stream
        if self._conn is not None:
            # Steps already stored were counted by the daemon that stored them (before a restart):
            # a hook's replay of them must not count again.
            row = self._conn.execute("SELECT MAX(step) FROM samples WHERE stream_id = ?",
                                     (stream.id,)).fetchone()
            if row and row[0] is not None:
                for k in (key, (stream.id, f"{name}{SHARD_MARK}s")):
                    self._last_step[k] = max(self._last_step.get(k, -1), int(row[0]))
        return m

    def _create(self, stream: StreamInfo, name: str, config: DriftConfig,
                step: int) -> tuple[DriftMonitor, _Meta]:
        rule = next((r for r in self._references() if fnmatch.fnmatchcase(stream.run, r.run)
                     and fnmatch.fnmatchcase(name, r.monitor)), None)
        spec = _spec(rule)
        saved = load_reference(self._conn, stream.run, stream.rank, name) if self._conn is not None else None
        if saved is not None and saved.fine == config.fine and (saved.origin == "cli" or saved.spec == spec):
            m = DriftMonitor(name, config)
            m.freeze_reference(saved.counts, first_step=saved.first_step, last_step=saved.last_step,
                               bins=saved.bins)
            log.info("drift monitor %s of run %s rank %d resumes with its saved reference (%s)",
                     name, stream.run, stream.rank, saved.source)
            return m, _Meta(saved.origin, saved.spec, saved.source, saved=m.reference)
        note = ""
        if rule is not None:
            try:
                m, source = self._configured(stream, name, config, rule, step)
                return m, _Meta("config", spec, f"{source} ([drift] references)")
            except (LookupError, ValueError) as exc:
                note = f"configured reference not usable: {exc}"
                log.warning("drift monitor %s of run %s rank %d: %s; learning one instead", name, stream.run,
                            stream.rank, note)
        return DriftMonitor(name, config), _Meta("learned", None, "", note=note)

    def _resolve(self, name: str, fine: int, run: str, rank: int, steps: tuple[int, int] | None
                 ) -> tuple[np.ndarray, int | None, int | None, CoarseBins | None, str]:
        """(fine counts, first, last, bins or None, source) of a stored step range, or of the
        saved reference of (run, rank, name) when ``steps`` is None. LookupError when missing."""
        if self._conn is None:
            raise LookupError("the daemon has no store to read references from")
        if steps is None:
            other = load_reference(self._conn, run, rank, name)
            if other is None:
                raise LookupError(f"run {run!r} rank {rank} has no saved reference for {name!r}")
            if other.fine != fine:
                raise LookupError(f"run {run!r} rank {rank}'s {name!r} has {other.fine} fine bins, "
                                  f"this one {fine}")
            return (other.counts, other.first_step, other.last_step, other.bins,
                    f"run {run} rank {rank}'s reference, {other.source}")
        counts, first, last = stored_histogram(self._conn, run, rank, name, *steps)
        if len(counts) != fine + 2:
            raise LookupError(f"run {run!r} rank {rank}'s {name!r} has {len(counts) - 2} fine bins, "
                              f"this one {fine}")
        return counts, first, last, None, f"steps {first}-{last} of run {run} rank {rank}"

    def _configured(self, stream: StreamInfo, name: str, config: DriftConfig, rule: ReferenceRule,
                    step: int) -> tuple[DriftMonitor, str]:
        run = rule.from_run or stream.run
        rank = stream.rank if rule.from_rank is None else rule.from_rank
        if rule.steps is not None and run == stream.run and rule.steps[1] >= step:
            # The run's own range, not all stored yet: collect it as it arrives, starting from
            # what the store already has of it (a daemon restarted inside the range).
            m = DriftMonitor(name, config, reference_steps=rule.steps)
            if rule.steps[0] < step and self._conn is not None:
                try:
                    counts, first, last = stored_histogram(self._conn, run, rank, name, rule.steps[0],
                                                           step - 1)
                    if len(counts) == config.fine + 2:
                        m.seed_reference(counts, first, last)
                except LookupError:
                    pass  # nothing of the range stored yet
            return m, f"steps {rule.steps[0]}-{rule.steps[1]}"
        counts, first, last, bins, source = self._resolve(name, config.fine, run, rank, rule.steps)
        m = DriftMonitor(name, config)
        m.freeze_reference(counts, first_step=first, last_step=last, bins=bins)
        return m, source

    def _save(self, stream: StreamInfo, name: str, m: DriftMonitor, meta: _Meta) -> None:
        ref = m.reference
        assert ref is not None
        if meta.origin == "learned":
            meta.source = f"learned from steps {ref.first_step}-{ref.last_step}"
        meta.saved = ref
        if self._conn is None:
            return
        try:
            save_reference(self._conn, stream.run, stream.rank, name, ref, meta.origin, meta.spec,
                           meta.source)
        except sqlite3.Error as exc:  # monitoring goes on; only a restart would re-learn it
            log.error("drift monitor %s of run %s rank %d: reference not saved: %s", name, stream.run,
                      stream.rank, exc)

    def derive(self, stream: StreamInfo, blocks: list[Block]) -> list[Block] | None:
        """``blocks`` with drift columns added to the rows that complete a window, or None."""
        out: list[Block] = []
        added = False
        for block in blocks:
            parsed = self._columns.get(block.names)
            if parsed is None:
                if len(self._columns) > 4096:
                    self._columns.clear()
                parsed = self._columns[block.names] = (histogram_columns(block.names),
                                                       shard_columns(block.names))
            cols, shards = parsed
            if not cols and not shards:
                out.append(block)
                continue
            rows = [self._row(stream, int(step), values, cols, shards)
                    for step, values in zip(block.steps.tolist(), block.values, strict=True)]
            if not any(rows):
                out.append(block)
                continue
            added = True
            start = 0
            for i in range(1, len(rows) + 1):
                if i == len(rows) or list(rows[i]) != list(rows[start]):
                    extra = rows[start]
                    part = slice(start, i)
                    values = block.values[part]
                    if extra:
                        names = tuple(k for k in extra if k not in block.names)
                        values = np.concatenate(
                            [values, np.array([[r[k] for k in names] for r in rows[part]])], axis=1)
                        out.append(Block((*block.names, *names), block.steps[part], block.times[part],
                                         values))
                    else:
                        out.append(Block(block.names, block.steps[part], block.times[part], values))
                    start = i
        return out if added else None

    def _row(self, stream: StreamInfo, step: int, values: np.ndarray, cols: dict[str, np.ndarray],
             shards: dict[str, list[tuple[np.ndarray, int]]]) -> dict[str, float]:
        extra: dict[str, float] = {}
        for name, idx in cols.items():
            key = (stream.id, name)
            if key in self._broken or step <= self._last_step.get(key, -1):
                continue  # a replayed step (the hook resends after a reconnect): counted once
            counts = values[idx]
            if not _good(counts):
                continue
            try:
                m = self._monitor(stream, name, len(idx) - 2, step)
                if step <= self._last_step.get(key, -1):
                    continue  # stored before this daemon started: the last one counted it
                self._last_step[key] = step
                results = m.add(step, counts)
            except (ValueError, ArithmeticError):
                log.exception("drift monitor %s of run %s rank %d is off", name, stream.run, stream.rank)
                self._broken.add(key)
                continue
            meta = self._meta[key]
            if m.reference is not None and m.reference is not meta.saved:
                self._save(stream, name, m, meta)
            for r in results:
                _put(extra, name, r)
        for name, slots in shards.items():
            key = (stream.id, f"{name}{SHARD_MARK}s")
            m = self._monitors.get((stream.id, name))
            if m is None or key in self._broken or step <= self._last_step.get(key, -1):
                continue
            self._last_step[key] = step
            try:
                for idx, id_col in slots:
                    shard, counts = values[id_col], values[idx]
                    if math.isfinite(shard) and len(idx) == m.config.fine + 2 and _good(counts):
                        m.add_shard(int(shard), step, counts)
            except (ValueError, ArithmeticError):
                log.exception("per-shard drift of %s of run %s rank %d is off", name, stream.run, stream.rank)
                self._broken.add(key)
                continue
            if m.reference is None:
                continue
            worst = m.worst_shard(step)
            extra[f"drift_state/{name}{SHARD_MARK}s"] = float(int(worst[1].state)) if worst else 0.0
            if worst is not None:
                extra[f"drift_shard/{name}"] = float(worst[0])
                extra[f"drift_psi/{name}{SHARD_MARK}s"] = worst[1].psi
                extra[f"drift_js/{name}{SHARD_MARK}s"] = worst[1].js_distance
                extra[f"drift_warn_threshold/{name}{SHARD_MARK}s"] = worst[1].warn_threshold
        return extra

    # -- queries (runwatch drift ...), on the writer thread --------------------------------

    def query(self, op: str, request: dict[str, Any]) -> dict[str, Any]:
        """``drift`` (list monitors) or ``drift_freeze``; errors come back as ``{"error": ...}``."""
        try:
            if op == "drift_freeze":
                return self.freeze(request)
            run = request.get("run")
            return {"monitors": self.describe(run if isinstance(run, str) else None)}
        except (LookupError, ValueError) as exc:
            return {"error": str(exc)}

    def describe(self, run: str | None = None) -> list[dict[str, Any]]:
        """Every monitor of this daemon (and saved references of monitors it has not met yet)."""
        out: list[dict[str, Any]] = []
        met: set[tuple[str, int, str]] = set()
        for (sid, name), m in sorted(self._monitors.items(), key=lambda kv: (
                self._streams[kv[0][0]].run, self._streams[kv[0][0]].rank, kv[0][1])):
            stream = self._streams[sid]
            if run is not None and stream.run != run:
                continue
            met.add((stream.run, stream.rank, name))
            meta, ref, last = self._meta[(sid, name)], m.reference, m.last_result
            worst = m.worst_shard(self._last_step.get((sid, name), 0))
            out.append({
                "run": stream.run, "rank": stream.rank, "monitor": name, "phase": m.phase,
                "broken": (sid, name) in self._broken, "fine": m.config.fine,
                "reference": None if ref is None else {
                    "origin": meta.origin, "source": meta.source, "first_step": ref.first_step,
                    "last_step": ref.last_step, "values": ref.m, "bins": ref.bins.n_bins},
                "note": meta.note,
                "last_window": None if last is None else {
                    "first_step": last.first_step, "last_step": last.last_step, "n": last.n, "psi": last.psi,
                    "js_distance": last.js_distance, "warn_threshold": last.warn_threshold,
                    "critical_threshold": last.critical_threshold, "state": int(last.state)},
                "shards_followed": m.shards_followed,
                "worst_shard": None if worst is None else {"shard": worst[0], "state": int(worst[1].state),
                                                           "psi": worst[1].psi},
            })
        if self._conn is not None:
            for s in saved_references(self._conn, run):
                if (s.run, s.rank, s.monitor) not in met:
                    out.append({"run": s.run, "rank": s.rank, "monitor": s.monitor, "phase": "saved",
                                "broken": False, "fine": s.fine, "note": "not met by this daemon yet",
                                "reference": {"origin": s.origin, "source": s.source,
                                              "first_step": s.first_step, "last_step": s.last_step,
                                              "values": int(s.counts.sum()), "bins": len(s.starts)},
                                "last_window": None, "shards_followed": 0, "worst_shard": None})
        return out

    def freeze(self, request: dict[str, Any]) -> dict[str, Any]:
        """Freeze the reference of ``monitor`` (a name or glob) of ``run`` (all its ranks, or
        ``rank``) from ``steps`` (``A:B``) of ``from_run`` (default the run itself; rank
        ``from_rank``, default the same), or from ``from_run``'s saved reference without steps.
        Saved at once; monitors this daemon has met switch to it at once."""
        run, pattern = request.get("run"), request.get("monitor")
        if not isinstance(run, str) or not isinstance(pattern, str) or not pattern:
            raise ValueError("drift freeze: give run (a name) and monitor (a name or glob)")
        rank, from_run, from_rank = request.get("rank"), request.get("from_run"), request.get("from_rank")
        if any(x is not None and (isinstance(x, bool) or not isinstance(x, int)) for x in (rank, from_rank)):
            raise ValueError("drift freeze: rank and from_rank must be integers")
        if from_run is not None and not isinstance(from_run, str):
            raise ValueError("drift freeze: from_run must be a run name")
        steps = _steps(request["steps"]) if request.get("steps") is not None else None
        if steps is None and from_run is None:
            raise ValueError("drift freeze: give --steps FIRST:LAST, --from-run RUN, or both")
        if self._conn is None:
            raise LookupError("drift freeze: the daemon has no store")
        # The monitors to freeze: those met by this daemon, and those saved from before.
        targets: dict[tuple[int, str], int] = {}  # (rank, monitor) -> fine
        for (sid, name), m in self._monitors.items():
            st = self._streams[sid]
            if st.run == run and (rank is None or st.rank == rank) and fnmatch.fnmatchcase(name, pattern):
                targets[(st.rank, name)] = m.config.fine
        for s in saved_references(self._conn, run):
            if (rank is None or s.rank == rank) and fnmatch.fnmatchcase(s.monitor, pattern):
                targets.setdefault((s.rank, s.monitor), s.fine)
        if not targets and rank is not None and "*" not in pattern and "?" not in pattern:
            fine = self._stored_fine(pattern)  # a monitor only the store has seen
            if fine is not None:
                targets[(rank, pattern)] = fine
        if not targets:
            raise LookupError(f"run {run!r} has no drift monitor matching {pattern!r}"
                              + ("" if rank is None else f" on rank {rank}"))
        frozen = []
        for (r, name), fine in sorted(targets.items()):
            src_run = from_run or run
            src_rank = r if from_rank is None else from_rank
            counts, first, last, bins, source = self._resolve(name, fine, src_run, src_rank, steps)
            uid = request.get("peer_uid")
            source = f"{source} (runwatch drift freeze by uid {uid})"
            m = self._live(run, r, name)
            if m is not None:
                ref = m.freeze_reference(counts, first_step=first, last_step=last, bins=bins)
                key = self._key(run, r, name)
                assert key is not None
                meta = self._meta[key] = _Meta("cli", None, source)
                self._broken.discard(key)  # a monitor switched off by a bad reference range gets another go
                self._save(self._streams[key[0]], name, m, meta)
            else:
                probe = DriftMonitor(name, self._config(fine))
                ref = probe.freeze_reference(counts, first_step=first, last_step=last, bins=bins)
                save_reference(self._conn, run, r, name, ref, "cli", None, source)
            frozen.append({"run": run, "rank": r, "monitor": name, "source": source,
                           "first_step": ref.first_step, "last_step": ref.last_step, "values": ref.m,
                           "bins": ref.bins.n_bins, "live": m is not None})
        return {"frozen": frozen}

    def _key(self, run: str, rank: int, name: str) -> tuple[int, str] | None:
        for sid, st in self._streams.items():
            if st.run == run and st.rank == rank and (sid, name) in self._monitors:
                return sid, name
        return None

    def _live(self, run: str, rank: int, name: str) -> DriftMonitor | None:
        key = self._key(run, rank, name)
        return None if key is None else self._monitors[key]

    def _stored_fine(self, name: str) -> int | None:
        assert self._conn is not None
        for names in metric_sets(self._conn).values():
            idx = histogram_columns(names).get(name)
            if idx is not None:
                return len(idx) - 2
        return None


def _good(counts: np.ndarray) -> bool:
    return bool(np.isfinite(counts).all() and not (counts < 0).any() and np.isfinite(counts.sum()))


def _put(extra: dict[str, float], name: str, r: DriftResult) -> None:
    extra[f"drift_psi/{name}"] = r.psi
    extra[f"drift_js/{name}"] = r.js_distance
    extra[f"drift_warn_threshold/{name}"] = r.warn_threshold
    extra[f"drift_state/{name}"] = float(int(r.state))
