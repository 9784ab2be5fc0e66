"""The intervention playbook on real training: pause, dump, rewind, escalate, across ranks.

Each run is ``tests/intervene_train.py`` (TinyGPT on CPU with the hook, checkpoints saved by
``watch.checkpoint()``) talking to a real daemon process running the default rule pack; what
happened is read back the way a user reads it (the CLI's ``--json``), and the weights are
compared with an independent restore of the same checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, DaemonProcess, RawClient, cli, cli_run, free_port, short_tmpdir, wait_for

sys.path.insert(0, str(REPO / "tests"))
import intervene_train

from runwatch.daemon import protocol
from runwatch.daemon.cli import EXIT_PENDING
from runwatch.daemon.client import Client
from runwatch.daemon.protocol import Kind
from runwatch.hooks import checkpoint as ckpt_io
from runwatch.hooks.control import scale_learning_rate

STEPS = 170
# A checkpoint is clean once 5 healthy steps followed it (the default, 50, would send these
# short runs back further than the checkpoints they have).
PLAYBOOK = "[playbook]\nwatch_steps = {watch}\nmax_rewinds = 2\n[retention]\nconfirm_steps = 5\n"


def start_daemon(root: Path, watch_steps: int = 30, **kw: Any) -> DaemonProcess:
    config = root / "runwatch.toml"
    config.write_text(PLAYBOOK.format(watch=watch_steps))
    return DaemonProcess(root, extra_args=["--config", str(config)], **kw).start()


def train_cmd(d: DaemonProcess, root: Path, run: str, *extra: str) -> list[str]:
    return [str(REPO / "tests" / "intervene_train.py"), "--name", run, "--socket", str(d.socket),
            "--ckpt-dir", str(root / "ckpt"), "--out", str(root / "out"), "--steps", str(STEPS), *extra]


def run_to_end(d: DaemonProcess, proc: subprocess.Popen[bytes], timeout: float = 240) -> None:
    """Wait for a training process; if it does not finish, show what the daemon decided."""
    try:
        assert proc.wait(timeout=timeout) == 0
    except subprocess.TimeoutExpired:
        proc.kill()
        shown = [cli_run(d, "incident", "show", str(i["id"])).stdout
                 for i in cli(d, "incidents")["incidents"]]
        raise AssertionError(f"training did not finish in {timeout:g}s; incidents: {json.dumps(shown)[:6000]}"
                             f"\ndaemon log:\n{d.log()[-6000:]}") from None


def result(root: Path, rank: int = 0) -> dict[str, Any]:
    return json.loads((root / f"out.rank{rank}.json").read_text())


def timeline(d: DaemonProcess, incident: int) -> list[tuple[str, str]]:
    shown = cli(d, "incident", "show", str(incident))
    return [(t["kind"], t["text"]) for t in shown["timeline"]]


def replay(ckpt: str, lr_scale: float, indices: list[int], bad: set[int]) -> dict[str, torch.Tensor]:
    """A clean run restored from ``ckpt`` independently of the watch, fed the same batches
    (on one thread, as the training ran: a different split of a matmul rounds differently)."""
    torch.set_num_threads(1)
    model, optimizer, schedule = intervene_train.make(STEPS)
    ckpt_io.load(Path(ckpt), model=model, optimizer=optimizer, scheduler=schedule)
    scale_learning_rate(optimizer, schedule, lr_scale)
    for index in indices:
        intervene_train.train_step(model, optimizer, schedule, index, 0, bad)
    return model.state_dict()


def test_a_bad_batch_pauses_the_run_and_it_comes_back_from_the_clean_checkpoint() -> None:
    root = short_tmpdir()
    d = start_daemon(root)
    try:
        cmd = train_cmd(d, root, "spike", "--bad", "110", "--step-seconds", "0.03")
        run_to_end(d, subprocess.Popen([sys.executable, *cmd]))
        incidents = cli(d, "incidents")["incidents"]
        assert len(incidents) == 1
        inc = cli(d, "incident", "show", str(incidents[0]["id"]))
        kinds = [t["kind"] for t in inc["timeline"]]
        # The whole story, in order: fired, decided, commanded, paused, dumped, rewound, resolved.
        assert kinds[:2] == ["alert", "decision"]
        assert inc["timeline"][0]["detail"]["step"] == 110
        applied = [t for t in inc["timeline"] if t["kind"] == "applied"]
        assert [t["text"].split()[0] for t in applied] == ["paused", "dumped", "rewound"]
        assert kinds[-1] == "resolved" and inc["state"] == "resolved" and inc["rewinds"] == 1
        pause, dump, rewind = (c for c in inc["commands"])
        assert [c["action"] for c in (pause, dump, rewind)] == ["pause", "dump_batch", "rewind"]
        # The pause lands at the first step boundary after the daemon saw the spike (step 110
        # sent when it ended; the rule fired while 111 ran; 112 never started unpaused).
        assert pause["step"] <= 112
        assert rewind["result"]["checkpoint_step"] == 100
        assert rewind["result"]["lr_scale"] == pytest.approx(0.1)

        # The dumped batches are on disk and include the corrupted one.
        dumped = Path(dump["result"]["path"])
        meta = json.loads((dumped / "batches.json").read_text())
        bad_x, bad_y = intervene_train.batch_at(110)
        bad_y = intervene_train.corrupt(bad_y, 110)
        found = [torch.load(dumped / b["file"], weights_only=True) for b in meta["batches"]]
        assert any(torch.equal(b["args"][0], bad_x) and torch.equal(b["kwargs"]["labels"], bad_y)
                   for b in found)

        # Weights equal a clean restore of step 100 with LR x0.1 fed the batches the run trained on
        # after the rewind: the bad update is gone and nothing else differs.
        out = result(root)
        assert len(out["rewinds"]) == 1 and out["lr_scale"] == pytest.approx(0.1)
        at = out["rewinds"][0]["at"]
        assert out["trained"][at] > 110  # the data went on forward: batches 100-111 are skipped
        expected = replay(rewind["result"]["checkpoint"], 0.1, out["trained"][at:], set())
        final = torch.load(root / "out.rank0.pt", weights_only=True)
        assert all(torch.equal(final[k], expected[k]) for k in expected)

        # The scale is recorded and visible: in the run's control state and in Prometheus.
        control = cli(d, "checkpoints", "spike")["control"]
        assert control["lr_scale"] == pytest.approx(0.1) and control["state"] == "running"
        assert 'runwatch_train_lr_scale{rank="0",run="spike"} 0.1' in d.metrics_text()
    finally:
        d.terminate()


def test_a_fault_that_comes_back_twice_escalates_and_waits_for_a_person() -> None:
    root = short_tmpdir()
    d = start_daemon(root, watch_steps=200)
    try:
        proc = subprocess.Popen([sys.executable, *train_cmd(d, root, "recur", "--bad", "105,130,155",
                                                            "--step-seconds", "0.03")])
        # Spike 1 and 2: rewinds. Spike 3: critical escalation, and the run stays paused.
        firing = wait_for(lambda: [a for a in cli(d, "alerts", "--run", "recur")["firing"]
                                   if a["rule"] == "playbook_escalation"], timeout=120, what="escalation")
        assert firing[0]["severity"] == "critical"
        assert "likely numerical or architectural" in firing[0]["summary"]
        inc = cli(d, "incidents", "--run", "recur")["incidents"][0]
        assert inc["state"] == "escalated" and inc["rewinds"] == 2
        steps = [cli(d, "runs")[0]["last_step"] for _ in range(2)]
        assert proc.poll() is None and steps[0] == steps[1]  # alive, and not training
        reply = cli(d, "resume", "recur")
        assert reply["state"] == "applied"
        run_to_end(d, proc)
        shown = cli(d, "incident", "show", str(inc["id"]))
        kinds = [t["kind"] for t in shown["timeline"]]
        assert kinds.count("alert") == 3 and "escalated" in kinds
        assert [c["action"] for c in shown["commands"] if c["action"] == "rewind"] == ["rewind", "rewind"]
        assert result(root)["lr_scale"] == pytest.approx(0.01)  # x0.1 twice, kept
        resolved = [a for a in cli(d, "alerts", "--run", "recur")["recent"]
                    if a["rule"] == "playbook_escalation" and a["state"] == "resolved"]
        assert resolved and "resumed by a person" in resolved[0]["summary"]
    finally:
        d.terminate()


@pytest.mark.parametrize("ranks", [2, 4])
def test_every_rank_pauses_and_rewinds_at_the_same_step_and_a_daemon_kill_loses_nothing(ranks: int) -> None:
    root = short_tmpdir()
    d = start_daemon(root)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
                                 f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-backend=c10d",
                                 *train_cmd(d, root, "ddp", "--step-seconds", "0.05", "--steps", "400")],
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO)
        wait_for(lambda: (r := cli_run(d, "checkpoints", "ddp")).returncode == 0
                 and json.loads(r.stdout)["checkpoints"], timeout=120, what="a checkpoint")
        paused = cli(d, "pause", "ddp")
        assert paused["state"] == "applied"
        pause = wait_for(lambda: len((c := cli_command(d, paused["id"]))["acks"]) == ranks and c,
                         what="every rank's pause ack")
        assert len({a["step"] for a in pause["acks"]}) == 1  # the same step on every rank

        d.kill9()  # while paused: the ranks stay paused, and the store still says so
        d = DaemonProcess(root, extra_args=d.extra_args).start()
        assert cli(d, "checkpoints", "ddp")["control"]["state"] == "paused"
        first = cli(d, "runs")[0]["last_step"]
        assert proc.poll() is None
        assert cli(d, "runs")[0]["last_step"] == first

        rewound = cli(d, "rewind", "ddp", "--lr-scale", "0.5")
        assert rewound["state"] == "applied"
        rewind = wait_for(lambda: len((c := cli_command(d, rewound["id"]))["acks"]) == ranks and c,
                          what="every rank's rewind ack")
        assert len({a["step"] for a in rewind["acks"]}) == 1
        run_to_end(d, proc)
        outs = [result(root, r) for r in range(ranks)]
        assert all(o["lr_scale"] == pytest.approx(0.5) for o in outs)
        assert len({o["rewinds"][0]["step"] for o in outs}) == 1
        weights = [torch.load(root / f"out.rank{r}.pt", weights_only=True) for r in range(ranks)]
        assert all(torch.equal(weights[0][k], w[k]) for w in weights[1:] for k in weights[0])
    finally:
        d.terminate()


def cli_command(d: DaemonProcess, cid: int) -> dict[str, Any]:
    return d.query("command", id=cid)["command"]


# -- the control channel and who may use it (raw hook connections, no training) --------------


def hook_hello(raw: RawClient, run: str, rank: int = 0, world_size: int = 1, **extra: Any) -> dict[str, Any]:
    """A current hook's HELLO: it offers the control channel (RawClient.hello speaks the older one)."""
    raw.send(protocol.json_frame(Kind.HELLO, {
        "protocol": 1, "role": "hook", "run": run, "rank": rank, "world_size": world_size, "host": "test",
        "pid": os.getpid(), "hook_version": "test", "capabilities": ["commands", "events"], **extra}))
    kind, payload = raw.read()
    assert kind == Kind.WELCOME, payload
    return protocol.decode_json(payload)


