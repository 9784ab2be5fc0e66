"""Receivers and delivery against real HTTPS servers on loopback standing in for Slack,
PagerDuty and webhooks: the exact JSON they receive, outages, rate limits, storms."""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import conftest
import pytest
from conftest import Reply, StubServer, free_port
from prometheus_client import CollectorRegistry

from runwatch.daemon.exporter import DaemonMetrics
from runwatch.daemon.notify.config import Alerting
from runwatch.daemon.notify.notifier import Notifier
from runwatch.daemon.notify.receivers import PD_DEDUP_MAX
from runwatch.daemon.rules.engine import Event
from runwatch.daemon.store import Store

SECRET = "xoxb-do-not-leak-0123456789"


def event(
    run: str = "run-a",
    rank: int = 0,
    rule: str = "grad_norm_divergence",
    severity: str = "critical",
    state: str = "firing",
    value: float = 9.0,
) -> Event:
    return Event(
        rule,
        "v1",
        severity,
        state,
        run,
        rank,
        "grad_norm",
        40,
        1.0,
        value,
        1.0,  # type: ignore[arg-type]
        "median of the last 128 steps",
        f"gradient norm {value:g} is {value:g}x its median",
        ("alert", "pause", "dump_batch"),
        {},
        7.0,
        {"disk_read_mb_per_s": "12.5"},
    )


# Deliveries involve TLS handshakes and threads: these waits allow 20 s unless told otherwise.
wait_for = functools.partial(conftest.wait_for, timeout=20.0)


@pytest.fixture
def stub(tls_cert: tuple[Path, Path]) -> Iterator[StubServer]:
    s = StubServer(tls_cert)
    yield s
    s.close()


@pytest.fixture
def make_notifier(tmp_path: Path) -> Iterator[Callable[..., Notifier]]:
    made: list[Notifier] = []

    def make(receivers: dict[str, Any], **config: Any) -> Notifier:
        db = tmp_path / "runwatch.db"
        Store.open(db).close()
        cfg = Alerting.model_validate(
            {
                "group_wait": "0.1s",
                "group_interval": "0.5s",
                "retry_max_seconds": "0.3s",
                "receivers": receivers,
                **config,
            }
        )
        n = Notifier(cfg, db, DaemonMetrics(CollectorRegistry()))
        made.append(n)
        return n

    yield make
    for n in made:
        n.stop()


def test_slack_gets_block_kit_with_top_level_text_and_the_resolution_in_the_thread(
    stub: StubServer, tls_cert: tuple[Path, Path], make_notifier: Callable[..., Notifier]
) -> None:
    n = make_notifier(
        {
            "slack": {
                "type": "slack",
                "channel": "#training",
                "token": SECRET,
                "base_url": f"{stub.url}/api/",
                "ca_file": str(tls_cert[0]),
                "dashboard_url": "https://grafana.example/d/runwatch",
            }
        }
    )
    n.start()
    n.submit([event()])
    [fired] = wait_for(lambda: stub.ok(), what="the firing message")
    assert fired["path"] == "/api/chat.postMessage"
    assert fired["headers"]["Authorization"] == f"Bearer {SECRET}"
    body = fired["body"]
    assert body["channel"] == "#training"
    assert body["text"] == "[FIRING:critical] grad_norm_divergence on run-a"
    assert body["blocks"][0] == {"type": "header", "text": {"type": "plain_text", "text": body["text"]}}
    section = body["blocks"][1]["text"]["text"]
    assert "gradient norm 9 is 9x its median" in section
    assert "value 9 against baseline 1 (median of the last 128 steps)" in section
    assert (
        "actions: pause, dump_batch" in section
        and "data_shard=7" in section
        and "disk_read_mb_per_s=12.5" in section
    )
    assert body["blocks"][2]["elements"][0]["text"] == "<https://grafana.example/d/runwatch|dashboard>"
    n.submit([event(state="resolved")])
    resolved = wait_for(lambda: stub.ok()[1:], what="the resolution")[0]["body"]
    assert resolved["text"] == "[RESOLVED:critical] grad_norm_divergence on run-a"
    assert "thread_ts" in resolved  # posted in the firing message's thread


def test_pagerduty_events_v2_trigger_and_resolve_by_one_dedup_key(
    stub: StubServer, tls_cert: tuple[Path, Path], make_notifier: Callable[..., Notifier]
) -> None:
    n = make_notifier(
        {
            "pd": {
                "type": "pagerduty",
                "routing_key": "R0UTINGKEY",
                "base_url": stub.url,
                "ca_file": str(tls_cert[0]),
            }
        }
    )
    n.start()
    long_run = "r" * 400
    n.submit([event(run=long_run)])
    [trigger] = wait_for(lambda: stub.ok(), what="the trigger")
    body = trigger["body"]
    assert trigger["path"] == "/v2/enqueue"
    assert body["routing_key"] == "R0UTINGKEY" and body["event_action"] == "trigger"
    assert len(body["dedup_key"]) <= PD_DEDUP_MAX
    p = body["payload"]
    assert p["severity"] == "critical" and p["component"] == long_run and p["group"] == "grad_norm_divergence"
    assert len(p["summary"]) <= 1024
    [alert] = p["custom_details"]["alerts"]
    assert (
        alert["value"] == 9.0
        and alert["baseline"] == 1.0
        and alert["actions"] == ["alert", "pause", "dump_batch"]
    )
    n.submit([event(run=long_run, state="resolved")])
    resolve = wait_for(lambda: stub.ok()[1:], what="the resolve")[0]["body"]
    assert resolve == {"event_action": "resolve", "dedup_key": body["dedup_key"], "routing_key": "R0UTINGKEY"}


