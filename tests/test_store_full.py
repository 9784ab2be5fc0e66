"""The store's disk fills: the daemon says so, keeps alerting, and loses nothing (issue 11).

A real, small filesystem (tmpfs) holds the daemon's state; a filler file takes its last byte.
The hook is the real sender (it keeps unacknowledged steps and resends them); Slack is a
loopback HTTPS server.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import DaemonProcess, StubServer, free_port, wait_for
from test_notify_daemon import config, messages
from test_rules_daemon import SPIKE

from runwatch.daemon.store import Store
from runwatch.hooks.sender import Batch, Sender


@pytest.fixture
def small_disk(rootdir: Path) -> Iterator[Path]:
    mount = rootdir / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")

    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(path: Path) -> None:
    """Write until the filesystem says there is no room left."""
    with open(path, "wb", buffering=0) as f:
        chunk = b"\0" * (1 << 20)
        with contextlib.suppress(OSError):
            while True:
                f.write(chunk)
        with contextlib.suppress(OSError):
            while True:  # the last partial MiB
                f.write(b"\0" * 4096)
        with contextlib.suppress(OSError):
            os.fsync(f.fileno())


def test_a_full_disk_pauses_history_not_alerts_and_loses_nothing(
        rootdir: Path, small_disk: Path, tls_cert: tuple[Path, Path]) -> None:
    rules = rootdir / "rules"
    rules.mkdir()
    (rules / "spike.yaml").write_text(SPIKE)
    port = free_port()
    stub = StubServer(tls_cert, port=port)
    d = DaemonProcess(rootdir, ["--config", str(config(rootdir, port, tls_cert[0])), "--rules", str(rules),
                                "--state-dir", str(small_disk / "state")],
                      env={"RUNWATCH_STORE_RESERVE_MB": "4"})
    d.state_dir = small_disk / "state"
    d.start()
    hello = {"protocol": 1, "role": "hook", "run": "full", "rank": 0, "world_size": 1, "host": "h",
             "pid": os.getpid(), "hook_version": "test"}
    sender = Sender(d.socket, hello, rootdir / "spool" / "full.spool")

    def put(first: int, last: int, grad_norm: float = 1.0) -> None:
        for step in range(first, last):
            sender.put(Batch(("grad_norm",), np.array([step]), np.array([time.time()]),
                             np.array([[grad_norm]])))

    filler = small_disk / "filler"
    try:
        put(0, 40)
        assert sender.flush(30)
        assert (d.state_dir / "runwatch.reserve").stat().st_size == 4 << 20

        _fill(filler)
        put(40, 60)
        put(60, 61, grad_norm=9.0)  # the spike, while nothing more fits on the disk
        wait_for(lambda: "runwatch_store_full 1.0" in d.metrics_text(), 60, "the daemon to say: disk full")
        assert "the disk is full" in d.log() and "Sample history is paused" in d.log()
        # Alerts first: the spike was judged although its step could not be stored, and Slack heard.
        wait_for(lambda: any("spike" in m.get("text", "") for m in messages(stub, "slack")), 60,
                 "the spike's Slack message while the disk is full")
        conn = Store.reader(d.store_path)
        [(stored,)] = conn.execute("SELECT count(*) FROM samples").fetchall()
        assert stored < 61  # history really was refused, the spike's step too: the alert came from
        assert conn.execute("SELECT count(*) FROM samples WHERE step = 60").fetchone()[0] == 0  # memory
        assert conn.execute("SELECT count(*) FROM alert_events WHERE rule = 'spike'").fetchone()[0] == 1

        filler.unlink()  # space comes back
        wait_for(lambda: "runwatch_store_full 0.0" in d.metrics_text(), 60, "recovery")
        assert "disk space is back" in d.log()
        assert sender.flush(60)
        steps = [s for (s,) in conn.execute("SELECT step FROM samples s JOIN streams t ON t.id = s.stream_id"
                                            " JOIN runs r ON r.id = t.run_id WHERE r.name = 'full'"
                                            " ORDER BY step")]
        assert steps == list(range(61))  # every step, once
        assert conn.execute("SELECT count(*) FROM alert_events WHERE rule = 'spike'").fetchone()[0] == 1
        assert (d.state_dir / "runwatch.reserve").stat().st_size == 4 << 20  # set aside again
        conn.close()
    finally:
        sender.close(5)
        d.terminate()
        stub.close()
