"""Shared fixtures: real daemon processes on real Unix sockets, and a raw protocol client."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runwatch.daemon import protocol
from runwatch.daemon.client import Client, DaemonUnreachable
from runwatch.daemon.protocol import Kind

REPO = Path(__file__).resolve().parent.parent


def short_tmpdir() -> Path:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    return Path(tempfile.mkdtemp(prefix="rw-", dir="/tmp"))


class DaemonProcess:
    """A ``runwatch daemon`` subprocess with its own socket and store."""

    def __init__(self, root: Path, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.root = root
        self.socket = root / "runwatch.sock"
        self.state_dir = root / "state"
        self.log_path = root / "daemon.log"
        self.extra_args = extra_args or []
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.exporter_url: str | None = None

    @property
    def store_path(self) -> Path:
        return self.state_dir / "runwatch.db"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "runwatch.daemon", "daemon", "--socket", str(self.socket),
                "--state-dir", str(self.state_dir), "--exporter-port", "0", *self.extra_args]

    def start(self, wait: bool = True) -> DaemonProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     env=self.env)
        log.close()
        if wait:
            self.exporter_url = self.wait_ready()["daemon"]["exporter"]
        return self

    def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            try:
                return self.status()
            except DaemonUnreachable:
                time.sleep(0.05)
        raise AssertionError(f"daemon not ready in {timeout}s:\n{self.log()}")

    def status(self) -> dict[str, Any]:
        with Client(self.socket) as c:
            return c.query("status")

    def query(self, op: str, **kw: Any) -> dict[str, Any]:
        with Client(self.socket) as c:
            return c.query(op, **kw)

    def metrics_text(self) -> str:
        assert self.exporter_url
        with urllib.request.urlopen(self.exporter_url, timeout=5) as resp:
            return resp.read().decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


@pytest.fixture
def rootdir() -> Iterator[Path]:
    root = short_tmpdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def daemon(rootdir: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(rootdir).start()
    yield d
    with contextlib.suppress(Exception):
        d.terminate()


class RawClient:
    """Speaks the protocol byte by byte, so tests can send what a real hook never would."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hello(self, run: str = "raw-run", rank: int = 0, world_size: int = 1) -> dict[str, Any]:
        self.send(protocol.json_frame(Kind.HELLO, {
            "protocol": 1, "role": "hook", "run": run, "rank": rank, "world_size": world_size,
            "host": "test", "pid": os.getpid(), "hook_version": "test"}))
        kind, payload = self.read()
        assert kind == Kind.WELCOME, payload
        return protocol.decode_json(payload)

    def read(self) -> tuple[Kind, bytes]:
        header = self._exactly(protocol.HEADER.size)
        kind, length = protocol.parse_header(header, 1 << 30)
        return kind, self._exactly(length)

    def _exactly(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    def expect_error(self) -> dict[str, Any]:
        kind, payload = self.read()
        assert kind == Kind.ERROR, (kind, payload)
        reply = protocol.decode_json(payload)
        # ...and then the daemon closes the connection.
        assert self.sock.recv(1) == b""
        return reply

    def close(self) -> None:
        self.sock.close()