def test_a_refusal_is_never_retried(
    stub: StubServer, tls_cert: tuple[Path, Path], make_notifier: Callable[..., Notifier]
) -> None:
    stub.reply = lambda path, body: (
        400,
        {},
        b'{"status": "invalid event", "message": "Event object is invalid"}',
    )
    n = make_notifier(
        {"pd": {"type": "pagerduty", "routing_key": "k", "base_url": stub.url, "ca_file": str(tls_cert[0])}}
    )
    n.start()
    n.submit([event()])
    wait_for(lambda: n.counts().get("failed"), what="the refusal")
    time.sleep(1.0)
    assert len(stub.requests) == 1
    [row] = n.outbox()
    assert row["state"] == "failed" and "HTTP 400 (not retried)" in row["last_error"]


def test_slack_webhook_replies_are_checked(
    stub: StubServer, tls_cert: tuple[Path, Path], make_notifier: Callable[..., Notifier]
) -> None:
    stub.reply = lambda path, body: (404, {"Content-Type": "text/plain"}, b"no_service")
    n = make_notifier(
        {"hook": {"type": "slack_webhook", "url": f"{stub.url}/services/T/B/X", "ca_file": str(tls_cert[0])}}
    )
    n.start()
    n.submit([event()])
    wait_for(lambda: n.counts().get("failed"), what="the refused webhook")
    assert stub.requests[0]["body"]["text"] == "[FIRING:critical] grad_norm_divergence on run-a"


def test_an_outage_delays_but_loses_nothing_and_sends_nothing_twice(
    tls_cert: tuple[Path, Path], make_notifier: Callable[..., Notifier], caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    n = make_notifier(
        {
            "hook": {
                "type": "webhook",
                "url": f"https://127.0.0.1:{port}/alerts?token={SECRET}",
                "ca_file": str(tls_cert[0]),
                "messages_per_second": 20,
            }
        },
        group_by=["run"],
    )
    caplog.set_level(logging.INFO, logger="runwatch")
    n.start()
    runs = [f"run-{i}" for i in range(3)]
    for run in runs:  # three groups, decided in this order
        n.submit([event(run=run)])
        time.sleep(0.3)
    wait_for(
        lambda: n.counts().get("pending", 0) == 3 and n.outbox()[-1]["attempts"] >= 2,
        what="attempts against a closed port",
    )
    phases: list[Reply] = [(500, {}, b"down")] * 3 + [(429, {"Retry-After": "1"}, b"slow down")]

    def reply(path: str, body: dict[str, Any]) -> Reply:
        return phases.pop(0) if phases else StubServer.success(path, body)

    stub = StubServer(tls_cert, port=port)
    stub.reply = reply
    try:
        wait_for(lambda: len(stub.ok()) == 3, timeout=30, what="delivery after the outage")
        time.sleep(1.0)
        delivered = [r["body"]["group_labels"]["run"] for r in stub.ok()]
        assert delivered == runs  # in order, each once
        statuses = [r["status"] for r in stub.requests]
        assert statuses[:4] == [500, 500, 500, 429] and statuses.count(200) == 3
        after_429 = stub.requests[4]["t"] - stub.requests[3]["t"]
        assert after_429 >= 0.95, after_429  # Retry-After honoured
    finally:
        stub.close()
    assert SECRET not in caplog.text  # the URL (with its token) is never logged


def test_a_dead_receiver_does_not_hold_up_the_others(
    stub: StubServer, tls_cert: tuple[Path, Path], make_notifier: Callable[..., Notifier]
) -> None:
    dead = free_port()
    n = make_notifier(
        {
            "dead": {"type": "webhook", "url": f"https://127.0.0.1:{dead}/x", "ca_file": str(tls_cert[0])},
            "alive": {"type": "webhook", "url": f"{stub.url}/y", "ca_file": str(tls_cert[0])},
        }
    )
    n.start()
    for i in range(5):
        n.submit([event(run=f"r{i}")])
    wait_for(lambda: len(stub.ok()) == 5, timeout=10, what="the live receiver")
    assert n.counts().get("pending", 0) >= 1  # the dead one's queue waits on its own


def test_an_alert_storm_becomes_a_few_grouped_notifications_within_the_rate_limit(
    stub: StubServer,
    tls_cert: tuple[Path, Path],
    make_notifier: Callable[..., Notifier],
    capsys: pytest.CaptureFixture[str],
) -> None:
    rate = 20.0
    n = make_notifier(
        {
            "hook": {
                "type": "webhook",
                "url": f"{stub.url}/storm",
                "ca_file": str(tls_cert[0]),
                "messages_per_second": rate,
            }
        },
        group_wait="1s",
    )
    n.start()
    started = time.monotonic()
    fired = 0
    for second in range(10):  # 10,000 firings from 50 runs (2 rules x 100 ranks each)
        batch = [
            event(run=f"run-{r:02d}", rank=k, rule=rule, severity="warning")
            for r in range(second * 5, second * 5 + 5)
            for rule in ("grad_norm_spike", "throughput_drop")
            for k in range(100)
        ]
        n.submit(batch)
        fired += len(batch)
    assert fired == 10_000
    wait_for(lambda: len(stub.ok()) == 100, timeout=60, what="the grouped notifications")
    time.sleep(0.5)
    got = stub.ok()
    assert len(got) == 100  # one per (run, rule) group
    assert all(len(r["body"]["alerts"]) == 100 for r in got)
    gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(got)]
    with capsys.disabled():
        print(
            f"\nstorm: {fired} firings -> {len(got)} notifications in {time.monotonic() - started:.1f} s,"
            f" smallest gap {min(gaps) * 1000:.0f} ms (limit {1000 / rate:.0f} ms)"
        )
    assert min(gaps) >= 1 / rate - 0.01


