"""Start-up refusals: clear message, non-zero exit, nothing corrupted."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from runwatch.daemon import protocol
from runwatch.daemon.protocol import Kind
from tests.conftest import DaemonProcess, RawClient


def _run(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runwatch.daemon", "daemon", "--exporter-port", "0",
                           *args], capture_output=True, text=True, timeout=60, **kw)


def test_socket_folder_not_writable(rootdir: Path) -> None:
    """A read-only filesystem refuses even root, so this runs the same for every user."""
    with tiny_disk(rootdir / "ro", "64k", readonly=True) as locked:
        r = _run("--socket", f"{locked}/r.sock", "--state-dir", str(rootdir / "state"))
    assert r.returncode == 3
    assert f"socket {locked}/r.sock: folder {locked} is not writable" in r.stderr


def test_socket_path_blocked_by_a_file(rootdir: Path) -> None:
    blocker = rootdir / "file"
    blocker.write_text("x")
    r = _run("--socket", str(blocker / "r.sock"), "--state-dir", str(rootdir / "s"))
    assert r.returncode == 3 and "cannot create folder" in r.stderr


def test_second_daemon_on_the_same_socket_is_refused(daemon: DaemonProcess) -> None:
    r = _run("--socket", str(daemon.socket), "--state-dir", str(daemon.root / "other"))
    assert r.returncode == 3 and "already listening" in r.stderr
    assert daemon.status()["daemon"]["socket"] == str(daemon.socket)


@contextlib.contextmanager
def tiny_disk(path: Path, size: str, readonly: bool = False) -> Iterator[str]:
    """A size-limited tmpfs where the kernel allows mounting one (root, CAP_SYS_ADMIN)."""
    path.mkdir()
    opts = f"size={size}" + (",ro" if readonly else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs here ({r.stderr.strip()}); this test needs root")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_state_folder_on_a_full_disk_at_start(rootdir: Path) -> None:
    with tiny_disk(rootdir / "disk", "8k") as disk:
        # Fill the tmpfs completely.
        with contextlib.suppress(OSError), open(Path(disk, "filler"), "wb") as fh:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
        r = _run("--socket", str(rootdir / "r.sock"), "--state-dir", disk)
        assert r.returncode == 3, r.stderr
        assert f"store {disk}/runwatch.db" in r.stderr and "full" in r.stderr.lower()


def test_disk_fills_while_running_then_space_returns(rootdir: Path) -> None:
    """Commits fail → frames are refused (never acked), the daemon lives on; nothing is lost."""
    with tiny_disk(rootdir / "disk", "2m") as disk:
        # No room on 2 MB for the space set aside for alerts (tests/test_store_full.py has one).
        d = DaemonProcess(rootdir, env={"RUNWATCH_STORE_RESERVE_MB": "0"})
        d.state_dir = Path(disk)
        d.start()
        filler = Path(disk, "filler")
        try:
            c = RawClient(d.socket)
            c.hello(run="disk")
            names = tuple(f"m{i}" for i in range(200))
            sent_ok, refused, step = 0, None, 0
            for seq in range(1, 2000):
                block = protocol.encode_block(names, [step], [time.time()], np.random.rand(1, 200))
                c.send(protocol.samples_frame(seq, [block]))
                kind, payload = c.read()
                if kind == Kind.ERROR:
                    refused = protocol.decode_json(payload)
                    break
                sent_ok += 1
                step += 1
                if seq == 20:  # leave the store a little room, then take it away
                    with contextlib.suppress(OSError), open(filler, "wb") as fh:
                        while True:
                            fh.write(b"\0" * 65536)
                            fh.flush()
            assert refused is not None and refused["error"] == "store_unavailable", refused
            assert "full" in refused["detail"]
            status = d.status()  # still serving
            assert status["ingest"]["rejected_frames_total"].get("store_unavailable") == 1
            assert 'runwatch_store_errors_total{kind="disk_full"}' in d.metrics_text()
            filler.unlink()  # space returns
            c = RawClient(d.socket)
            c.hello(run="disk")
            block = protocol.encode_block(names, [step], [time.time()], np.random.rand(1, 200))
            c.send(protocol.samples_frame(10_000, [block]))
            assert c.read()[0] == Kind.ACK
        finally:
            d.terminate()
        conn = sqlite3.connect(Path(disk, "runwatch.db"))
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0] == sent_ok + 1
