"""Relaunches under the same run name, and hooks and daemons of different versions.

- A new launch of a run that was paused and escalated runs: it does not inherit ``paused``,
  is not sent the commands meant for the old processes, and the old incident is closed with
  a ``relaunched`` entry (its escalation resolved, saying why).
- Capability negotiation: a hook that speaks the HELLO from before the control channel is
  watched and alerted on but never sent a COMMAND frame, and the daemon says so (a fault that
  would pause the run goes to a person instead); today's
  hook against the daemon from before the negotiation keeps monitoring and sends it no
  EVENT frame.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, DaemonProcess, RawClient, cli, cli_run, short_tmpdir, wait_for
from test_interventions import cli_command, hook_hello, result, run_to_end, start_daemon, train_cmd

from runwatch.daemon import protocol
from runwatch.daemon.cli import EXIT_PENDING
from runwatch.daemon.protocol import Kind
from runwatch.hooks.sender import Batch, Sender


def test_a_relaunch_runs_instead_of_inheriting_the_pause_and_closes_the_old_incident() -> None:
    root = short_tmpdir()
    d = start_daemon(root)
    try:
        # Launch 1 has no checkpoint to come back to: the spike escalates and the run stays paused.
        cmd = train_cmd(d, root, "again", "--bad", "110", "--steps", "400", "--ckpt-every", "0",
                        "--step-seconds", "0.01")
        first = subprocess.Popen([sys.executable, *cmd])
        wait_for(lambda: [a for a in cli(d, "alerts", "--run", "again")["firing"]
                          if a["rule"] == "playbook_escalation"], timeout=120, what="the escalation")
        assert cli(d, "checkpoints", "again")["control"]["state"] == "paused"
        first.kill()  # the operator kills the paused processes
        first.wait()
        # A command sent while nothing runs was meant for the processes that are gone.
        stale = cli_run(d, "pause", "again", "--wait", "0")
        assert stale.returncode == EXIT_PENDING
        stale_id = json.loads(stale.stdout)["id"]

        second = subprocess.Popen([sys.executable, *train_cmd(d, root, "again", "--steps", "40")])
        run_to_end(d, second, timeout=120)  # it ran to the end: neither held nor sent the stale pause
        assert result(root)["final_step"] == 40

        [incident] = cli(d, "incidents", "--run", "again")["incidents"]
        assert incident["state"] == "resolved"
        last = cli(d, "incident", "show", str(incident["id"]))["timeline"][-1]
        assert last["kind"] == "relaunched"
        assert "the old one was paused; a new launch is not held" in last["text"]
        assert "1 command(s) the old processes never applied are superseded" in last["text"]
        assert "incident closed in state escalated" in last["text"]
        assert cli_command(d, stale_id)["state"] == "superseded"
        assert cli(d, "checkpoints", "again")["control"]["state"] == "running"
        alerts = cli(d, "alerts", "--run", "again")
        assert not [a for a in alerts["firing"] if a["rule"] == "playbook_escalation"]
        resolved = [a for a in alerts["recent"]
                    if a["rule"] == "playbook_escalation" and a["state"] == "resolved"]
        assert resolved and "relaunched as launch" in resolved[0]["summary"]
        assert "run again relaunched: launch" in d.log()
        # The second launch counted its steps from 0 again, below what launch 1 stored: those steps
        # are not stored, and the daemon says so (known limit: give watch(start_step=...)).
        assert "that are already stored; they are ignored" in d.log()
        metric = "runwatch_ingest_repeated_steps_total "
        [line] = [x for x in d.metrics_text().splitlines() if x.startswith(metric)]
        assert float(line.split()[1]) > 0
    finally:
        d.terminate()


def test_a_hook_that_offers_no_capabilities_is_watched_but_never_sent_commands(
        daemon: DaemonProcess) -> None:
    old = RawClient(daemon.socket)
    welcome = old.hello(run="old-hook")  # the HELLO hooks sent before capabilities existed
    assert welcome["capabilities"] == []
    wait_for(lambda: "hook test offered no 'commands' capability" in daemon.log(), what="the log line")
    # Its samples go on being judged: a gradient spike fires the rule that would pause a run...
    for step in range(41):
        value = 10.0 if step == 40 else 1.0 + 0.01 * (step % 3)
        block = protocol.encode_block(("grad_norm",), [step], [time.time()], [[value]])
        old.send(protocol.samples_frame(step + 1, [block]))
        assert old.read()[0] == Kind.ACK
    wait_for(lambda: [a for a in cli(daemon, "alerts", "--run", "old-hook")["firing"]
                      if a["rule"] == "grad_norm_divergence"], what="the spike alert")
    # ...but no pause is made for a hook that cannot apply it: the fault goes to a person at once.
    escalation = wait_for(lambda: [a for a in cli(daemon, "alerts", "--run", "old-hook")["firing"]
                                   if a["rule"] == "playbook_escalation"], what="the escalation")[0]
    assert "it cannot be paused or rewound (dump_batch, pause wanted); a person must stop it" in \
        escalation["summary"]
    [incident] = cli(daemon, "incidents")["incidents"]
    assert incident["state"] == "escalated"
    assert cli(daemon, "incident", "show", str(incident["id"]))["commands"] == []
    refused = cli_run(daemon, "pause", "old-hook")
    assert refused.returncode == 1 and "its hooks take no commands" in refused.stderr
    old.sock.settimeout(1.0)
    with pytest.raises(TimeoutError):
        old.read()  # no COMMAND frame, ever
    old.close()

    # Today's hook is granted what both ends speak; a name the daemon does not know is ignored.
    new = RawClient(daemon.socket)
    granted = hook_hello(new, "new-hook", capabilities=["commands", "events", "telepathy"])["capabilities"]
    assert granted == ["commands", "events"]
    sent = cli_run(daemon, "pause", "new-hook", "--wait", "0")
    assert sent.returncode == EXIT_PENDING
    kind, payload = new.read()
    assert kind == Kind.COMMAND and protocol.decode_json(payload)["action"] == "pause"
    new.close()


OLD = "8f339b3"  # the last commit before capability negotiation


def _old_daemon_tree() -> Path | None:
    """That commit's daemon package, importable as ``runwatch.daemon`` (None without history)."""
    git = ["git", "-C", str(REPO)]
    found = subprocess.run([*git, "cat-file", "-e", f"{OLD}^{{commit}}"], capture_output=True)
    if found.returncode != 0:
        return None
    root = short_tmpdir() / "old"
    (root / "runwatch").mkdir(parents=True)
    (root / "runwatch" / "__init__.py").write_text("")
    archive = root / "old.tar"
    subprocess.run([*git, "archive", "-o", str(archive), OLD, "daemon", "rules"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(root / "runwatch", filter="data")
    return root


def test_todays_hook_keeps_monitoring_with_the_daemon_from_before_the_negotiation() -> None:
    tree = _old_daemon_tree()
    if tree is None:
        pytest.skip(f"commit {OLD} is not in this clone's history")
    root = short_tmpdir()
    d = DaemonProcess(root, env={"PYTHONPATH": str(tree)}).start()
    try:
        hello = {"protocol": 1, "role": "hook", "run": "skew", "rank": 0, "world_size": 1, "host": "t",
                 "pid": 1, "hook_version": "new", "capabilities": ["commands", "events"], "launch": "abc"}
        sender = Sender(d.socket, hello, root / "skew.spool")
        sender.put_event({"type": "checkpoint", "step": 5, "path": "/nowhere/step-5", "format": "runwatch",
                          "size_bytes": 1, "saved_at": 1.0})
        sender.put(Batch(("loss",), np.array([1, 2]), np.full(2, time.time()), np.array([[1.0], [0.9]])))
        assert sender.flush(30), "the sender did not deliver to the old daemon"
        assert "capabilities" not in sender.hello and sender.daemon_capabilities == frozenset()
        assert sender.dropped_events == 1 and sender.refused is None
        sender.close(timeout=1)
        # The old daemon stored the samples and never saw an EVENT frame (it would have refused
        # the new HELLO once, by the field's name, and nothing after).
        assert [r["last_step"] for r in cli(d, "runs")] == [2]
        assert d.log().count("refused") == 1 and "capabilities: Extra inputs are not permitted" in d.log()
    finally:
        d.terminate()
