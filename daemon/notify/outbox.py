"""The notification log, the outbox and the silences, in the daemon's SQLite store.

The notifier thread owns one connection (WAL lets it write beside the sample writer; its
transactions are a few rows). A decision and its outbox row commit together, so after a
crash a notification is either decided and waiting in the outbox, or not decided at all:
nothing is paged twice because of a restart, and nothing decided is forgotten. Delivery is
at-least-once: a message the receiver took just before a crash can be sent again (PagerDuty
dedups it by its key).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runwatch.daemon.notify.model import Alert
from runwatch.daemon.notify.pipeline import Decided, LogEntry, Notification, Reason, Silence
from runwatch.daemon.store import _connect


@dataclass(frozen=True)
class Pending:
    id: int
    notification: Notification
    attempts: int
    next_attempt: float


class NotifyStore:
    """One thread's connection to the notify tables (the schema is created by the Store)."""

    def __init__(self, path: Path) -> None:
        self.conn = _connect(path)
        self._log: dict[tuple[str, str], LogEntry] = {}
        for receiver, key, firing, resolved, at, ref in self.conn.execute(
            "SELECT receiver, group_key, firing, resolved, at, ref FROM notify_log"
        ):
            self._log[(receiver, key)] = LogEntry(
                frozenset(json.loads(firing)), frozenset(json.loads(resolved)), at, ref
            )

    def close(self) -> None:
        self.conn.close()

    # -- the notification log and the outbox ------------------------------------------------

    def log_entry(self, receiver: str, key: str) -> LogEntry | None:
        return self._log.get((receiver, key))

    def record(self, decided: list[Decided], now: float) -> None:
        """Record decisions and queue their notifications, in one transaction."""
        with self.conn:
            for d in decided:
                self.conn.execute(
                    "INSERT INTO notify_log (receiver, group_key, firing, resolved, at, ref)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (receiver, group_key) DO UPDATE SET"
                    " firing = excluded.firing, resolved = excluded.resolved, at = excluded.at",
                    (
                        d.receiver,
                        d.group_key,
                        json.dumps(sorted(d.entry.firing)),
                        json.dumps(sorted(d.entry.resolved)),
                        d.entry.at,
                        d.entry.ref,
                    ),
                )
                if d.notification is not None:
                    self.conn.execute(
                        "INSERT INTO outbox (receiver, group_key, created, payload, state, next_attempt)"
                        " VALUES (?, ?, ?, ?, 'pending', ?)",
                        (d.receiver, d.group_key, now, json.dumps(_encode(d.notification)), now),
                    )
        for d in decided:
            known = self._log.get((d.receiver, d.group_key))
            ref = known.ref if known is not None and known.ref else d.entry.ref  # delivered() may have set it
            self._log[(d.receiver, d.group_key)] = LogEntry(d.entry.firing, d.entry.resolved, d.entry.at, ref)

    def next_pending(self, receiver: str) -> Pending | None:
        """The oldest undelivered notification of a receiver (delivery is in order)."""
        row = self.conn.execute(
            "SELECT id, payload, attempts, next_attempt FROM outbox WHERE receiver = ? AND state = 'pending'"
            " ORDER BY id LIMIT 1",
            (receiver,),
        ).fetchone()
        if row is None:
            return None
        return Pending(row[0], _decode(json.loads(row[1])), row[2], row[3])

    def delivered(self, p: Pending, now: float, ref: str | None) -> None:
        n = p.notification
        with self.conn:
            self.conn.execute(
                "UPDATE outbox SET state = 'sent', sent_at = ?, attempts = attempts + 1 WHERE id = ?",
                (now, p.id),
            )
            if ref is not None and n.firing:
                self.conn.execute(
                    "UPDATE notify_log SET ref = ? WHERE receiver = ? AND group_key = ?",
                    (ref, n.receiver, n.group_key),
                )
        if ref is not None and n.firing and (n.receiver, n.group_key) in self._log:
            entry = self._log[(n.receiver, n.group_key)]
            self._log[(n.receiver, n.group_key)] = LogEntry(entry.firing, entry.resolved, entry.at, ref)

    def retry_later(self, p: Pending, at: float, error: str) -> None:
        with self.conn:
            self.conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt = ?, last_error = ? WHERE id = ?",
                (at, error, p.id),
            )

    def give_up(self, p: Pending, error: str) -> None:
        with self.conn:
            self.conn.execute(
                "UPDATE outbox SET state = 'failed', attempts = attempts + 1, last_error = ? WHERE id = ?",
                (error, p.id),
            )

    def firing_announced(self) -> dict[tuple[str, str], dict[str, dict[str, Any]]]:
        """Alerts each (receiver, group) was last told are firing, as the outbox sent them:
        what a restarted daemon must resolve if they no longer fire."""
        out: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        for (receiver, key), entry in self._log.items():
            if not entry.firing:
                continue
            found: dict[str, dict[str, Any]] = {}
            for (payload,) in self.conn.execute(
                "SELECT payload FROM outbox WHERE receiver = ? AND group_key = ? ORDER BY id DESC LIMIT 20",
                (receiver, key),
            ):
                for a in json.loads(payload)["firing"]:
                    if a["fingerprint"] in entry.firing:
                        found.setdefault(a["fingerprint"], a)
            out[(receiver, key)] = found
        return out

    def ref(self, receiver: str, key: str) -> str | None:
        entry = self._log.get((receiver, key))
        return entry.ref if entry else None

    def outbox(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT id, receiver, group_key, created, state, attempts, next_attempt, last_error, sent_at,"
            " payload"
            " FROM outbox ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        keys = (
            "id",
            "receiver",
            "group_key",
            "created",
            "state",
            "attempts",
            "next_attempt",
            "last_error",
            "sent_at",
        )
        out = []
        for row in rows:
            d = dict(zip(keys, row[:-1], strict=True))
            payload = json.loads(row[-1])
            d["reason"] = payload["reason"]
            d["firing"] = len(payload["firing"])
            d["resolved"] = len(payload["resolved"])
            out.append(d)
        return out

    def pending(self, receiver: str) -> int:
        """How many notifications wait for a receiver (its backlog)."""
        row = self.conn.execute(
            "SELECT COUNT(*) FROM outbox WHERE receiver = ? AND state = 'pending'", (receiver,)
        ).fetchone()
        return int(row[0])

    def counts(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall())

    def prune(self, before: float) -> int:
        """Forget delivered or abandoned messages, quiet log entries and silences that ended
        before ``before``: the tables hold recent history, not all history."""
        with self.conn:
            n = self.conn.execute(
                "DELETE FROM outbox WHERE state != 'pending' AND created < ?", (before,)
            ).rowcount
            self.conn.execute("DELETE FROM notify_log WHERE firing = '[]' AND at < ?", (before,))
            self.conn.execute("DELETE FROM silences WHERE ends_at < ?", (before,))
        self._log = {k: e for k, e in self._log.items() if e.firing or e.at >= before}
        return n

    # -- silences -----------------------------------------------------------------------------

    def add_silence(self, matchers: dict[str, str], starts: float, ends: float, comment: str, by: str) -> int:
        with self.conn:
            cur = self.conn.execute(
                "INSERT INTO silences (matchers, starts_at, ends_at, comment, created_by)"
                " VALUES (?, ?, ?, ?, ?)",
                (json.dumps(matchers, sort_keys=True), starts, ends, comment, by),
            )
        return int(cur.lastrowid or 0)

    def silences(self) -> list[Silence]:
        return [
            Silence(i, json.loads(m), s, e, c, b)
            for i, m, s, e, c, b in self.conn.execute(
                "SELECT id, matchers, starts_at, ends_at, comment, created_by FROM silences ORDER BY id"
            )
        ]

    def expire_silence(self, silence_id: int, now: float) -> bool:
        with self.conn:
            cur = self.conn.execute(
                "UPDATE silences SET ends_at = ? WHERE id = ? AND ends_at > ?", (now, silence_id, now)
            )
        return cur.rowcount > 0


def _encode(n: Notification) -> dict[str, Any]:
    return {
        "receiver": n.receiver,
        "group_key": n.group_key,
        "group_labels": n.group_labels,
        "reason": n.reason.value,
        "firing": [a.to_json() for a in n.firing],
        "resolved": [a.to_json() for a in n.resolved],
        "created_at": n.created_at,
    }


def _decode(d: dict[str, Any]) -> Notification:
    return Notification(
        d["receiver"],
        d["group_key"],
        d["group_labels"],
        Reason(d["reason"]),
        [Alert.from_json(a) for a in d["firing"]],
        [Alert.from_json(a) for a in d["resolved"]],
        d["created_at"],
    )
