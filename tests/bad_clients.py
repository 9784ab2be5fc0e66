"""Misbehaving clients of a runwatch daemon, all at once, for tests/test_faults.py.

    python tests/bad_clients.py SOCKET SECONDS

In their own process (their busy loops must not take the test's GIL from the good client it
times), for SECONDS:

- ``silent``: 40 connections that connect and never say a word;
- ``slowloris``: a HELLO, then a SAMPLES frame trickled one byte every 50 ms;
- ``flood``: a hook sending 64 KB SAMPLES frames as fast as the socket takes them, never
  reading its ACKs (a half-open reader: its receive buffer fills, then the daemon's);
- ``cli_flood``: a CLI connection asking ``status`` back to back;
- ``cli_deaf``: a CLI connection that sends queries and never reads a reply.

Prints one JSON line: what happened to each (closed by the daemon with which error, frames sent).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from typing import Any

import numpy as np

from runwatch.daemon import protocol
from runwatch.daemon.protocol import Kind


def connect(path: str, timeout: float | None = None) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def hello(run: str | None) -> bytes:
    """A hook's HELLO for ``run``, or a CLI's (None)."""
    if run is None:
        return protocol.json_frame(Kind.HELLO, {"protocol": 1, "role": "cli", "pid": os.getpid(),
                                                "hook_version": "bad"})
    return protocol.json_frame(Kind.HELLO, {"protocol": 1, "role": "hook", "run": run, "rank": 0,
                                            "world_size": 1, "host": "bad", "pid": os.getpid(),
                                            "hook_version": "bad"})


def first_error(s: socket.socket) -> str | None:
    """The code of the first ERROR frame the daemon sent on ``s`` (skipping others), or None."""
    buf = b""
    while True:
        try:
            chunk = s.recv(1 << 16)
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk
        while len(buf) >= protocol.HEADER.size:
            length, kind = protocol.HEADER.unpack_from(buf)
            if len(buf) < protocol.HEADER.size + length:
                break
            payload, buf = buf[protocol.HEADER.size:protocol.HEADER.size + length], \
                buf[protocol.HEADER.size + length:]
            if kind == Kind.ERROR:
                return str(json.loads(payload)["error"])


def silent(path: str, seconds: float, out: dict[str, Any]) -> None:
    socks = [connect(path, timeout=seconds) for _ in range(40)]
    codes: dict[str, int] = {}
    for s in socks:
        code = first_error(s) or "none"
        codes[code] = codes.get(code, 0) + 1
        s.close()
    out["silent"] = codes


def slowloris(path: str, seconds: float, out: dict[str, Any]) -> None:
    s = connect(path, timeout=seconds)
    s.sendall(hello("slowloris"))
    block = protocol.encode_block(("loss",), [0], [time.time()], [[1.0]])
    frame = protocol.samples_frame(1, [block])
    sent = 0
    deadline = time.monotonic() + seconds
    try:
        for byte in frame:
            if time.monotonic() > deadline:
                break
            s.sendall(bytes([byte]))
            sent += 1
            time.sleep(0.05)
    except OSError:
        pass  # closed by the daemon
    s.shutdown(socket.SHUT_WR)
    out["slowloris"] = {"bytes_sent": sent, "of": len(frame), "error": first_error(s)}
    s.close()


def flood(path: str, seconds: float, out: dict[str, Any]) -> None:
    s = connect(path, timeout=seconds)
    s.sendall(hello("flood"))
    names = tuple(f"m{i}" for i in range(128))
    frames = 0
    step = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            steps = np.arange(step, step + 64)
            block = protocol.encode_block(names, steps, np.full(64, time.time()), np.ones((64, len(names))))
            s.sendall(protocol.samples_frame(frames + 1, [block]))
            frames += 1
            step += 64
    except OSError as exc:  # a send that waited `seconds` (the daemon stopped reading us) or a close
        out["flood_error"] = type(exc).__name__
    out["flood"] = {"frames": frames, "steps": step}
    s.close()


def cli_flood(path: str, seconds: float, out: dict[str, Any]) -> None:
    s = connect(path, timeout=seconds)
    s.sendall(hello(None))
    first_reply = _read_frame(s)
    replies = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        s.sendall(protocol.json_frame(Kind.QUERY, {"op": "status"}))
        kind, _ = _read_frame(s)
        replies += kind == Kind.REPLY
    out["cli_flood"] = {"welcome": first_reply[0] == Kind.WELCOME, "replies": replies}
    s.close()


def cli_deaf(path: str, seconds: float, out: dict[str, Any]) -> None:
    s = connect(path, timeout=1.0)
    s.sendall(hello(None))
    sent, blocked = 0, False
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not blocked:
        try:  # runs (with every rank's latest row) makes the biggest replies
            s.sendall(protocol.json_frame(Kind.QUERY, {"op": "runs", "all": True}))
            sent += 1
        except TimeoutError:  # the daemon stopped reading us (a frame may be half sent: stop here)
            blocked = True
    time.sleep(max(0.0, deadline - time.monotonic()))  # and hold the connection open, deaf
    out["cli_deaf"] = {"queries_sent": sent, "blocked": blocked}
    s.close()


def _read_frame(s: socket.socket) -> tuple[int, bytes]:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    length, kind = protocol.HEADER.unpack(exactly(protocol.HEADER.size))
    return kind, exactly(length)


def main() -> None:
    path, seconds = sys.argv[1], float(sys.argv[2])
    out: dict[str, Any] = {}
    threads = [threading.Thread(target=f, args=(path, seconds, out))
               for f in (silent, slowloris, flood, cli_flood, cli_deaf)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
