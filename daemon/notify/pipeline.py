"""The notify pipeline, as Alertmanager's: route → group → (silence, inhibit) → dedup → outbox.

Each stage is a small function or class with one job; the clock is passed in, so every branch
is testable without waiting. The decision whether a group's receiver hears about it is one
table, :func:`needs_update`, answering with a named :class:`Reason`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from runwatch.daemon.notify.config import Alerting, Inhibit
from runwatch.daemon.notify.model import Alert


class Reason(StrEnum):
    FIRST_NOTIFICATION = "first notification of the group"
    NEW_ALERTS_IN_GROUP = "new alerts in the group"
    ALL_RESOLVED = "all alerts of the group resolved"
    NEWLY_RESOLVED = "alerts newly resolved"
    REPEAT_INTERVAL = "repeat interval passed"
    NO_CHANGE = "no change since the last notification"
    NOTHING_TO_TELL = "nothing firing that the receiver was told about"


@dataclass(frozen=True)
class LogEntry:
    """What a receiver was last told about a group (the notification log, persisted)."""

    firing: frozenset[str]
    resolved: frozenset[str]
    at: float
    ref: str | None = None  # the receiver's id of the firing message (Slack ts), for threading


@dataclass(frozen=True)
class Decision:
    notify: bool
    reason: Reason
    record: bool  # whether the log entry changes (all-resolved is recorded even when not sent)


def needs_update(
    entry: LogEntry | None,
    firing: frozenset[str],
    resolved: frozenset[str],
    send_resolved: bool,
    repeat_interval: float,
    now: float,
) -> Decision:
    """Alertmanager's dedup table: tell the receiver about a group, or not, and why."""
    if entry is None:
        if firing:
            return Decision(True, Reason.FIRST_NOTIFICATION, True)
        return Decision(False, Reason.NOTHING_TO_TELL, False)
    if not firing <= entry.firing:
        return Decision(True, Reason.NEW_ALERTS_IN_GROUP, True)
    if not firing:
        if entry.firing:
            return Decision(send_resolved, Reason.ALL_RESOLVED, True)
        return Decision(False, Reason.NOTHING_TO_TELL, False)
    if firing != entry.firing:
        # Some of what the receiver was told about resolved: tell it if it wants resolutions,
        # and record the smaller set either way (so a re-firing counts as new).
        return Decision(send_resolved, Reason.NEWLY_RESOLVED, True)
    if now - entry.at >= repeat_interval:
        return Decision(True, Reason.REPEAT_INTERVAL, True)
    return Decision(False, Reason.NO_CHANGE, False)


# -- silences and inhibition ------------------------------------------------------------------


@dataclass(frozen=True)
class Silence:
    id: int
    matchers: dict[str, str]  # label -> value, or "~regex"
    starts_at: float
    ends_at: float
    comment: str
    created_by: str

    def active(self, now: float) -> bool:
        return self.starts_at <= now < self.ends_at

    def matches(self, labels: dict[str, str]) -> bool:
        for k, v in self.matchers.items():
            got = labels.get(k, "")
            if v.startswith("~"):
                if not re.fullmatch(v[1:], got):
                    return False
            elif got != v:
                return False
        return True


class Inhibitor:
    """Which alerts a firing alert elsewhere mutes. Built once per flush from the firing
    alerts, so each question is a set lookup, not a scan (storms have thousands of alerts)."""

    def __init__(self, rules: list[Inhibit], firing: Iterable[Alert]) -> None:
        self.rules = rules
        # Per rule: the `equal` label values of firing sources -> their fingerprints.
        self.sources: list[dict[tuple[str, ...], set[str]]] = []
        alerts = list(firing)
        for rule in rules:
            index: dict[tuple[str, ...], set[str]] = {}
            for src in alerts:
                if all(src.labels.get(k) == v for k, v in rule.source.items()):
                    key = tuple(src.labels.get(k, "") for k in rule.equal)
                    index.setdefault(key, set()).add(src.fingerprint)
            self.sources.append(index)

    def __call__(self, alert: Alert) -> bool:
        for rule, index in zip(self.rules, self.sources, strict=True):
            if not index or not all(alert.labels.get(k) == v for k, v in rule.target.items()):
                continue
            srcs = index.get(tuple(alert.labels.get(k, "") for k in rule.equal))
            if srcs and (len(srcs) > 1 or alert.fingerprint not in srcs):
                return True
        return False


# -- groups -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Notification:
    """One message to one receiver about one group: what goes into the outbox."""

    receiver: str
    group_key: str
    group_labels: dict[str, str]
    reason: Reason
    firing: list[Alert]
    resolved: list[Alert]
    created_at: float

    @property
    def state(self) -> str:
        return "firing" if self.firing else "resolved"


