"""Interventions across ranks and nodes, on real gloo trainings (``tests/intervene_train.py``).

- The ranks agree on whether a command worked, not only on which to apply: a rewind that one
  rank cannot load keeps every rank paused, the daemon keeps every rank's answer and calls
  the command failed, and the ranks refuse to resume until a rewind works on all of them.
- Two nodes, two daemons: the daemon that global rank 0 talks to runs the run's playbook
  (its commands reach the other node's ranks through their agreement); the other daemon alerts,
  follows the run's state, and neither pauses nor escalates on its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, DaemonProcess, cli, cli_run, free_port, short_tmpdir, wait_for
from test_interventions import cli_command, result, run_to_end, start_daemon, train_cmd

from runwatch.daemon.cli import EXIT_FAILED


def torchrun(ranks: int, cmd: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
                             f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-backend=c10d", *cmd],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO)


def steady(d: DaemonProcess, run: str, seconds: float = 1.5) -> bool:
    """No step was stored for ``seconds``: the run is not training."""
    def last() -> int:
        return next(r for r in d.query("runs")["runs"] if r["run"] == run)["last_step"]

    first = last()
    time.sleep(seconds)
    return last() == first


# Reads go through the daemon's query API (what the CLI's --json prints, without starting a
# Python process per read on a loaded machine); commands go through the CLI, as people send them.
def escalations(d: DaemonProcess, run: str) -> list[dict[str, Any]]:
    return [a for a in d.query("alerts", run=run)["firing"] if a["rule"] == "playbook_escalation"]


def timeline(d: DaemonProcess, incident: int) -> list[dict[str, Any]]:
    return d.query("incident", id=incident)["incident"]["timeline"]


def control(d: DaemonProcess, run: str) -> dict[str, Any]:
    return d.query("checkpoints", run=run)["control"]


def test_a_rewind_one_rank_cannot_load_keeps_every_rank_paused_until_a_rewind_works_everywhere() -> None:
    root = short_tmpdir()
    d = start_daemon(root)
    try:
        # Rank 1's checkpoint folder is its own (empty): as if rank 0 saved to a node-local disk.
        proc = torchrun(2, train_cmd(d, root, "split", "--step-seconds", "0.03", "--steps", "160",
                                     "--local-ckpt-rank", "1"))
        wait_for(lambda: d.query("checkpoints", run="split")["checkpoints"], timeout=120, what="a checkpoint")
        assert cli(d, "pause", "split")["state"] == "applied"

        failed = cli_run(d, "rewind", "split", "--lr-scale", "0.5")
        assert failed.returncode == EXIT_FAILED, (failed.stdout, failed.stderr)
        target = json.loads(failed.stdout)["args"]["to"]
        # Every rank's answer is kept: rank 0 loaded the checkpoint, rank 1 could not.
        command = wait_for(lambda: len((c := cli_command(d, json.loads(failed.stdout)["id"]))["acks"]) == 2
                           and c, what="both ranks' answers")
        assert command["state"] == "failed"
        acks = {a["rank"]: a for a in command["acks"]}
        assert acks[0]["state"] == "applied" and acks[1]["state"] == "failed"
        assert f"no complete checkpoint at step {target} in {root / 'ckpt'}-rank1" in acks[1]["detail"]
        assert acks[0]["step"] == acks[1]["step"]

        # Nobody trains on: not rank 0 with the checkpoint's weights, not rank 1 with the old ones.
        assert control(d, "split")["state"] == "paused"
        assert proc.poll() is None and steady(d, "split", 1.0)
        incident = d.query("incidents", run="split")["incidents"][0]
        assert incident["state"] == "escalated"
        texts = [t["text"] for t in timeline(d, incident["id"])]
        assert any(t.startswith("rewind failed on rank 1: no clean checkpoint in") and "ckpt-rank1" in t
                   for t in texts)
        assert any(t.startswith("rewind failed on rank(s) 1 of 2; every rank stays paused; the ranks that"
                                " applied it now hold the checkpoint's state") for t in texts)
        firing = escalations(d, "split")
        assert firing and "rewind failed" in firing[0]["summary"]

        # A resume would let the two ranks train from different weights: every rank refuses it.
        resumed = cli_run(d, "resume", "split")
        assert resumed.returncode == EXIT_FAILED
        assert "training states differ" in json.loads(resumed.stdout)["result"]["detail"]
        assert steady(d, "split", 1.0)

        # A person puts the checkpoint where rank 1 can read it and rewinds again: it works on
        # both, at the same step, with the same learning rate, and the run finishes.
        [saved] = [c for c in d.query("checkpoints", run="split")["checkpoints"] if c["step"] == target]
        shutil.copytree(saved["path"], Path(f"{root / 'ckpt'}-rank1") / Path(saved["path"]).name)
        again = cli(d, "rewind", "split", "--to", str(target), "--lr-scale", "0.5")
        assert again["state"] == "applied"
        rewind = wait_for(lambda: len((c := cli_command(d, again["id"]))["acks"]) == 2 and c,
                          what="both ranks' rewind answers")
        assert {a["state"] for a in rewind["acks"]} == {"applied"}
        assert len({a["step"] for a in rewind["acks"]}) == 1
        run_to_end(d, proc)
        outs = [result(root, r) for r in range(2)]
        # The failed rewind counts on no rank: one rewind each, x0.5 (not x0.25 on rank 0).
        assert [len(o["rewinds"]) for o in outs] == [1, 1]
        assert all(o["lr_scale"] == pytest.approx(0.5) for o in outs)
        weights = [torch.load(root / f"out.rank{r}.pt", weights_only=True) for r in range(2)]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
        assert not escalations(d, "split")
    finally:
        d.terminate()


def test_on_two_nodes_rank_0s_daemon_runs_the_playbook_and_the_other_only_alerts() -> None:
    root_a, root_b = short_tmpdir(), short_tmpdir()
    a, b = start_daemon(root_a), start_daemon(root_b)
    try:
        cmd = train_cmd(a, root_a, "nodes", "--bad", "110", "--step-seconds", "0.03")
        cmd[cmd.index("--socket") + 1] = f"{a.socket},{b.socket}"  # rank 0 -> a, rank 1 -> b
        proc = torchrun(2, cmd)
        run_to_end(a, proc)

        # a: the whole playbook, its commands applied by both ranks (rank 1 through the agreement).
        [incident] = a.query("incidents")["incidents"]
        shown = a.query("incident", id=incident["id"])["incident"]
        applied = [t["text"] for t in shown["timeline"] if t["kind"] == "applied"]
        assert [t.split()[0] for t in applied] == ["paused", "dumped", "rewound"]
        assert "on every rank (all 2 agreed)" in applied[0]
        assert shown["state"] == "resolved" and shown["rewinds"] == 1
        for c in shown["commands"]:
            assert c["state"] == "applied"
            assert [k["rank"] for k in cli_command(a, c["id"])["acks"]] == [0]  # rank 1 told b

        # b saw the same spike (the gradient is all-reduced) and alerted, but opened no incident,
        # sent no command, and did not escalate for want of checkpoints (it has none).
        fired_b = {x["rule"] for x in b.query("alerts", run="nodes")["recent"] if x["state"] == "firing"}
        assert "grad_norm_divergence" in fired_b and "playbook_escalation" not in fired_b
        assert b.query("incidents")["incidents"] == []
        assert b.query("command", id=1).get("command") is None
        assert "global rank 0 is connected to another node's daemon" in b.log()
        # ...and it followed the run's state from what rank 1 reported.
        follow = control(b, "nodes")
        assert follow["state"] == "running" and follow["lr_scale"] == pytest.approx(0.1)
        # A person asking b is sent to the owner.
        refused = cli_run(b, "pause", "nodes")
        assert refused.returncode == 1 and "connected to another node's daemon" in refused.stderr

        outs = [result(root_a, r) for r in range(2)]
        assert len({o["rewinds"][0]["step"] for o in outs}) == 1
        assert all(o["lr_scale"] == pytest.approx(0.1) for o in outs)
        weights = [torch.load(root_a / f"out.rank{r}.pt", weights_only=True) for r in range(2)]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    finally:
        a.terminate()
        b.terminate()
