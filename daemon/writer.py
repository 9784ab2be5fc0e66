"""The writer thread: the only code that writes the store.

Ingest hands it decoded frames; it groups whatever is queued into one transaction,
commits, then reports each frame as done so ingest can ack it. Acknowledging only after
the commit is what makes "reached the daemon" mean "survives kill -9".

After acknowledging, it hands the committed steps to the rules engine (one call per stream
and metric set, however many frames the commit held, which is what keeps rules cheap under
load) and stores the firings, resolutions and decisions that come out; the playbook then acts on
the firings that name interventions (pause, rewind, ...).
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from itertools import groupby, repeat
from typing import Any

import numpy as np

from runwatch.daemon.exporter import DaemonMetrics
from runwatch.daemon.live import LiveView
from runwatch.daemon.monitors import DriftMonitors
from runwatch.daemon.playbook import Playbook
from runwatch.daemon.protocol import Block, Samples
from runwatch.daemon.ranks import RankComparison
from runwatch.daemon.rules.engine import Engine, Event, StreamRef
from runwatch.daemon.store import DiskReserve, Store, StoreFull, StreamInfo

log = logging.getLogger("runwatch.writer")

Done = Callable[[BaseException | None], None]


@dataclass
class Write:
    stream: StreamInfo
    samples: Samples
    done: Done

    @property
    def stream_id(self) -> int:
        return self.stream.id


@dataclass
class Call:
    fn: Callable[[Store], Any]
    future: Future[Any]


_STOP = object()
MAX_BATCH_FRAMES = 2048
MAX_BATCH_POINTS = 2_000_000


class Writer:
    """Owns the store. ``submit`` and ``call`` are safe from any thread."""

    def __init__(
        self,
        store: Store,
        live: LiveView,
        metrics: DaemonMetrics,
        notify: Callable[[list[tuple[Done, BaseException | None]]], None],
        engine: Engine | None = None,
        on_events: Callable[[list[Event]], None] | None = None,
    ) -> None:
        self.playbook: Playbook | None = None  # set once ingest exists (it delivers the commands)
        self.reserve: DiskReserve | None = None  # room kept for alerts when the disk fills
        self._told_repeated: set[tuple[int, int]] = set()
        self.store = store
        self.engine = engine
        self.on_events = on_events
        self._refs: dict[int, StreamRef] = {}
        self.ranks = RankComparison()  # derived series: how long each rank makes the others wait
        self.drift = DriftMonitors()  # derived series: drift_psi/<name>, drift_state/<name>, ...
        self.live = live
        self.metrics = metrics
        self._notify = notify
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="runwatch-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, write: Write) -> None:
        self._queue.put(write)

    def call(self, fn: Callable[[Store], Any]) -> Future[Any]:
        """Run ``fn(store)`` on the writer thread, in order with the writes before it."""
        future: Future[Any] = Future()
        self._queue.put(Call(fn, future))
        return future

    def stop(self) -> None:
        """Commit everything queued so far, then end the thread."""
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        pending: list[Write] = []
        while True:
            item = self._queue.get()
            points = 0
            while True:
                if isinstance(item, Write):
                    pending.append(item)
                    points += item.samples.n_points
                else:
                    self._commit(pending)
                    pending = []
                    if item is _STOP:
                        return
                    self._run_call(item)
                if len(pending) >= MAX_BATCH_FRAMES or points >= MAX_BATCH_POINTS:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            self._commit(pending)
            pending = []

    def _run_call(self, call: Call) -> None:
        if not call.future.set_running_or_notify_cancel():
            return
        try:
            call.future.set_result(call.fn(self.store))
        except BaseException as exc:
            call.future.set_exception(exc)

    def _commit(self, writes: list[Write]) -> None:
        if not writes:
            return
        started = time.perf_counter()
        store = self.store
        error: BaseException | None
        reserve = self.reserve
        if reserve is not None and reserve.full and not self._recovered(reserve):
            # Nothing will be stored: judge the frames as sent, but do not derive series from
            # them (a derived stage would count these steps and skip them on their resend).
            self.metrics.store_errors.labels("disk_full").inc()
            self._notify([(w.done, StoreFull(f"store {store.path}: disk full; history paused, alerts go on"))
                          for w in writes])
            self._judge_guarded(writes)
            return
        for w in writes:
            for stage in (self.ranks, self.drift):
                try:
                    blocks = stage.derive(w.stream, w.samples.blocks)
                except Exception:
                    # A derived series failing must not stop the writer: the frame is stored as sent.
                    self.metrics.rule_errors.inc()
                    log.exception("deriving %s for run %s rank %d failed; storing the frame as sent",
                                  type(stage).__name__, w.stream.run, w.stream.rank)
                    continue
                if blocks is not None:
                    w.samples = Samples(w.samples.seq, blocks)
        error = self._insert(writes)
        if error is None:
            # The live view only needs the newest block per (stream, metric set) of this commit.
            newest: dict[tuple[int, tuple[str, ...]], Block] = {}
            points = 0
            for w in writes:
                for block in w.samples.blocks:
                    key = (w.stream_id, block.names)
                    seen = newest.get(key)
                    if seen is None or block.steps[-1] > seen.steps[-1]:
                        newest[key] = block
                points += w.samples.n_points
            for (stream_id, _), block in newest.items():
                self.live.apply(stream_id, block)
            self.metrics.points.inc(points)
            self.metrics.frames.inc(len(writes))
            self.metrics.commit_seconds.observe(time.perf_counter() - started)
        self._notify([(w.done, error) for w in writes])
        # Alerts take priority over history: steps the full disk refused are judged all the same
        # (the engine skips steps it has seen, so their resend after recovery is not judged twice).
        if error is None or (reserve is not None and reserve.full):
            self._judge_guarded(writes)

    def _judge_guarded(self, writes: list[Write]) -> None:
        if self.engine is None:
            return
        try:
            self._judge(writes)
        except Exception:
            # The data is stored and acknowledged (or, disk full, refused); a rule failing must
            # not stop the writer.
            self.metrics.rule_errors.inc()
            log.exception("judging %d frames failed", len(writes))

    def _insert(self, writes: list[Write]) -> sqlite3.Error | None:
        store = self.store
        repeated: list[tuple[StreamInfo, int, int]] = []
        try:
            with store.conn:
                last_seen: dict[int, float] = {}
                for w in writes:
                    for block in w.samples.blocks:
                        set_id = store.metric_set_id(block.names)
                        new = store.insert_rows(
                            zip(
                                repeat(w.stream_id),
                                block.steps.tolist(),
                                block.times.tolist(),
                                repeat(set_id),
                                (row.tobytes() for row in block.values),
                                strict=False,
                            )
                        )
                        if new < len(block.steps):
                            repeated.append((w.stream, len(block.steps) - new, int(block.steps[0])))
                        last_seen[w.stream_id] = max(
                            last_seen.get(w.stream_id, 0.0), float(block.times[-1])
                        )
                store.touch_streams([(t, sid) for sid, t in last_seen.items()])
        except sqlite3.Error as exc:
            try:
                store.forget_uncommitted()
            except sqlite3.Error:
                store._metric_sets.clear()
            kind = store_error_kind(exc)
            self.metrics.store_errors.labels(kind).inc()
            if kind == "disk_full" and self.reserve is not None:
                self.reserve.give_up()
                self.metrics.store_full.set(1)
                log.error("store %s: the disk is full (%s). Sample history is paused: hooks keep their"
                          " steps and resend them; alerts go on in the %d MiB set aside. Free space on"
                          " that disk and history resumes by itself (pruning cannot help: the file"
                          " does not shrink).",
                          store.path, exc, self.reserve.size >> 20)
            else:
                log.error("store commit of %d frames failed: %s (not acknowledged; hooks will resend)",
                          len(writes), exc)
            return exc
        for stream, count, first in repeated:
            self._repeated(stream, count, first)
        return None

    def _repeated(self, stream: StreamInfo, count: int, first: int) -> None:
        """Steps already stored were sent again: counted, and said once per process."""
        self.metrics.repeated_steps.inc(count)
        if (stream.id, stream.pid) in self._told_repeated:
            return
        self._told_repeated.add((stream.id, stream.pid))
        log.warning("run %s rank %d (pid %d) sent %d step(s) from step %d that are already stored; they are"
                    " ignored. After a daemon restart this is the hook resending what it could not know"
                    " was stored. If this process is a relaunch whose step count started again, its"
                    " steps are not stored or judged until it passes the old ones: give"
                    " watch(start_step=...).", stream.run, stream.rank, stream.pid, count, first)

    def _recovered(self, reserve: DiskReserve) -> bool:
        if not reserve.recovered():
            return False
        self.metrics.store_full.set(0)
        log.warning("store %s: disk space is back; sample history resumes (hooks resend what waited)",
                    self.store.path)
        return True

    # -- rules ----------------------------------------------------------------------------

    def _judge(self, writes: list[Write]) -> None:
        started = time.perf_counter()
        engine = self.engine
        assert engine is not None
        now = time.time()
        by_stream: dict[int, list[Block]] = {}
        for w in writes:
            if w.stream.id not in self._refs:
                self._refs[w.stream.id] = StreamRef(w.stream.id, w.stream.run, w.stream.rank, w.stream.host)
            by_stream.setdefault(w.stream.id, []).extend(w.samples.blocks)
        events: list[Event] = []
        for stream_id, blocks in by_stream.items():
            ref = self._refs[stream_id]
            for names, group in groupby(blocks, key=lambda b: b.names):
                run = list(group)
                if len(run) == 1:
                    steps, times, values = run[0].steps, run[0].times, run[0].values
                else:
                    steps = np.concatenate([b.steps for b in run])
                    times = np.concatenate([b.times for b in run])
                    values = np.concatenate([b.values for b in run])
                if len(steps) > 1 and (np.diff(steps) <= 0).any():
                    order = np.argsort(steps, kind="stable")
                    steps, times, values = steps[order], times[order], values[order]
                set_id = self.store.metric_set_id(names)
                events += engine.observe(ref, set_id, names, steps, times, values, now)
        self.metrics.rule_seconds.inc(time.perf_counter() - started)
        self.record(events, now)

    def tick(self, connected: list[int], held: list[int] | None = None) -> None:
        """Judge ``absent`` rules and the playbook's clock now (queued: runs on this thread, in
        order with the writes). ``held`` streams are connected but not expected to step."""
        if self.engine is not None:
            engine = self.engine
            self.call(lambda store: self.guarded(lambda: self.record(
                engine.tick(time.time(), connected, held or []))))
        if self.playbook is not None:
            playbook = self.playbook
            self.call(lambda store: self.guarded(lambda: self.record(playbook.tick())))

    def guarded(self, fn: Callable[[], Any]) -> None:
        """Run rule work queued to this thread; a failure is logged and counted, never raised."""
        try:
            fn()
        except Exception:
            self.metrics.rule_errors.inc()
            log.exception("rule evaluation failed")

    def record(self, events: list[Event], now: float | None = None) -> None:
        """Store and count rule events. Writer thread only."""
        if not events:
            return
        now = time.time() if now is None else now
        for e in events:
            self.metrics.alert_transitions.labels(e.rule, e.severity, e.state).inc()
            log_fn = log.warning if e.state == "firing" and e.severity != "info" else log.info
            log_fn("%s %s [%s] run %s rank %d: %s", e.state, e.rule, e.severity, e.run, e.rank, e.summary)
            if e.state == "firing":
                for action in e.actions:
                    self.metrics.decisions.labels(action).inc()
        try:
            with self.store.conn:
                for e in events:
                    self.store.insert_event(now, e)
        except sqlite3.Error as exc:
            self.metrics.store_errors.labels(store_error_kind(exc)).inc()
            log.error("could not store %d alert events (%s); they were logged above", len(events), exc)
        if self.on_events is not None:
            self.on_events(events)
        if self.playbook is not None:
            try:
                more = self.playbook.on_alerts(events)
            except Exception:
                self.metrics.rule_errors.inc()
                log.exception("the playbook failed on %d alert events; they are stored", len(events))
                return
            self.record(more, now)


def store_error_kind(exc: sqlite3.Error) -> str:
    text = str(exc).lower()
    if "full" in text:
        return "disk_full"
    if "readonly" in text or "read-only" in text:
        return "read_only"
    if "locked" in text or "busy" in text:
        return "busy"
    return "other"
