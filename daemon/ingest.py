"""Ingest: the asyncio Unix-socket server that hooks and the CLI talk to.

One task per connection. A bad frame gets an ERROR frame with its reason, the connection
is closed and the reject counted; nobody else notices. Sample frames are decoded here and
handed to the writer thread; the ACK goes back only after the writer has committed them.
Memory is bounded by an in-flight byte budget: when the writer falls behind, connections
stop being read, the hooks' acks slow down, and the hooks spool instead of the daemon
buffering without end.

Control: EVENT frames from a hook go to the playbook on the writer thread and are ACKed
once stored; COMMAND frames go out to every connected rank of a run that has not
acknowledged them, when the playbook makes one and when a rank connects, but only to hooks
whose HELLO offered the ``commands`` capability (an older hook would loop on them). The
WELCOME names the capabilities the connection uses, and the log says when control is off.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runwatch.daemon import __version__, protocol
from runwatch.daemon.config import Settings
from runwatch.daemon.exporter import DaemonMetrics
from runwatch.daemon.handshake import Hello, decode_hello
from runwatch.daemon.live import LiveView
from runwatch.daemon.playbook import Playbook
from runwatch.daemon.protocol import Kind, ProtocolError
from runwatch.daemon.store import StreamInfo
from runwatch.daemon.writer import Done, Write, Writer

log = logging.getLogger("runwatch.ingest")

_CREDS = struct.Struct("3i")
#: One connection may hold at most 1/CONNECTION_SHARE of the in-flight budget (one frame always
#: passes). A real hook keeps at most 64 frames unacknowledged, far below it.
CONNECTION_SHARE = 16
Query = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


@dataclass(eq=False)
class Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer: Peer
    role: str = "?"
    stream: StreamInfo | None = None
    closed: bool = False
    name: str = field(default="")
    capabilities: frozenset[str] = frozenset()
    # This connection's part of the in-flight budget (see CONNECTION_SHARE); hooks only.
    share: InflightBudget | None = None

    acks: list[bytes] = field(default_factory=list)

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.writer.write(data)

    def flush_acks(self) -> None:
        if self.acks:
            self.send(b"".join(self.acks))
            self.acks.clear()

    def refuse(self, code: str, detail: str) -> None:
        self.send(protocol.error_frame(code, detail))
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()


class InflightBudget:
    """Bytes decoded but not yet committed. One frame may always pass, however large."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiting = 0
        self._cond = asyncio.Condition()

    async def acquire(self, n: int) -> None:
        if self.used and self.used + n > self.limit:
            self._waiting += 1
            try:
                async with self._cond:
                    await self._cond.wait_for(lambda: not self.used or self.used + n <= self.limit)
            finally:
                self._waiting -= 1
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n
        if self._waiting:
            asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        async with self._cond:
            self._cond.notify_all()


def peer_credentials(writer: asyncio.StreamWriter) -> Peer:
    sock: socket.socket = writer.get_extra_info("socket")
    pid, uid, gid = _CREDS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size))
    return Peer(pid, uid, gid)


