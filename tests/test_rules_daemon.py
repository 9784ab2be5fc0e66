"""Rules inside a real daemon: alerts stored and exported, hot reload, stalls, restarts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, RawClient, wait_for

from runwatch.daemon import protocol
from runwatch.daemon.store import Store

SPIKE = """\
rules:
  - name: spike
    summary: "grad norm {value:.3g} is {ratio:.1f}x its {window}"
    metric: grad_norm
    baseline: {stat: median, window: 32 steps, min_samples: 16}
    when: ratio >= 3
    severity: critical
    actions: [alert, pause, dump_batch]
"""
LOSS = """\
rules:
  - name: loss_high
    metric: loss
    when: value > 5
    severity: warning
"""
STALL = """\
rules:
  - name: stalled
    when: absent
    for: 4x interval, at least 1s
    severity: critical
"""


class Sender:
    """A hook stand-in that sends exact steps and waits for each ack."""

    def __init__(self, daemon: DaemonProcess, run: str = "r") -> None:
        self.client = RawClient(daemon.socket)
        # Today's HELLO: it offers the control channel, so the playbook may act on this run.
        self.client.send(protocol.json_frame(protocol.Kind.HELLO, {
            "protocol": 1, "role": "hook", "run": run, "rank": 0, "world_size": 1, "host": "test",
            "pid": os.getpid(), "hook_version": "test", "capabilities": ["commands", "events"]}))
        assert self.client.read()[0] == protocol.Kind.WELCOME
        self.seq = 0

    def send(self, step: int, **values: float) -> None:
        names = tuple(sorted(values))
        block = protocol.encode_block(names, [step], [time.time()], [[values[n] for n in names]])
        self.seq += 1
        self.client.send(protocol.samples_frame(self.seq, [block]))
        kind, _ = self.client.read()
        while kind == protocol.Kind.COMMAND:  # the playbook's (a real hook would apply them)
            kind, _ = self.client.read()
        assert kind == protocol.Kind.ACK

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def rules_dir(rootdir: Path) -> Path:
    d = rootdir / "rules"
    d.mkdir()
    (d / "spike.yaml").write_text(SPIKE)
    return d


@pytest.fixture
def rules_daemon(rootdir: Path, rules_dir: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(rootdir, ["--rules", str(rules_dir)]).start()
    yield d
    d.terminate()


def alerts(d: DaemonProcess, with_playbook: bool = False) -> dict[str, Any]:
    """``runwatch alerts --json``; without the playbook's escalations unless asked (these runs
    register no checkpoints, so a pausing rule leaves them waiting for a person)."""
    out = subprocess.run(
        [sys.executable, "-m", "runwatch.daemon", "alerts", "--json", "--socket", str(d.socket)],
        capture_output=True,
        text=True,
        check=True,
    )
    reply = json.loads(out.stdout)
    if not with_playbook:
        for key in ("firing", "recent"):
            reply[key] = [a for a in reply[key] if a["rule"] != "playbook_escalation"]
    return reply


def test_a_firing_is_stored_listed_and_exported(rules_daemon: DaemonProcess) -> None:
    s = Sender(rules_daemon)
    for step in range(40):
        s.send(step, grad_norm=1.0 + 0.01 * (step % 3))
    s.send(40, grad_norm=9.0)
    reply = wait_for(lambda: len((a := alerts(rules_daemon, with_playbook=True))["firing"]) == 2 and a,
                     what="a firing and the playbook's escalation")
    [firing] = [a for a in reply["firing"] if a["rule"] == "spike"]
    assert (firing["rule"], firing["severity"], firing["run"], firing["step"]) == (
        "spike",
        "critical",
        "r",
        40,
    )
    assert firing["value"] == 9.0 and firing["baseline"] == pytest.approx(1.01)
    assert firing["summary"] == "grad norm 9 is 8.9x its median of the last 32 steps"
    assert firing["context"]["recent_values"] == "1, 1.01, 1.02, 1, 9"
    [event] = [e for e in reply["recent"] if e["rule"] == "spike"]
    assert event["rule_version"] == firing["version"] and event["window"] == "median of the last 32 steps"
    assert [d["action"] for d in event["decisions"]] == ["pause", "dump_batch"]
    # The playbook took them: this run registered no checkpoint, so it is paused for a person.
    assert {d["status"] for d in event["decisions"]} == {"incident 1"}
    [escalation] = [a for a in reply["firing"] if a["rule"] == "playbook_escalation"]
    assert "no clean checkpoint registered before step 40" in escalation["summary"]

    text = rules_daemon.metrics_text()
    labels = 'metric="grad_norm",rank="0",rule="spike",run="r",severity="critical"'
    assert f"runwatch_alerts_firing{{{labels}}} 1.0" in text
    assert f"runwatch_alert_value{{{labels}}} 9.0" in text
    assert 'runwatch_alert_transitions_total{rule="spike",severity="critical",state="firing"} 1.0' in text
    assert 'runwatch_rule_decisions_total{action="pause"} 1.0' in text

    s.send(41, grad_norm=1.0)
    wait_for(lambda: not [a for a in alerts(rules_daemon)["firing"] if a["rule"] == "spike"],
             what="the resolution")
    states = [e["state"] for e in alerts(rules_daemon)["recent"] if e["rule"] == "spike"]
    assert states == ["resolved", "firing"]
    human = subprocess.run(
        [sys.executable, "-m", "runwatch.daemon", "alerts", "--socket", str(rules_daemon.socket)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # Only the playbook's escalation still fires (the run waits for a person); spike is history.
    assert "firing now" in human and "spike" in human
    s.close()


def test_saving_a_rule_file_reloads_it_and_a_broken_save_keeps_the_old_rules(
    rules_daemon: DaemonProcess, rules_dir: Path
) -> None:
    def in_force() -> dict[str, Any]:
        return rules_daemon.query("rules")

    loss_file = rules_dir / "loss.yaml"
    loss_file.write_text(LOSS)
    wait_for(lambda: "loss_high" in [r["name"] for r in in_force()["rules"]], what="the new rule")
    s = Sender(rules_daemon)
    s.send(0, loss=9.0)
    wait_for(
        lambda: [a for a in alerts(rules_daemon)["firing"] if a["rule"] == "loss_high"], what="loss_high"
    )

    loss_file.write_text(LOSS.replace("value > 5", "value >> 5"))
    errors = wait_for(lambda: in_force()["errors"], what="the refusal")
    assert errors == [
        f"{loss_file}:4: rules.0.when: '{'value >> 5'}' is not a condition; write "
        "'<measure> <op> <number>' (measures: value, delta, ratio, zscore; ops: >, >=, <, <=),"
        " '<measure> between A and B', '<measure> outside A and B', 'nonfinite' or 'absent'"
    ]
    assert f'runwatch_rules_file_errors{{file="{loss_file}"}} 1.0' in rules_daemon.metrics_text()
    assert {r["name"] for r in in_force()["rules"]} == {"spike", "loss_high"}
    s.send(1, loss=1.0)
    s.send(2, loss=9.0)  # the kept rule still judges
    wait_for(
        lambda: [e for e in alerts(rules_daemon)["recent"] if e["rule"] == "loss_high" and e["step"] == 2],
        what="the kept rule firing again",
    )
    assert "rules.0.when" in rules_daemon.log()

    loss_file.write_text(LOSS)
    wait_for(lambda: not in_force()["errors"], what="the fix")
    assert f'runwatch_rules_file_errors{{file="{loss_file}"}} 0.0' in rules_daemon.metrics_text()
    s.close()


def test_a_silent_connected_run_is_a_stall(rootdir: Path) -> None:
    rules = rootdir / "stall.yaml"
    rules.write_text(STALL)
    d = DaemonProcess(rootdir, ["--rules", str(rules)]).start()
    try:
        s = Sender(d)
        for step in range(10):
            s.send(step, loss=1.0)
            time.sleep(0.1)
        reply = wait_for(lambda: (a := alerts(d))["firing"] and a, timeout=10, what="the stall")
        [stall] = reply["firing"]
        assert stall["rule"] == "stalled" and stall["step"] == 9 and stall["value"] >= 1.0
        s.send(10, loss=1.0)
        resolved = wait_for(
            lambda: [e for e in alerts(d)["recent"] if e["state"] == "resolved"], what="the stall to resolve"
        )
        assert resolved[0]["step"] == 10 and "steps arrive again" in resolved[0]["summary"]
        # Silent again after step 10: the stall is judged again and fires again.
        wait_for(lambda: alerts(d)["firing"], timeout=10, what="a second stall")
        s.close()
    finally:
        d.terminate()


def test_after_kill_9_firing_alerts_carry_on_and_baselines_are_warm(rootdir: Path, rules_dir: Path) -> None:
    d = DaemonProcess(rootdir, ["--rules", str(rules_dir)]).start()
    s = Sender(d)
    for step in range(40):
        s.send(step, grad_norm=1.0)
    s.send(40, grad_norm=9.0)
    [before] = wait_for(lambda: alerts(d)["firing"], what="a firing")
    s.close()
    d.kill9()
    d = DaemonProcess(rootdir, ["--rules", str(rules_dir)]).start()
    try:
        # The new daemon takes the firing alert over: nothing resolves or fires twice.
        [after] = alerts(d)["firing"]
        assert (after["rule"], after["step"], after["value"], after["version"]) == (
            before["rule"],
            before["step"],
            before["value"],
            before["version"],
        )
        s = Sender(d)
        s.send(41, grad_norm=1.0)  # a healthy step resolves it, judged against the warm baseline
        wait_for(lambda: not alerts(d)["firing"], what="the resolution after restart")
        s.send(42, grad_norm=9.0)  # and a new spike fires at once: the baseline came back from the store
        wait_for(lambda: alerts(d)["firing"], what="a firing after restart")
        s.close()
        conn = Store.reader(d.store_path)
        rows = conn.execute("SELECT state, step FROM alert_events WHERE rule = 'spike'"
                            " ORDER BY id").fetchall()
        assert rows == [("firing", 40), ("resolved", 41), ("firing", 42)]
    finally:
        d.terminate()


def test_a_missing_rules_path_is_a_config_error(rootdir: Path) -> None:
    out = subprocess.run(
        DaemonProcess(rootdir, ["--rules", str(rootdir / "nope")]).command(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert (
        f"setting 'rules' from --rules: Value error, {rootdir / 'nope'}: no such rule file or folder"
        in out.stderr
    )