@dataclass(frozen=True)
class Decided:
    """A flush's outcome for one group: the log entry to record and, maybe, a notification."""

    receiver: str
    group_key: str
    entry: LogEntry
    notification: Notification | None


@dataclass
class Group:
    receiver: str
    key: str
    labels: dict[str, str]
    next_flush: float
    alerts: dict[str, Alert] = field(default_factory=dict)


class Dispatcher:
    """Routes alerts into groups and, when a group is due, decides what its receiver hears.

    ``log`` reads the notification log; ``silences`` lists the silences; ``send`` takes the
    notifications decided (with the log entries to record) and makes them durable. All calls
    come from one thread.
    """

    def __init__(
        self,
        config: Alerting,
        clock: Callable[[], float],
        log: Callable[[str, str], LogEntry | None],
        silences: Callable[[], list[Silence]],
        send: Callable[[list[Decided]], None],
    ) -> None:
        self.config = config
        self.clock = clock
        self._log = log
        self._silences = silences
        self._send = send
        self.routes = config.effective_routes()
        self.receivers = config.effective_receivers()
        self.groups: dict[tuple[str, str], Group] = {}
        self.alerts: dict[str, Alert] = {}  # latest state of every alert seen, for inhibition

    def route(self, alert: Alert) -> list[str]:
        out: list[str] = []
        for route in self.routes:
            if route.matches(alert.labels):
                out += [r for r in route.receivers if r not in out]
                if not route.continue_:
                    break
        return out

    def receive(self, alerts: Iterable[Alert]) -> None:
        now = self.clock()
        for alert in alerts:
            if alert.state == "firing":
                self.alerts[alert.fingerprint] = alert
            else:
                self.alerts.pop(alert.fingerprint, None)
            for receiver in self.route(alert):
                labels = {k: alert.labels.get(k, "") for k in self.config.group_by}
                key = json.dumps(labels, sort_keys=True)
                group = self.groups.get((receiver, key))
                if group is None:
                    group = self.groups[(receiver, key)] = Group(
                        receiver, key, labels, now + self.config.group_wait
                    )
                group.alerts[alert.fingerprint] = alert

    def next_due(self) -> float | None:
        return min((g.next_flush for g in self.groups.values()), default=None)

    def flush_due(self, everything: bool = False) -> list[Notification]:
        """Flush every group whose time has come (``everything``: all groups, at shutdown);
        returns the notifications sent to the outbox."""
        now = self.clock()
        if everything:
            for group in self.groups.values():
                group.next_flush = now
        silences = [s for s in self._silences() if s.active(now)]
        inhibited = Inhibitor(self.config.inhibit, self.alerts.values())
        decided: list[Decided] = []
        flushed: list[tuple[tuple[str, str], Group]] = []
        for (receiver, key), group in list(self.groups.items()):
            if group.next_flush > now:
                continue
            flushed.append(((receiver, key), group))
            # Silences and inhibitions mute firing alerts only: a receiver told of a firing
            # always hears of its resolution.
            shown = [
                a
                for a in group.alerts.values()
                if a.state == "resolved" or not (any(s.matches(a.labels) for s in silences) or inhibited(a))
            ]
            if not shown:
                continue  # everything muted: the receiver hears nothing, and its log stays as it was
            firing = [a for a in shown if a.state == "firing"]
            resolved = [a for a in shown if a.state == "resolved"]
            entry = self._log(receiver, key)
            send_resolved = self.receivers[receiver].send_resolved
            decision = needs_update(
                entry,
                frozenset(a.fingerprint for a in firing),
                frozenset(a.fingerprint for a in resolved),
                send_resolved,
                self.config.repeat_interval,
                now,
            )
            if decision.record:
                new_entry = LogEntry(
                    frozenset(a.fingerprint for a in firing),
                    frozenset(a.fingerprint for a in resolved),
                    now,
                    entry.ref if entry else None,
                )
                note = (
                    Notification(
                        receiver,
                        key,
                        group.labels,
                        decision.reason,
                        firing,
                        resolved if send_resolved else [],
                        now,
                    )
                    if decision.notify
                    else None
                )
                decided.append(Decided(receiver, key, new_entry, note))
        if decided:
            self._send(decided)  # if this raises, the groups stay as they were and flush again
        for gkey, group in flushed:
            group.next_flush = now + self.config.group_interval
            # Resolved alerts (muted ones too) leave the group once judged; an empty group goes.
            for fp in [fp for fp, a in group.alerts.items() if a.state == "resolved"]:
                group.alerts.pop(fp, None)
            if not group.alerts:
                del self.groups[gkey]
        return [d.notification for d in decided if d.notification is not None]