def read_command(raw: RawClient) -> dict[str, Any]:
    kind, payload = raw.read()
    assert kind == Kind.COMMAND, (kind, payload)
    return protocol.decode_json(payload)


def test_a_command_is_pushed_until_acknowledged_and_applied_once(daemon: DaemonProcess) -> None:
    raw = RawClient(daemon.socket)
    hook_hello(raw, "ctl")
    sent = cli_run(daemon, "pause", "ctl", "--wait", "0")
    assert sent.returncode == EXIT_PENDING  # nobody applied it yet
    command = read_command(raw)
    assert command["action"] == "pause" and command["run"] == "ctl"
    raw.close()  # gone without acknowledging: the next connection gets it again

    raw = RawClient(daemon.socket)
    hook_hello(raw, "ctl")
    assert read_command(raw)["id"] == command["id"]
    ack = {"type": "command", "origin": command["origin"], "id": command["id"], "action": "pause",
           "state": "applied", "step": 7, "result": {}, "detail": ""}
    for _ in range(2):  # a replay of the same event (same seq) is acknowledged and ignored
        raw.send(protocol.event_frame(41, ack))
        kind, payload = raw.read()
        assert kind == Kind.ACK and protocol.ACK.unpack(payload)[0] == 41
    raw.close()

    raw = RawClient(daemon.socket)
    hook_hello(raw, "ctl")
    raw.sock.settimeout(1.0)
    with pytest.raises(TimeoutError):
        raw.read()  # acknowledged: not pushed again
    raw.close()
    found = cli(daemon, "incident", "show", str(cli(daemon, "incidents")["incidents"][0]["id"]))
    assert [t["text"] for t in found["timeline"] if t["kind"] == "applied"] == [
        "paused before step 7 on every rank (the run has one)"]
    assert cli(daemon, "checkpoints", "ctl")["control"]["state"] == "paused"


