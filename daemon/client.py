"""A small blocking client for the CLI: handshake, one query, one reply."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from runwatch.daemon import __version__, protocol
from runwatch.daemon.protocol import Kind


class DaemonUnreachable(Exception):
    """No daemon answers on the socket; the message says which socket and why."""


class Client:
    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError as exc:
            self.sock.close()
            raise DaemonUnreachable(f"no daemon at {path}: {exc.strerror or exc}") from None
        hello = {"protocol": protocol.PROTOCOL_VERSION, "role": "cli", "pid": os.getpid(),
                 "hook_version": __version__}
        try:
            self.sock.sendall(protocol.json_frame(Kind.HELLO, hello))
            kind, payload = self._read()
        except OSError as exc:
            self.sock.close()
            raise DaemonUnreachable(f"daemon at {path} dropped the handshake: {exc}") from None
        if kind != Kind.WELCOME:
            raise DaemonUnreachable(f"daemon at {path} refused the handshake: {payload!r}")
        self.welcome = protocol.decode_json(payload)

    def _read(self) -> tuple[Kind, bytes]:
        header = self._exactly(protocol.HEADER.size)
        kind, length = protocol.parse_header(header, 1 << 30)
        return kind, self._exactly(length)

    def _exactly(self, n: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            chunk = self.sock.recv(n - got)
            if not chunk:
                raise DaemonUnreachable(f"daemon at {self.path} closed the connection")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def query(self, op: str, **args: Any) -> dict[str, Any]:
        self.sock.sendall(protocol.json_frame(Kind.QUERY, {"op": op, **args}))
        kind, payload = self._read()
        reply = protocol.decode_json(payload)
        if kind == Kind.ERROR:
            raise DaemonUnreachable(f"daemon refused the query: {reply.get('detail')}")
        return reply

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
