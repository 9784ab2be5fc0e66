"""The notifier: feeds rule events through the pipeline and delivers the outbox.

One dispatcher thread routes and groups alerts and flushes groups when due; one delivery
thread per receiver sends that receiver's outbox in order, at most ``messages_per_second``,
honouring ``Retry-After``, backing off exponentially (up to ``retry_max_seconds``) on 429,
5xx and network errors, never retrying a refusal (4xx), and giving up after ``max_attempts``.
A receiver that is down only delays its own queue.
"""

from __future__ import annotations

import logging
import math
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from runwatch.daemon.notify.config import Alerting
from runwatch.daemon.notify.model import Alert
from runwatch.daemon.notify.outbox import NotifyStore, Pending
from runwatch.daemon.notify.pipeline import Decided, Dispatcher
from runwatch.daemon.notify.receivers import Delivery, Receiver, build
from runwatch.daemon.rules.engine import Event

log = logging.getLogger("runwatch.notify")

_STOP = object()
KEEP_SECONDS = 7 * 86400.0  # sent messages, quiet log entries and ended silences are kept a week
PRUNE_EVERY_SECONDS = 3600.0
RETRY_AFTER_MAX = 3600.0


class Notifier:
    def __init__(
        self, config: Alerting, store_path: Path, metrics: Any, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.clock = clock
        self.metrics = metrics
        self.node = config.node or socket.gethostname()
        self.receivers: dict[str, Receiver] = {
            name: build(name, cfg) for name, cfg in config.effective_receivers().items()
        }
        self.store = NotifyStore(store_path)
        self._lock = threading.Lock()  # one SQLite connection, several threads
        self.dispatcher = Dispatcher(config, clock, self._log_entry, self._silences, self._record)
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._wake = {name: threading.Event() for name in self.receivers}
        self._stopping = threading.Event()
        for name in self.receivers:  # read at scrape time: the backlog while a receiver is down
            metrics.outbox_pending.labels(name).set_function(lambda name=name: self._pending(name))
            for result in ("sent", "retry", "failed"):  # from 0, so increase() counts the first one
                metrics.notifications.labels(name, result)
        self._threads = [threading.Thread(target=self._dispatch, name="runwatch-notify", daemon=True)] + [
            threading.Thread(target=self._deliver, args=(name,), name=f"runwatch-deliver-{name}", daemon=True)
            for name in self.receivers
        ]

    # -- public ---------------------------------------------------------------------------------

    def start(self, firing: Iterable[Event] = ()) -> None:
        """Start; ``firing`` are the alerts already firing (taken over after a restart), so their
        groups are known and, being in the notification log, not announced again."""
        now = self.clock()
        seeded = [Alert.from_event(e, self.node, now) for e in firing]
        self.dispatcher.receive(seeded)
        # Alerts a receiver was told are firing but that no longer fire resolved while no
        # daemon was listening: tell the receivers now (an open incident must not stay open).
        alive = {a.fingerprint for a in seeded}
        gone: dict[str, Alert] = {}
        with self._lock:
            announced = self.store.firing_announced()
        for alerts in announced.values():
            for fp, data in alerts.items():
                if fp not in alive and fp not in gone:
                    a = Alert.from_json(data)
                    gone[fp] = replace(
                        a,
                        state="resolved",
                        ends_at=now,
                        summary=f"resolved while the daemon was down: {a.summary}",
                    )
        if gone:
            log.info(
                "%d announced alert(s) resolved while the daemon was down; telling the receivers", len(gone)
            )
            self.dispatcher.receive(gone.values())
        for t in self._threads:
            t.start()

    def submit(self, events: list[Event]) -> None:
        """Rule events, from the writer thread; never blocks."""
        if events:
            now = self.clock()
            self._inbox.put([Alert.from_event(e, self.node, now) for e in events])

    def poke(self) -> None:
        """Look at the clock now: the dispatcher flushes what is due, every delivery thread
        retries what is due. (Their waits are real time; an injected clock needs this.)"""
        self._inbox.put([])
        for ev in self._wake.values():
            ev.set()

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(_STOP)
        for ev in self._wake.values():
            ev.set()
        for t in self._threads:
            t.join(timeout=15)
        self.store.close()

    def silence(self, matchers: dict[str, str], seconds: float, comment: str, by: str) -> int:
        now = self.clock()
        with self._lock:
            sid = self.store.add_silence(matchers, now, now + seconds, comment, by)
        log.info("silence %d added by %s for %.0fs: %s (%s)", sid, by, seconds, matchers, comment)
        return sid

    def expire(self, silence_id: int) -> bool:
        with self._lock:
            return self.store.expire_silence(silence_id, self.clock())

    def silences(self) -> list[Any]:
        return self._silences()

    def outbox(self, limit: int = 50) -> list[dict[str, Any]]:
        with self._lock:
            return self.store.outbox(limit)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return self.store.counts()

    def _pending(self, receiver: str) -> float:
        try:
            with self._lock:
                return float(self.store.pending(receiver))
        except Exception:  # the store is closed (stopping): no reading rather than a failed scrape
            return math.nan

    # -- the dispatcher thread --------------------------------------------------------------------

    def _log_entry(self, receiver: str, key: str) -> Any:
        with self._lock:
            return self.store.log_entry(receiver, key)

    def _silences(self) -> list[Any]:
        with self._lock:
            return self.store.silences()

    def _record(self, decided: list[Decided]) -> None:
        with self._lock:
            self.store.record(decided, self.clock())
        for d in decided:
            if d.notification is not None:
                self.metrics.notify_decisions.labels(d.notification.reason.name.lower()).inc()
                self._wake[d.receiver].set()

    def _dispatch(self) -> None:
        next_prune = self.clock()
        while True:
            try:
                if self.clock() >= next_prune:
                    next_prune = self.clock() + PRUNE_EVERY_SECONDS
                    with self._lock:
                        self.store.prune(self.clock() - KEEP_SECONDS)
                due = self.dispatcher.next_due()
                timeout = 1.0 if due is None else min(1.0, max(0.0, due - self.clock()))
                try:
                    item = self._inbox.get(timeout=timeout)
                except queue.Empty:
                    item = None
                if item is _STOP:
                    self._drain()
                    return
                if item is not None:
                    self.dispatcher.receive(item)
                self.dispatcher.flush_due()
            except Exception:
                log.exception("notification dispatch failed; alerts are stored, retrying in a second")
                time.sleep(1.0)

    def _drain(self) -> None:
        """At shutdown: take what is queued and decide every group now, so the outbox holds
        it (delivered by the next daemon if not by this one)."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                self.dispatcher.receive(item)
        self.dispatcher.flush_due(everything=True)

    # -- one delivery thread per receiver ---------------------------------------------------------

    def _deliver(self, name: str) -> None:
        receiver = self.receivers[name]
        spacing = 1.0 / receiver.config.messages_per_second
        last_send = -float("inf")
        while not self._stopping.is_set():
            try:
                last_send = self._deliver_one(name, receiver, spacing, last_send)
            except Exception:
                log.exception("delivery to %s failed unexpectedly; retrying in a second", name)
                self._wake[name].wait(timeout=1.0)

    def _deliver_one(self, name: str, receiver: Receiver, spacing: float, last_send: float) -> float:
        """One step of a receiver's delivery loop; returns when it last sent."""
        with self._lock:
            pending = self.store.next_pending(name)
        now = self.clock()
        wait = 0.0 if pending is None else max(pending.next_attempt, last_send + spacing) - now
        if pending is None or wait > 0:
            self._wake[name].wait(timeout=1.0 if pending is None else min(wait, 1.0))
            self._wake[name].clear()
            return last_send
        with self._lock:
            ref = self.store.ref(name, pending.notification.group_key)
        try:
            outcome = receiver.send(pending.notification, ref)
        except Exception as exc:  # a receiver bug must not end delivery; its text may hold a secret
            log.error("receiver %s raised %s", name, type(exc).__name__)
            outcome = Delivery(False, True, None, type(exc).__name__)
        self._settle(name, pending, outcome, receiver.config.max_attempts)
        return self.clock()

    def _settle(self, name: str, p: Pending, outcome: Any, max_attempts: int) -> None:
        now = self.clock()
        with self._lock:
            if outcome.ok:
                self.store.delivered(p, now, outcome.ref)
                result = "sent"
            elif outcome.retry and p.attempts + 1 < max_attempts:
                cap = self.config.retry_max_seconds
                backoff = min(cap, 2.0 ** min(p.attempts, 30))
                # Retry-After is honoured, up to an hour (a bogus value must not park the queue).
                delay = (
                    min(RETRY_AFTER_MAX, outcome.retry_after) if outcome.retry_after is not None else backoff
                )
                self.store.retry_later(p, now + delay, outcome.error)
                result = "retry"
            else:
                self.store.give_up(p, outcome.error)
                result = "failed"
        self.metrics.notifications.labels(name, result).inc()
        if result == "sent":
            log.info("notified %s: %s (%s)", name, p.notification.state, p.notification.reason.value)
        elif result == "retry":
            log.warning("notifying %s failed (%s); will retry", name, outcome.error)
        else:
            log.error(
                "notifying %s failed for good after %d attempts: %s", name, p.attempts + 1, outcome.error
            )
