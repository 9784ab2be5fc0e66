"""Shared fixtures: real daemon processes on real Unix sockets, and a raw protocol client."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from runwatch.daemon import protocol
from runwatch.daemon.client import Client, DaemonUnreachable
from runwatch.daemon.protocol import Kind

REPO = Path(__file__).resolve().parent.parent

# Each test process (one per xdist worker) and the trainings it starts spool into a folder of
# their own: runs of the same name in two files at once must not replay each other's spool.
os.environ.setdefault("RUNWATCH_SPOOL_DIR", tempfile.mkdtemp(prefix="rw-spool-"))


def wait_for(check: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy (and return that), or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


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
        # The node sampler adds its own rows to the store; tests that count what a hook sent
        # run without it (tests/test_sampler.py switches it on).
        self.env = {**os.environ, "RUNWATCH_SAMPLE_INTERVAL_SECONDS": "0", **(env or {})}
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

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        # Generous: with the suite running two files at once on two cores, a daemon's start
        # (imports, store schema) can take tens of seconds; a healthy one answers far sooner.
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


def cli_run(d: DaemonProcess, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    """``runwatch ARGS --json`` against ``d``, as a user runs it."""
    cmd = [sys.executable, "-m", "runwatch.daemon", *args, "--socket", str(d.socket), "--json"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def cli(d: DaemonProcess, *args: str) -> Any:
    """The JSON a successful ``runwatch ARGS --json`` prints."""
    r = cli_run(d, *args)
    assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr)
    return json.loads(r.stdout)


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


# -- loopback HTTPS servers standing in for Slack, PagerDuty and webhooks ---------------------

Reply = tuple[int, dict[str, str], bytes]


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the pagerduty client insists on https)."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-days", "2"], check=True, capture_output=True)
    return cert, key


class StubServer:
    """A real HTTPS server on loopback. ``reply(path, body)`` decides each answer (default:
    what Slack, PagerDuty and webhooks answer on success); every request is recorded."""

    def __init__(self, cert: tuple[Path, Path], port: int = 0) -> None:
        self.requests: list[dict[str, Any]] = []
        self.reply: Callable[[str, dict[str, Any]], Reply] = self.success
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {"_raw": raw.decode(errors="replace")}
                status, headers, out = stub.reply(self.path, body)
                with stub._lock:
                    stub.requests.append({"t": time.monotonic(), "path": self.path,
                                          "headers": dict(self.headers), "body": body, "status": status})
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def success(path: str, body: dict[str, Any]) -> Reply:
        if path.endswith("chat.postMessage"):
            return 200, {}, json.dumps({"ok": True, "ts": f"{time.time():.6f}"}).encode()
        if path.endswith("/v2/enqueue"):
            reply = {"status": "success", "dedup_key": body.get("dedup_key", "k")}
            return 202, {}, json.dumps(reply).encode()
        return 200, {"Content-Type": "text/plain"}, b"ok"

    def ok(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if 200 <= r["status"] < 300]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
