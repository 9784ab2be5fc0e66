"""End to end with real processes: a CPU training with the hook → daemon → SQLite → /metrics."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from runwatch.daemon.store import Store, count_points, series
from tests.conftest import DaemonProcess

pytest.importorskip("torch")


def _train(daemon: DaemonProcess, run: str, steps: int, record: Path, *extra: str,
           step_times: Path | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "runwatch.hooks.tinygpt", "--run", run, "--steps", str(steps),
           "--socket", str(daemon.socket), "--record", str(record), *extra]
    if step_times:
        cmd += ["--step-times", str(step_times), "--slow-step-dump", str(step_times) + ".stacks"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# A step that waited on the daemon would take seconds (a restart takes ~3 s, the handshake
# timeout is 10 s); the hook's own time stays far below, but on a loaded 2-core CI machine
# GIL and CPU contention stretched one step's hook time to 0.3 s. The bound says "never
# waits for the daemon", not "fast": speed is bench/hook_overhead.py's job.
HOOK_BOUND_SECONDS = 1.0


def _assert_never_blocked(conn, run: str, times: Path, what: str) -> None:
    """The hook's own time per step stays small whatever the daemon does.

    Whole-step times are printed, not asserted: on a 2-core machine a restarting daemon
    and the test itself take CPU from training, which says nothing about the hook. When a
    step was slow, the stacks of every thread at that moment are in the failure message.
    """
    _, hook = series(conn, run, 0, "hook_seconds")
    step_times = sorted(json.loads(times.read_text()))
    median_step = step_times[len(step_times) // 2]
    print(f"\n{what}: hook time per step max {hook.max() * 1000:.2f} ms, median "
          f"{np.median(hook) * 1000:.2f} ms; whole step median {median_step * 1000:.1f} ms,"
          f" max {step_times[-1] * 1000:.1f} ms")
    assert hook.max() < HOOK_BOUND_SECONDS, \
        f"the hook took {hook.max():.3f}s in one step:\n{_slow_stacks(times)}"


def _slow_stacks(times: Path) -> str:
    text = Path(str(times) + ".stacks").read_text()
    return "\n".join(chunk for chunk in text.split("--- ") if "Thread" in chunk)[-6000:]


def _keys_by_step(conn, run: str) -> dict[int, set[str]]:
    sets = {i: set(n.split("\n")) for i, n in conn.execute("SELECT id, names FROM metric_sets")}
    rows = conn.execute(
        "SELECT step, metric_set_id FROM samples WHERE stream_id = (SELECT s.id FROM streams s"
        " JOIN runs r ON r.id = s.run_id WHERE r.name = ? AND s.rank = 0)", (run,))
    out: dict[int, set[str]] = {}
    for step, set_id in rows:
        assert step not in out, f"step {step} stored twice"
        out[step] = sets[set_id]
    return out


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _metric_line(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not exported")


def test_points_stored_and_exported_are_the_points_sent(daemon: DaemonProcess, rootdir: Path) -> None:
    record = rootdir / "record.jsonl"
    proc = _train(daemon, "e2e", 120, record)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    sent = _records(record)
    conn = Store.reader(daemon.store_path)

    steps, loss = series(conn, "e2e", 0, "loss")
    assert steps.tolist() == list(range(120))
    np.testing.assert_allclose(loss, [r["loss"] for r in sent], rtol=1e-6)
    steps, gn = series(conn, "e2e", 0, "grad_norm")
    assert steps.tolist() == list(range(120))
    np.testing.assert_allclose(gn, [r["grad_norm"] for r in sent], rtol=1e-5)
    steps, lr = series(conn, "e2e", 0, "learning_rate/0")
    np.testing.assert_allclose(lr, [r["learning_rate"] for r in sent], rtol=1e-12)
    steps, dt = series(conn, "e2e", 0, "step_duration_seconds")
    assert steps.tolist() == list(range(1, 120)) and bool(np.all(dt > 0))
    # Every step carries the same signals (rates need a previous step): nothing else, nothing twice.
    keys = _keys_by_step(conn, "e2e")
    assert sorted(keys) == list(range(120))
    every_step = {
        "loss", "grad_norm", "learning_rate/0", "group_grad_norm/blocks.0", "group_grad_norm/blocks.1",
        "group_grad_norm/embeddings",
        "group_grad_norm/head", "group_grad_norm/other", "activation_norm/blocks.0",
        "activation_norm/blocks.1", "tokens", "useful_tokens", "token_efficiency", "samples",
        "batch_fingerprint", "hook_seconds", "guard_skipped", "guard_threshold", "forward_seconds",
    }
    rates = {"step_duration_seconds", "tokens_per_second", "samples_per_second", "data_wait_seconds"}
    # Every 16th step (15, 31, ...) also carries the drift histograms' bins.
    hist = {k for ks in keys.values() for k in ks if k.startswith("hist/")}
    assert {k.split("/")[1] for k in hist} >= {"seq_length", "output_entropy"}
    assert keys[0] == every_step
    for s in range(1, 120):
        assert keys[s] == every_step | rates | (hist if s % 16 == 15 else set()), s
    assert count_points(conn) == 120 * len(every_step) + 119 * len(rates) + 120 // 16 * len(hist)
    _, efficiency = series(conn, "e2e", 0, "token_efficiency")
    _, tokens = series(conn, "e2e", 0, "tokens")
    assert set(efficiency.tolist()) == {1.0} and set(tokens.tolist()) == {8 * 32}

    text = daemon.metrics_text()
    assert _metric_line(text, "runwatch_train_step", run="e2e", rank="0") == 119
    assert _metric_line(text, "runwatch_train_loss", run="e2e") == pytest.approx(sent[-1]["loss"], rel=1e-6)
    assert _metric_line(text, "runwatch_train_grad_norm", run="e2e") == pytest.approx(
        sent[-1]["grad_norm"], rel=1e-5)
    assert _metric_line(text, "runwatch_train_learning_rate", run="e2e", param_group="0") == \
        pytest.approx(sent[-1]["learning_rate"], rel=1e-12)
    assert f"runwatch_ingest_points_total {float(count_points(conn))}" in text

    runs = daemon.query("runs", all=True)["runs"]
    assert [r["run"] for r in runs] == ["e2e"]
    assert runs[0]["last_step"] == 119
    assert runs[0]["latest"]["loss"] == pytest.approx(sent[-1]["loss"], rel=1e-6)


def test_cli_status_and_runs_json(daemon: DaemonProcess, rootdir: Path) -> None:
    record = rootdir / "r.jsonl"
    # Long enough to still be connected when the table is asked for (the test stops it after).
    proc = _train(daemon, "cli-run", 2000, record, "--sleep", "0.05")
    try:
        deadline = time.monotonic() + 60
        runs: list = []
        while time.monotonic() < deadline and not runs:
            r = subprocess.run([sys.executable, "-m", "runwatch.daemon", "runs", "--json",
                                "--socket", str(daemon.socket)], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            runs = [x for x in json.loads(r.stdout) if x["last_step"] >= 0]
            time.sleep(0.2)
        assert runs and runs[0]["run"] == "cli-run" and runs[0]["connected"] == 1
        assert runs[0]["steps_per_second"] > 0
        r = subprocess.run([sys.executable, "-m", "runwatch.daemon", "runs",
                            "--socket", str(daemon.socket)], capture_output=True, text=True)
        assert "cli-run" in r.stdout and "1/1" in r.stdout, r.stdout
    finally:
        proc.kill()
        proc.communicate(timeout=120)
    r = subprocess.run([sys.executable, "-m", "runwatch.daemon", "status", "--json",
                        "--socket", str(daemon.socket)], capture_output=True, text=True)
    status = json.loads(r.stdout)
    assert status["reachable"] and status["daemon"]["socket"] == str(daemon.socket)
    assert status["daemon"]["exporter"].startswith("http://127.0.0.1:")
    r = subprocess.run([sys.executable, "-m", "runwatch.daemon", "status", "--json",
                        "--socket", str(Path(daemon.root) / "nobody.sock")], capture_output=True, text=True)
    assert r.returncode == 1 and json.loads(r.stdout)["reachable"] is False


@pytest.mark.slow
def test_kill9_daemon_mid_run_loses_nothing_and_never_stalls_a_step(
        daemon: DaemonProcess, rootdir: Path) -> None:
    record, times = rootdir / "record.jsonl", rootdir / "times.json"
    steps = 400
    proc = _train(daemon, "kill9", steps, record, "--sleep", "0.01", "--flush-every", "4",
                  step_times=times)
    for _ in range(2):
        time.sleep(1.5)
        daemon.kill9()
        time.sleep(1.0)  # the hook spools while nobody listens
        daemon.start()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    conn = Store.reader(daemon.store_path)
    got, loss = series(conn, "kill9", 0, "loss")
    assert got.tolist() == list(range(steps)), "every step arrives exactly once"
    np.testing.assert_allclose(loss, [r["loss"] for r in _records(record)], rtol=1e-6)
    assert sorted(_keys_by_step(conn, "kill9")) == list(range(steps))
    _assert_never_blocked(conn, "kill9", times, "kill -9 x2")


def test_daemon_absent_at_start_then_arrives(rootdir: Path) -> None:
    d = DaemonProcess(rootdir)
    record = rootdir / "record.jsonl"
    proc = _train(d, "late", 60, record, "--sleep", "0.02")
    time.sleep(2.0)  # training is running with no daemon at all
    d.start()
    try:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        steps, _ = series(Store.reader(d.store_path), "late", 0, "loss")
        assert steps.tolist() == list(range(60))
    finally:
        d.terminate()


def test_sigterm_drains_and_exits_cleanly(daemon: DaemonProcess, rootdir: Path) -> None:
    record = rootdir / "r.jsonl"
    proc = _train(daemon, "drain", 200, record, "--sleep", "0.005", "--flush-every", "2")
    time.sleep(2.0)
    assert daemon.terminate() == 0
    assert "stopped cleanly" in daemon.log()
    assert not daemon.socket.exists()
    daemon.start()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    steps, _ = series(Store.reader(daemon.store_path), "drain", 0, "loss")
    assert steps.tolist() == list(range(200))


def test_sighup_reloads_configuration(rootdir: Path) -> None:
    cfg = rootdir / "runwatch.toml"
    cfg.write_text('log_level = "info"\n')
    d = DaemonProcess(rootdir, ["--config", str(cfg)]).start()
    try:
        cfg.write_text('log_level = "debug"\nsocket_mode = "0600"\n')
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "configuration reloaded" not in d.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = d.log()
        assert "configuration reloaded" in log and "socket_mode change only after a restart" in log
        cfg.write_text("exporter_port = nonsense\n")
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "configuration refused" not in d.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "configuration refused, keeping the running one" in d.log()
        assert d.status()["daemon"]["pid"] == d.proc.pid
    finally:
        d.terminate()


def test_training_never_waits_for_a_stalled_daemon(daemon: DaemonProcess, rootdir: Path) -> None:
    """SIGSTOP the daemon: the socket accepts but nobody reads; steps must not slow down."""
    assert daemon.proc is not None
    record, times = rootdir / "r.jsonl", rootdir / "t.json"
    proc = _train(daemon, "stalled", 300, record, "--flush-every", "1", "--sleep", "0.005",
                  step_times=times)
    stop = threading.Timer(1.0, lambda: daemon.proc.send_signal(signal.SIGSTOP))  # type: ignore[union-attr]
    cont = threading.Timer(5.0, lambda: daemon.proc.send_signal(signal.SIGCONT))  # type: ignore[union-attr]
    stop.start()
    cont.start()
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    conn = Store.reader(daemon.store_path)
    steps, _ = series(conn, "stalled", 0, "loss")
    assert steps.tolist() == list(range(300))
    _assert_never_blocked(conn, "stalled", times, "daemon stopped for 4 s")
