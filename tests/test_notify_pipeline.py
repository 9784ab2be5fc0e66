"""The notify pipeline's decisions, one test per branch, with an injected clock (no waiting)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from runwatch.daemon.notify.config import Alerting
from runwatch.daemon.notify.model import Alert
from runwatch.daemon.notify.pipeline import Decided, Dispatcher, LogEntry, Reason, Silence, needs_update

F1, F2 = frozenset({"a"}), frozenset({"a", "b"})
NONE: frozenset[str] = frozenset()


# -- the dedup table --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry, firing, resolved, send_resolved, now, notify, reason",
    [
        (None, F1, NONE, True, 0, True, Reason.FIRST_NOTIFICATION),
        (None, NONE, F1, True, 0, False, Reason.NOTHING_TO_TELL),
        (LogEntry(F1, NONE, 0), F2, NONE, True, 10, True, Reason.NEW_ALERTS_IN_GROUP),
        (LogEntry(F1, NONE, 0), NONE, F1, True, 10, True, Reason.ALL_RESOLVED),
        (LogEntry(F1, NONE, 0), NONE, F1, False, 10, False, Reason.ALL_RESOLVED),  # recorded, not sent
        (LogEntry(NONE, F1, 0), NONE, F1, True, 10, False, Reason.NOTHING_TO_TELL),
        (LogEntry(F2, NONE, 0), F1, frozenset({"b"}), True, 10, True, Reason.NEWLY_RESOLVED),
        (LogEntry(F2, NONE, 0), F1, frozenset({"b"}), False, 10, False, Reason.NEWLY_RESOLVED),  # recorded
        (LogEntry(F1, NONE, 0), F1, NONE, True, 4 * 3600, True, Reason.REPEAT_INTERVAL),
        (LogEntry(F1, NONE, 0), F1, NONE, True, 4 * 3600 - 1, False, Reason.NO_CHANGE),
    ],
)
def test_needs_update(
    entry: LogEntry | None,
    firing: frozenset[str],
    resolved: frozenset[str],
    send_resolved: bool,
    now: float,
    notify: bool,
    reason: Reason,
) -> None:
    d = needs_update(entry, firing, resolved, send_resolved, 4 * 3600, now)
    assert (d.notify, d.reason) == (notify, reason)


# -- the dispatcher ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def alert(
    rule: str = "grad_norm_spike",
    severity: str = "warning",
    run: str = "r",
    rank: int = 0,
    metric: str = "grad_norm",
    state: str = "firing",
) -> Alert:
    labels = {
        "alertname": rule,
        "severity": severity,
        "run": run,
        "rank": str(rank),
        "metric": metric,
        "node": "n",
    }
    return Alert(labels, state, 0.0, None, f"{rule} on {run}", 5.0, 1.0, "w", 10, ("alert",))  # type: ignore[arg-type]


class Harness:
    """A dispatcher whose log and outbox are plain dicts and lists."""

    def __init__(self, **config: Any) -> None:
        self.clock = Clock()
        self.log: dict[tuple[str, str], LogEntry] = {}
        self.sent: list[Decided] = []
        self.silences: list[Silence] = []
        cfg = Alerting.model_validate(
            {
                "receivers": {
                    "slack": {"type": "slack_webhook", "url": "https://x"},
                    "pd": {"type": "pagerduty", "routing_key": "k"},
                },
                **config,
            }
        )
        self.d = Dispatcher(
            cfg, self.clock, lambda r, k: self.log.get((r, k)), lambda: self.silences, self._send
        )

    def _send(self, decided: list[Decided]) -> None:
        for x in decided:
            self.log[(x.receiver, x.group_key)] = x.entry
            if x.notification is not None:
                self.sent.append(x)

    def at(self, t: float) -> list[tuple[str, str, int, int]]:
        """Advance to t seconds after the start, flush; (receiver, reason, #firing, #resolved) sent."""
        before = len(self.sent)
        self.clock.now = 1000.0 + t
        self.d.flush_due()
        return [
            (x.receiver, x.notification.reason.name, len(x.notification.firing), len(x.notification.resolved))
            for x in self.sent[before:]
            if x.notification is not None
        ]


def test_default_routes_send_critical_to_pagerduty_and_slack_and_warning_to_slack() -> None:
    h = Harness()
    assert h.d.route(alert(severity="critical")) == ["pd", "slack"]
    assert h.d.route(alert(severity="warning")) == ["slack"]
    assert h.d.route(alert(severity="info")) == []


def test_group_wait_then_group_interval() -> None:
    h = Harness()
    h.d.receive([alert(rank=0)])
    assert h.at(29) == []
    h.d.receive([alert(rank=1)])  # joins the same group (run, alertname) before it flushes
    assert h.at(30) == [("slack", "FIRST_NOTIFICATION", 2, 0)]
    h.d.receive([alert(rank=2)])
    assert h.at(31) == [] and h.at(329) == []  # a flushed group waits group_interval
    assert h.at(330) == [("slack", "NEW_ALERTS_IN_GROUP", 3, 0)]
    assert h.at(630) == []  # nothing new
    assert h.at(330 + 4 * 3600 - 1) == []  # a flush just short of the repeat interval
    assert h.at(330 + 4 * 3600 + 299) == [("slack", "REPEAT_INTERVAL", 3, 0)]  # the next flush


def test_groups_are_per_run_and_rule() -> None:
    h = Harness()
    h.d.receive([alert(run="a"), alert(run="b"), alert(run="a", rule="throughput_drop")])
    assert sorted(h.at(30)) == [("slack", "FIRST_NOTIFICATION", 1, 0)] * 3


def test_resolved_is_sent_only_to_a_receiver_that_heard_of_the_firing() -> None:
    h = Harness()
    h.d.receive([alert()])
    h.d.receive([alert(state="resolved")])  # resolved before the group ever flushed
    assert h.at(30) == []
    h.d.receive([alert()])
    assert h.at(60) == [("slack", "FIRST_NOTIFICATION", 1, 0)]
    h.d.receive([alert(state="resolved")])
    assert h.at(360) == [("slack", "ALL_RESOLVED", 0, 1)]
    assert h.d.groups == {}  # a fully resolved group is gone


def test_newly_resolved_while_others_still_fire() -> None:
    h = Harness()
    h.d.receive([alert(rank=0), alert(rank=1)])
    h.at(30)
    h.d.receive([alert(rank=1, state="resolved")])
    assert h.at(330) == [("slack", "NEWLY_RESOLVED", 1, 1)]


def test_send_resolved_off_records_but_stays_quiet() -> None:
    h = Harness(receivers={"slack": {"type": "slack_webhook", "url": "https://x", "send_resolved": False}})
    h.d.receive([alert()])
    h.at(30)
    h.d.receive([alert(state="resolved")])
    assert h.at(330) == []
    assert h.log[("slack", next(iter(h.log))[1])].firing == frozenset()


def test_a_critical_alert_inhibits_the_warning_on_the_same_signal_of_the_same_run() -> None:
    h = Harness()
    warning = alert(rule="grad_norm_spike", severity="warning")
    critical = alert(rule="grad_norm_divergence", severity="critical")
    other_run = alert(rule="grad_norm_spike", severity="warning", run="other")
    h.d.receive([warning, critical, other_run])
    sent = h.at(30)
    assert ("pd", "FIRST_NOTIFICATION", 1, 0) in sent
    # The warning's group for run r was muted; run "other" has no critical alert.
    slack = [x.notification for x in h.sent if x.receiver == "slack" and x.notification is not None]
    runs = sorted((a.labels["run"], a.labels["alertname"]) for n in slack for a in n.firing)
    assert runs == [("other", "grad_norm_spike"), ("r", "grad_norm_divergence")]


def test_silences_mute_matching_alerts_until_they_end() -> None:
    h = Harness()
    h.silences = [Silence(1, {"run": "~llama-.*"}, 1000.0, 1000.0 + 100, "maintenance", "uid 0")]
    h.d.receive([alert(run="llama-7b"), alert(run="gpt")])
    assert h.at(30) == [("slack", "FIRST_NOTIFICATION", 1, 0)]  # gpt only
    assert h.at(330) == [("slack", "FIRST_NOTIFICATION", 1, 0)]  # the silence ended at 100 s


def test_an_alert_taken_over_after_a_restart_is_not_announced_again() -> None:
    h = Harness()
    h.d.receive([alert()])
    h.at(30)
    log = dict(h.log)
    restarted = Harness()
    restarted.log = log  # the notification log is persisted
    restarted.d.receive([alert()])  # seeded with the firing alerts the new daemon took over
    assert restarted.at(30) == []
    restarted.d.receive([replace(alert(), state="resolved")])
    assert restarted.at(330) == [("slack", "ALL_RESOLVED", 0, 1)]


def test_a_group_whose_alerts_are_all_muted_is_left_alone_and_its_resolution_still_told() -> None:
    h = Harness()
    h.d.receive([alert()])
    assert h.at(30) == [("slack", "FIRST_NOTIFICATION", 1, 0)]
    h.silences = [Silence(1, {"run": "r"}, 1000.0, 1e12, "", "uid 0")]
    h.d.receive([alert(rank=1)])
    assert h.at(330) == []  # the new alert is muted; muting resolves nothing
    h.d.receive([alert(state="resolved")])
    assert h.at(630) == [("slack", "ALL_RESOLVED", 0, 1)]  # told of the firing, so told of the end


def test_a_failing_outbox_keeps_the_group_for_the_next_flush() -> None:
    h = Harness()
    calls = []

    def broken(decided: list[Decided]) -> None:
        calls.append(len(decided))
        raise OSError("disk full")

    h.d._send = broken
    h.d.receive([alert()])
    with pytest.raises(OSError):
        h.at(30)
    h.d._send = h._send
    assert h.at(31) == [("slack", "FIRST_NOTIFICATION", 1, 0)] and calls == [1]