def test_malformed_events_are_refused_and_the_daemon_keeps_serving(daemon: DaemonProcess) -> None:
    for payload in (b"\x01\x02", b"\x00" * 8 + b"not json"):
        raw = RawClient(daemon.socket)
        raw.hello(run="bad-events")
        raw.send(protocol.frame(Kind.EVENT, payload))
        assert raw.expect_error()["error"] == "malformed"
    # An event with the wrong fields is stored, acknowledged and not acted on.
    raw = RawClient(daemon.socket)
    raw.hello(run="bad-events")
    bad = [{"type": "checkpoint", "path": "/x"},  # no step
           {"type": "checkpoint", "path": "/x", "step": 10**30, "saved_at": 1.0},  # too big for SQLite
           {"type": "checkpoint", "path": "/x", "step": 5, "saved_at": float("nan")},
           {"type": "command", "origin": "x", "id": 1, "state": "applied", "step": "abc", "result": []}]
    for seq, event in enumerate(bad, 1):
        raw.send(protocol.event_frame(seq, event))
        kind, payload = raw.read()
        assert kind == Kind.ACK and protocol.ACK.unpack(payload)[0] == seq  # stored; the connection lives
    assert cli(daemon, "checkpoints", "bad-events")["checkpoints"] == []
    assert "malformed checkpoint event" in daemon.log()