class Ingest:
    def __init__(
        self,
        settings: Callable[[], Settings],
        writer: Writer,
        live: LiveView,
        metrics: DaemonMetrics,
        query: Query,
        playbook: Playbook | None = None,
    ) -> None:
        self._settings = settings
        self._writer = writer
        self._live = live
        self._metrics = metrics
        self._query = query
        self._playbook = playbook
        self._hooks: dict[str, set[Connection]] = {}
        self._decoder = protocol.SamplesDecoder()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections: set[Connection] = set()
        self._outstanding = 0
        self._acking: set[Connection] = set()
        self._all_acked = asyncio.Event()
        self._all_acked.set()
        self._budget = InflightBudget(settings().inflight_bytes)
        self._loop = asyncio.get_running_loop()

    @property
    def connections(self) -> int:
        return len(self._connections)

    # -- lifecycle --------------------------------------------------------------------

    async def listen(self, path: Path, mode: int) -> None:
        self._server = await asyncio.start_unix_server(self._accept, path=str(path))
        os.chmod(path, mode)

    def stop_reading(self) -> None:
        """Stop accepting and reading; frames already handed to the writer still get acked."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()

    async def wait_acked(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._all_acked.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close_all(self) -> None:
        for conn in list(self._connections):
            conn.close()
        if self._server is not None:
            await self._server.wait_closed()

    def notify(self, results: list[tuple[Done, BaseException | None]]) -> None:
        """Called by the writer thread after a commit; runs the callbacks on the loop."""
        self._loop.call_soon_threadsafe(self._deliver, results)

    def deliver(self, run: str, commands: list[tuple[dict[str, Any], set[int]]]) -> None:
        """Push commands to ``run``'s connected ranks (any thread)."""
        self._loop.call_soon_threadsafe(self._send_commands, run, commands, None)

    def _send_commands(self, run: str, commands: list[tuple[dict[str, Any], set[int]]],
                       only: Connection | None) -> None:
        for conn in [only] if only is not None else list(self._hooks.get(run, ())):
            assert conn.stream is not None
            if "commands" not in conn.capabilities:
                continue  # an older hook: it would drop the connection on the unknown frame kind
            for command, acked in commands:
                if conn.stream.rank not in acked:
                    conn.send(protocol.json_frame(Kind.COMMAND, command))

    def _deliver(self, results: list[tuple[Done, BaseException | None]]) -> None:
        for done, error in results:
            done(error)
        # One write per connection per commit, not one per frame.
        for conn in self._acking:
            conn.flush_acks()
        self._acking.clear()

    # -- connections ------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = Connection(reader, writer, peer_credentials(writer))
        self._connections.add(conn)
        try:
            await self._serve(conn)
        except ProtocolError as exc:
            self._reject(conn, exc.code, exc.detail)
        except asyncio.CancelledError:
            # Draining: leave the transport open so pending acks can still go out.
            return
        except (ConnectionError, OSError):
            pass
        except Exception:
            log.exception("unexpected error serving %s", conn.name or conn.peer)
            self._reject(conn, "unexpected", "internal error; see the daemon log")
        finally:
            self._tasks.discard(task)
            if conn.stream is not None:
                self._live.connected(conn.stream.id, -1)
                self._hooks.get(conn.stream.run, set()).discard(conn)
                if self._playbook is not None:
                    # On the writer thread: after any phase event this rank sent before it went.
                    playbook, gone = self._playbook, conn.stream
                    self._writer.call(lambda _: playbook.disconnected(gone))
            if conn.role in ("hook", "cli"):
                self._metrics.connections.labels(conn.role).dec()
            if not task.cancelled() and not task.cancelling():
                conn.close()
                self._connections.discard(conn)

    def _reject(self, conn: Connection, code: str, detail: str) -> None:
        self._metrics.rejected.labels(code).inc()
        log.warning("refused %s (pid %d, uid %d): %s: %s",
                    conn.name or "client", conn.peer.pid, conn.peer.uid, code, detail)
        conn.refuse(code, detail)

    async def _read_frame(self, conn: Connection, body_timeout: float) -> tuple[Kind, bytes] | None:
        """The next frame, or None on a clean end of stream between frames."""
        header = await self._read_header(conn)
        if header is None:
            return None
        kind, length = header
        return kind, await self._read_body(conn, length, body_timeout)

    async def _read_header(self, conn: Connection) -> tuple[Kind, int] | None:
        try:
            header = await conn.reader.readexactly(protocol.HEADER.size)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None
            raise ProtocolError("truncated", "connection closed inside a frame header") from None
        return protocol.parse_header(header, self._settings().max_frame_bytes)

    async def _read_body(self, conn: Connection, length: int, body_timeout: float) -> bytes:
        try:
            # asyncio.timeout arms a timer; wait_for would also create a Task for every frame.
            async with asyncio.timeout(body_timeout):
                payload = await conn.reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise ProtocolError(
                "truncated", f"connection closed after {len(exc.partial)} of {length} payload bytes"
            ) from None
        except TimeoutError:
            raise ProtocolError(
                "truncated", f"frame body of {length} bytes not received within {body_timeout:g}s"
            ) from None
        return payload

    async def _serve(self, conn: Connection) -> None:
        timeout = self._settings().handshake_timeout_seconds
        try:
            first = await asyncio.wait_for(self._read_frame(conn, timeout), timeout)
        except TimeoutError:
            raise ProtocolError("handshake_timeout", f"no HELLO within {timeout:g}s") from None
        if first is None:
            return
        kind, payload = first
        if kind != Kind.HELLO:
            raise ProtocolError("bad_handshake", f"first frame must be HELLO, got {kind.name}")
        hello = decode_hello(payload)
        conn.role = hello.role
        self._metrics.connections.labels(hello.role).inc()
        if hello.role == "cli":
            conn.name = f"cli pid {conn.peer.pid}"
            conn.send(protocol.json_frame(Kind.WELCOME, self._welcome()))
            await self._serve_cli(conn)
        else:
            await self._serve_hook(conn, hello)

    def _welcome(self, **extra: Any) -> dict[str, Any]:
        return {
            "protocol": protocol.PROTOCOL_VERSION,
            "daemon_version": __version__,
            "max_frame_bytes": self._settings().max_frame_bytes,
            **extra,
        }

    async def _serve_cli(self, conn: Connection) -> None:
        while (frame := await self._read_frame(conn, self._settings().handshake_timeout_seconds)):
            kind, payload = frame
            if kind != Kind.QUERY:
                raise ProtocolError("unexpected", f"a CLI connection may send QUERY, not {kind.name}")
            request = protocol.decode_json(payload)
            request["peer_uid"] = conn.peer.uid  # who asks, from SO_PEERCRED: never from the client
            try:
                # Off the event loop: a query may wait on the store (or the notifier's lock).
                reply = await asyncio.get_running_loop().run_in_executor(None, self._query, request)
            except Exception as exc:  # a bad query must not take the connection down
                log.exception("query %r failed", str(request.get("op"))[:64])
                reply = {"error": f"query failed: {exc}"}
                self._metrics.query_errors.labels("failed").inc()
            else:
                if "error" in reply:
                    self._metrics.query_errors.labels("refused").inc()
            conn.send(protocol.json_frame(Kind.REPLY, reply))
            await conn.writer.drain()

    async def _serve_hook(self, conn: Connection, hello: Hello) -> None:
        assert hello.run is not None
        run, rank, uid = hello.run, hello.rank, conn.peer.uid

        def register(store: Any) -> StreamInfo:
            owner = store.conn.execute("SELECT owner_uid FROM runs WHERE name = ?", (run,)).fetchone()
            if owner is not None and owner[0] != uid and uid != 0:
                raise ProtocolError(
                    "forbidden", f"run {run!r} belongs to uid {owner[0]}; connect as that user"
                )
            return store.register_stream(
                run, rank, hello.world_size, hello.host, hello.pid or conn.peer.pid, uid,
                hello.hook_version,
            )

        stream = await asyncio.wrap_future(self._writer.call(register))
        playbook = self._playbook
        conn.stream = stream
        conn.name = f"{run}/rank {rank}"
        conn.capabilities = hello.granted()
        self._live.add_stream(stream)
        self._live.connected(stream.id, +1)
        conn.send(protocol.json_frame(Kind.WELCOME, self._welcome(
            stream=stream.id, capabilities=sorted(conn.capabilities))))
        log.info("hook connected: run %s rank %d/%d pid %d uid %d host %s launch %s capabilities %s",
                 run, rank, hello.world_size, conn.peer.pid, uid, hello.host, hello.launch or "-",
                 ",".join(sorted(conn.capabilities)) or "none")
        if "commands" not in conn.capabilities:
            log.warning("run %s rank %d: hook %s offered no 'commands' capability (older than the control"
                        " channel): it is watched and alerted on, but sent no commands",
                        run, rank, hello.hook_version or "of unknown version")
        self._hooks.setdefault(run, set()).add(conn)
        if playbook is not None:
            writer, caps = self._writer, conn.capabilities

            def connected(_: Any) -> list[tuple[dict[str, Any], set[int]]]:
                pending, events = playbook.connected(stream, hello.checkpoint_dir, hello.data_dir,
                                                     hello.launch, caps)
                writer.record(events)  # a relaunch resolves the old launch's escalation
                return pending

            pending = await asyncio.wrap_future(writer.call(connected))
            self._send_commands(run, pending, conn)
        body_timeout = self._settings().handshake_timeout_seconds
        while True:
            # Reserve the frame's bytes in the in-flight budget before reading its body, so
            # many connections cannot hold many large bodies outside the budget.
            header = await self._read_header(conn)
            if header is None:
                break
            kind, size = header
            await self._reserve(conn, size)
            try:
                payload = await self._read_body(conn, size, body_timeout)
                if kind == Kind.EVENT and playbook is not None:
                    self._event(conn, stream, playbook, payload, size)
                    continue
                if kind != Kind.SAMPLES:
                    raise ProtocolError("unexpected",
                                        f"a hook connection may send SAMPLES or EVENT, not {kind.name}")
                samples = self._decoder.decode(payload)
            except BaseException:
                self._free(conn, size)
                raise
            self._outstanding += 1
            self._all_acked.clear()
            self._writer.submit(Write(stream, samples, self._on_committed(conn, samples.seq, size)))

    async def _reserve(self, conn: Connection, size: int) -> None:
        """Take ``size`` bytes of the connection's share, then of the daemon's budget: one client
        that floods (and never reads its ACKs) fills only its share, so the writer's queue never
        holds more than that of its frames ahead of another run's."""
        if conn.share is None:
            conn.share = InflightBudget(max(1, self._budget.limit // CONNECTION_SHARE))
        await conn.share.acquire(size)
        try:
            await self._budget.acquire(size)
        except BaseException:
            conn.share.release(size)
            raise

    def _free(self, conn: Connection, size: int) -> None:
        self._budget.release(size)
        if conn.share is not None:
            conn.share.release(size)

    def _event(self, conn: Connection, stream: StreamInfo, playbook: Playbook, payload: bytes,
               size: int) -> None:
        """Hand an EVENT to the playbook (in order with the samples before it); ack once stored."""
        seq, event = protocol.decode_event(payload)
        self._outstanding += 1
        self._all_acked.clear()
        writer = self._writer
        future = writer.call(lambda _: writer.record(playbook.hook_event(stream, seq, event)))
        done = self._on_committed(conn, seq, size)
        future.add_done_callback(lambda f: self._loop.call_soon_threadsafe(self._event_done, done, f))

    def _event_done(self, done: Done, future: Any) -> None:
        error = future.exception()
        if error is not None:
            log.error("storing a hook event failed: %s", error)
        done(error)
        for conn in self._acking:
            conn.flush_acks()
        self._acking.clear()

    def _on_committed(self, conn: Connection, seq: int, size: int) -> Done:
        def done(error: BaseException | None) -> None:
            self._free(conn, size)
            self._outstanding -= 1
            if not self._outstanding:
                self._all_acked.set()
            if error is None:
                if not conn.closed:
                    conn.acks.append(protocol.ack_frame(seq))
                    self._acking.add(conn)
            elif not conn.closed:
                self._metrics.rejected.labels("store_unavailable").inc()
                conn.refuse("store_unavailable", f"store commit failed ({error}); resend later")

        return done
