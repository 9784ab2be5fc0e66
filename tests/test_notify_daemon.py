"""Notifications from a real daemon: an outage with a kill -9 in the middle, silences from the
CLI, and secrets that never show."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, StubServer, free_port, wait_for
from test_rules_daemon import SPIKE, Sender

SECRET = "xoxb-never-show-me-42"


def config(root: Path, port: int, cert: Path) -> Path:
    path = root / "runwatch.toml"
    # The playbook is off: its escalations (these runs save no checkpoints) would be more
    # notifications than the ones each test counts.
    path.write_text(f"""
[playbook]
enabled = false

[alerting]
group_wait = "0.2s"
group_interval = "0.5s"
retry_max_seconds = "0.5s"

[alerting.receivers.hook]
type = "webhook"
url = "https://127.0.0.1:{port}/alerts"
ca_file = "{cert}"

[alerting.receivers.slack]
type = "slack"
channel = "#training"
token = "{SECRET}"
base_url = "https://127.0.0.1:{port}/api/"
ca_file = "{cert}"
messages_per_second = 10
""")
    return path


@pytest.fixture
def setup(rootdir: Path, tls_cert: tuple[Path, Path]) -> Iterator[tuple[list[str], int]]:
    rules = rootdir / "rules"
    rules.mkdir()
    (rules / "spike.yaml").write_text(SPIKE)
    port = free_port()
    yield ["--config", str(config(rootdir, port, tls_cert[0])), "--rules", str(rules)], port


def cli(d: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runwatch.daemon", *args, "--socket", str(d.socket)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def spike(d: DaemonProcess, run: str) -> Sender:
    s = Sender(d, run=run)
    for step in range(40):
        s.send(step, grad_norm=1.0)
    s.send(40, grad_norm=9.0)
    return s


def messages(stub: StubServer, kind: str) -> list[dict[str, Any]]:
    path = "/api/chat.postMessage" if kind == "slack" else "/alerts"
    return [r["body"] for r in stub.ok() if r["path"] == path]


def test_kill_9_during_an_outage_loses_nothing_and_pages_nothing_twice(
    rootdir: Path, tls_cert: tuple[Path, Path], setup: tuple[list[str], int]
) -> None:
    args, port = setup
    d = DaemonProcess(rootdir, args).start()
    s = spike(d, "run-a")
    wait_for(
        lambda: (
            (c := json.loads(cli(d, "notifications", "--json").stdout))["counts"].get("pending") == 2
            and all(n["attempts"] >= 1 for n in c["outbox"])
        ),
        what="two pending notifications",
    )
    s.close()
    d.kill9()
    d = DaemonProcess(rootdir, args).start()
    stub = StubServer(tls_cert, port=port)
    try:
        wait_for(
            lambda: len(messages(stub, "slack")) == 1 and len(messages(stub, "hook")) == 1,
            what="delivery after the restart",
        )
        time.sleep(2.0)  # the new daemon took the alert over; it must not announce it again
        assert len(messages(stub, "slack")) == 1 and len(messages(stub, "hook")) == 1
        [hook] = messages(stub, "hook")
        assert hook["status"] == "firing" and hook["alerts"][0]["labels"]["alertname"] == "spike"
        s = Sender(d, run="run-a")
        s.send(41, grad_norm=1.0)
        wait_for(
            lambda: len(messages(stub, "slack")) == 2 and len(messages(stub, "hook")) == 2,
            what="the resolutions",
        )
        resolved = messages(stub, "slack")[1]
        assert resolved["text"].startswith("[RESOLVED:critical] spike on run-a") and "thread_ts" in resolved
        assert messages(stub, "hook")[1]["status"] == "resolved"
        s.close()
    finally:
        stub.close()
        d.terminate()


def test_silences_from_the_cli_and_secrets_that_never_show(
    rootdir: Path, tls_cert: tuple[Path, Path], setup: tuple[list[str], int]
) -> None:
    args, port = setup
    stub = StubServer(tls_cert, port=port)
    d = DaemonProcess(rootdir, args).start()
    try:
        out = cli(d, "silence", "add", "--match", "run=~quiet-.*", "--for", "1h", "--comment", "maintenance")
        assert out.returncode == 0 and out.stdout.startswith("silence 1:"), out.stderr
        [sil] = json.loads(cli(d, "silence", "list", "--json").stdout)
        assert sil["matchers"] == {"run": "~quiet-.*"} and sil["active"] and sil["comment"] == "maintenance"
        assert sil["created_by"].startswith("uid ")
        quiet = spike(d, "quiet-1")
        loud = spike(d, "loud-1")
        wait_for(lambda: len(messages(stub, "hook")) == 1, what="the loud alert")
        time.sleep(1.5)
        assert [m["alerts"][0]["labels"]["run"] for m in messages(stub, "hook")] == ["loud-1"]
        assert cli(d, "silence", "expire", "1").returncode == 0
        wait_for(lambda: len(messages(stub, "hook")) == 2, what="the alert once the silence ended")
        assert messages(stub, "hook")[1]["alerts"][0]["labels"]["run"] == "quiet-1"
        quiet.close()
        loud.close()
        bad = cli(d, "silence", "add", "--match", "run", "--for", "1h")
        assert bad.returncode == 5 and "write label=value" in bad.stderr

        status = cli(d, "status", "--json").stdout
        listing = cli(d, "notifications", "--json").stdout
        assert SECRET not in status and SECRET not in listing and SECRET not in d.metrics_text()
        assert json.loads(listing)["receivers"] == {"hook": "webhook", "slack": "slack"}
    finally:
        d.terminate()
        stub.close()
    assert SECRET not in d.log()