def test_bad_control_requests_are_refused_with_the_reason(daemon: DaemonProcess) -> None:
    raw = RawClient(daemon.socket)
    hook_hello(raw, "ctl2")
    raw.send(protocol.event_frame(1, {"type": "checkpoint", "step": 40, "path": "/c/step-40",
                                      "format": "runwatch", "size_bytes": 10, "saved_at": 1.0}))
    assert raw.read()[0] == Kind.ACK
    cases = [
        (["rewind", "ctl2", "--to", "30"], "registered no checkpoint at step 30; it has: 40"),
        (["rewind", "ctl2", "--lr-scale", "0"], "--lr-scale: a factor above 0"),
        (["rewind", "ctl2", "--skip", "-1"], "--skip: a number of batches"),
        (["pause", "no-such-run"], "no run named 'no-such-run'"),
    ]
    for args, reason in cases:
        r = cli_run(daemon, *args)
        assert r.returncode == 1 and reason in r.stderr, (args, r.stderr)
    assert cli(daemon, "incidents")["incidents"] == []  # nothing was sent


def test_control_from_another_user_is_refused_and_logged(rootdir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the CLI as a second uid")
    rootdir.chmod(0o755)
    d = DaemonProcess(rootdir, env={"RUNWATCH_SOCKET_MODE": "0666"}).start()
    try:
        raw = RawClient(d.socket)
        hook_hello(raw, "mine")  # the run belongs to this test's uid (root)

        # The interpreter lives under /root, which uid 65534 cannot enter: a forked child that
        # drops to uid 65534 asks instead, over a real connection (SO_PEERCRED says who it is).
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.setgid(65534)
                os.setuid(65534)
                with Client(d.socket) as client:
                    reply = client.query("control", run="mine", action="pause", params={})
                os.write(writer, json.dumps(reply).encode())
            finally:
                os._exit(0)
        os.close(writer)
        os.waitpid(pid, 0)
        with os.fdopen(reader) as fh:
            reply = json.loads(fh.read())
        assert reply["error"] == ("run 'mine' belongs to uid 0; only its owner or root may pause it"
                                  " (you are uid 65534)")
        assert "control refused: uid 65534 asked to pause run mine, which belongs to uid 0" in d.log()
        assert "runwatch_control_refused_total 1.0" in d.metrics_text()
        assert cli(d, "incidents")["incidents"] == []
        assert cli_run(d, "pause", "mine", "--wait", "0").returncode == EXIT_PENDING  # root may
    finally:
        d.terminate()


def test_a_token_efficiency_drop_names_the_shard_verifies_it_and_a_person_skips_it(
        daemon: DaemonProcess, rootdir: Path) -> None:
    data = rootdir / "data"
    data.mkdir()
    for n in (16, 17):
        (data / f"shard-{n:05d}.jsonl").write_text(f"rows of shard {n}\n" * 100)
    wrote = subprocess.run([sys.executable, "-m", "runwatch.daemon", "manifest", str(data)],
                           capture_output=True, text=True, timeout=60)
    assert wrote.returncode == 0 and "runwatch-manifest.json" in wrote.stdout, wrote.stderr
    (data / "shard-00017.jsonl").write_text("truncated\n")  # the shard changed after the manifest
    raw = RawClient(daemon.socket)
    raw.send(protocol.json_frame(Kind.HELLO, {
        "protocol": 1, "role": "hook", "run": "tokens", "rank": 0, "world_size": 1, "host": "t",
        "pid": os.getpid(), "hook_version": "test", "data_dir": str(data),
        "capabilities": ["commands", "events"]}))
    assert raw.read()[0] == Kind.WELCOME
    names = ("data_shard", "token_efficiency")
    for step in range(210):  # past the rule's warm-up (its baseline is refreshed every 64 steps)
        shard, eff = (17.0, 0.3) if step >= 200 else (16.0, 0.9 + 0.01 * (step % 3))
        raw.send(protocol.samples_frame(step + 1, [protocol.encode_block(names, [step], [time.time()],
                                                                         [[shard, eff]])]))
        assert raw.read()[0] == Kind.ACK

    def verified() -> list[str]:
        incidents = cli(daemon, "incidents", "--run", "tokens")["incidents"]
        if not incidents:
            return []
        return [t["text"] for t in cli(daemon, "incident", "show", str(incidents[0]["id"]))["timeline"]
                if t["kind"] == "verify"]

    [text] = wait_for(verified, what="the shard's verification")
    assert text.startswith("shard 17 differs from the manifest: shard-00017.jsonl: mismatch")
    sent = cli_run(daemon, "skip-shard", "tokens", "17", "--wait", "0")
    assert sent.returncode == EXIT_PENDING
    command = read_command(raw)
    assert command["action"] == "skip_shard" and command["args"] == {"shard": 17}


def test_skipped_shards_and_batches_are_dropped_and_counted(tmp_path: Path) -> None:
    import runwatch.hooks

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = runwatch.hooks.watch(model, opt, run="skips", socket=tmp_path / "none.sock", spool_dir=tmp_path)
    watch.control.receive({"origin": "t", "id": 1, "action": "skip_shard", "args": {"shard": "b"}})
    batches = [{"shard": s, "input_ids": torch.zeros(2, 8, dtype=torch.long)} for s in "aabbab"]
    seen = []
    for batch in watch.data(batches, shard=lambda b: b["shard"]):
        seen.append(batch["shard"])
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    # The command was taken in after the first step and applied before the second forward.
    assert seen == ["a", "a", "a"]
    assert vars(watch.control.skipped) == {"batches": 3, "samples": 6, "tokens": 48}
    watch.close(timeout=0.1)
