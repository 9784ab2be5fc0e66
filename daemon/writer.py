"""The writer thread: the only code that writes the store.

Ingest hands it decoded frames; it groups whatever is queued into one transaction,
commits, then reports each frame as done so ingest can ack it. Acknowledging only after
the commit is what makes "reached the daemon" mean "survives kill -9".
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
from itertools import repeat
from typing import Any

from runwatch.daemon.exporter import DaemonMetrics
from runwatch.daemon.live import LiveView
from runwatch.daemon.protocol import Block, Samples
from runwatch.daemon.store import Store

log = logging.getLogger("runwatch.writer")

Done = Callable[[BaseException | None], None]


@dataclass
class Write:
    stream_id: int
    samples: Samples
    done: Done


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
    ) -> None:
        self.store = store
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
        error: BaseException | None = None
        try:
            with store.conn:
                last_seen: dict[int, float] = {}
                for w in writes:
                    for block in w.samples.blocks:
                        set_id = store.metric_set_id(block.names)
                        values = block.values
                        store.insert_rows(
                            zip(
                                repeat(w.stream_id),
                                block.steps.tolist(),
                                block.times.tolist(),
                                repeat(set_id),
                                (row.tobytes() for row in values),
                                strict=False,
                            )
                        )
                        last_seen[w.stream_id] = max(
                            last_seen.get(w.stream_id, 0.0), float(block.times[-1])
                        )
                store.touch_streams([(t, sid) for sid, t in last_seen.items()])
        except sqlite3.Error as exc:
            error = exc
            try:
                store.forget_uncommitted()
            except sqlite3.Error:
                store._metric_sets.clear()
            self.metrics.store_errors.labels(_store_error_kind(exc)).inc()
            log.error("store commit of %d frames failed: %s (not acknowledged; hooks will resend)",
                      len(writes), exc)
        else:
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


def _store_error_kind(exc: sqlite3.Error) -> str:
    text = str(exc).lower()
    if "full" in text:
        return "disk_full"
    if "readonly" in text or "read-only" in text:
        return "read_only"
    if "locked" in text or "busy" in text:
        return "busy"
    return "other"