def test_a_missing_secret_is_a_clear_error(make_notifier: Callable[..., Notifier]) -> None:
    with pytest.raises(ValueError, match=r"environment variable RUNWATCH_TEST_NOPE .* is not set"):
        make_notifier({"pd": {"type": "pagerduty", "routing_key_env": "RUNWATCH_TEST_NOPE"}})


def test_secrets_stay_out_of_repr_and_dumps() -> None:
    cfg = Alerting.model_validate({"receivers": {"s": {"type": "slack", "channel": "#c", "token": SECRET}}})
    assert (
        SECRET not in repr(cfg)
        and SECRET not in str(cfg.model_dump())
        and SECRET not in cfg.model_dump_json()
    )


def test_old_history_is_pruned_but_pending_messages_never_are(tmp_path: Path) -> None:
    from runwatch.daemon.notify.model import Alert
    from runwatch.daemon.notify.outbox import NotifyStore
    from runwatch.daemon.notify.pipeline import Decided, LogEntry, Notification, Reason

    db = tmp_path / "runwatch.db"
    Store.open(db).close()
    store = NotifyStore(db)
    a = Alert.from_event(event(), "node", 100.0)
    for run in ("sent", "waiting"):
        note = Notification("hook", run, {"run": run}, Reason.FIRST_NOTIFICATION, [a], [], 100.0)
        store.record(
            [Decided("hook", run, LogEntry(frozenset({a.fingerprint}), frozenset(), 100.0), note)], 100.0
        )
    sent = store.next_pending("hook")
    assert sent is not None
    store.delivered(sent, 101.0, None)
    assert store.prune(before=200.0) == 1
    assert [r["group_key"] for r in store.outbox()] == ["waiting"]
    assert store.log_entry("hook", "sent") is not None  # still firing: the log entry stays
    store.close()


def test_pagerduty_rate_limit_is_retried_after_retry_after(
    stub: StubServer, tls_cert: tuple[Path, Path], make_notifier: Callable[..., Notifier]
) -> None:
    answers: list[Reply] = [(429, {"Retry-After": "1"}, b'{"status": "throttled"}')]
    stub.reply = lambda path, body: answers.pop(0) if answers else StubServer.success(path, body)
    n = make_notifier(
        {"pd": {"type": "pagerduty", "routing_key": "k", "base_url": stub.url, "ca_file": str(tls_cert[0])}}
    )
    n.start()
    n.submit([event()])
    wait_for(lambda: stub.ok(), what="the retried trigger")
    assert [r["status"] for r in stub.requests] == [429, 202]  # one attempt each, no hidden retries
    assert stub.requests[1]["t"] - stub.requests[0]["t"] >= 0.95


def test_an_alert_that_resolved_while_no_daemon_listened_is_resolved_at_start(
    stub: StubServer, tls_cert: tuple[Path, Path], make_notifier: Callable[..., Notifier]
) -> None:
    receivers = {"hook": {"type": "webhook", "url": f"{stub.url}/h", "ca_file": str(tls_cert[0])}}
    first = make_notifier(receivers)
    first.start()
    first.submit([event()])
    wait_for(lambda: stub.ok(), what="the firing")
    first.stop()
    # The next daemon does not see the alert firing any more (it resolved meanwhile).
    second = make_notifier(receivers)
    second.start(firing=[])
    wait_for(lambda: len(stub.ok()) == 2, what="the resolution")
    resolved = stub.ok()[1]["body"]
    assert resolved["status"] == "resolved" and resolved["alerts"][0]["state"] == "resolved"
    assert resolved["alerts"][0]["summary"].startswith("resolved while the daemon was down")
    time.sleep(1.0)
    assert len(stub.ok()) == 2
