"""The sender thread: gets host-side batches to the daemon without ever blocking training.

Contract with the training thread: :meth:`Sender.put` never blocks and never raises. It
appends to a bounded queue; if that queue is full (the sender thread itself is stuck),
the batch is dropped and counted in :attr:`Sender.dropped_points`, which the watch
reports with later steps.

Delivery: each batch becomes SAMPLES frames with a unique sequence number. A frame stays
in memory until the daemon ACKs it (sent after its commit). When the daemon is away, or
unacknowledged frames exceed ``memory_bytes``, the oldest frames move to an append-only
spool file (bounded by ``spool_max_bytes``; past that, new frames are dropped and
counted). On reconnect the spool is replayed first. The daemon ignores steps it already
has, so a frame sent twice is harmless; a frame is forgotten only after its ACK.

A spool left behind by a crashed process is replayed by the next watch of the same run
and rank.

Control: :meth:`Sender.put_event` queues a JSON event (delivered like samples: acked,
spooled, replayed); COMMAND frames from the daemon are handed to ``on_command`` on this
thread, which must only queue them (the training thread applies them at a step boundary).

Version skew: the HELLO offers the capabilities the hook speaks; EVENT frames go only to a
daemon whose WELCOME granted ``events`` (others are dropped, counted in
:attr:`Sender.dropped_events` and logged once: a daemon older than the control channel would
close the connection on them and the replay would loop), until the daemon sends a COMMAND,
which only a daemon with the control channel does. A daemon older than the negotiation
refuses the HELLO's new fields; the sender then connects with the plain HELLO (monitoring on,
control on once it sends a command) instead of giving up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runwatch.daemon import protocol
from runwatch.daemon.protocol import Kind

log = logging.getLogger("runwatch.hooks")

#: Refusals that no retry can fix; the sender stops trying and says so once.
FATAL_HANDSHAKE = {"bad_version", "bad_handshake", "forbidden"}
#: HELLO fields added with capability negotiation; a daemon from before it refuses them by name.
HELLO_EXTENSIONS = ("capabilities", "launch")


@dataclass
class Batch:
    """Host copies of a window of steps. ``present`` is None when every value is present."""

    names: tuple[str, ...]
    steps: np.ndarray
    times: np.ndarray
    values: np.ndarray
    present: np.ndarray | None = None

    @property
    def n_points(self) -> int:
        return int(self.values.size if self.present is None else self.present.sum())


def encode_blocks(batch: Batch) -> list[bytes]:
    """Split a batch into dense blocks: consecutive steps with the same metrics present."""
    if batch.present is None:
        return [protocol.encode_block(batch.names, batch.steps, batch.times, batch.values)]
    blocks = []
    start = 0
    n = len(batch.steps)
    while start < n:
        mask = batch.present[start]
        end = start + 1
        while end < n and np.array_equal(batch.present[end], mask):
            end += 1
        cols = np.flatnonzero(mask)
        if len(cols):
            blocks.append(protocol.encode_block(
                tuple(batch.names[c] for c in cols),
                batch.steps[start:end],
                batch.times[start:end],
                batch.values[start:end][:, cols],
            ))
        start = end
    return blocks


class Spool:
    """An append-only file of whole frames, with a second file being replayed."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.replay_path = path.with_suffix(".replay")
        self.max_bytes = max_bytes

    def size(self) -> int:
        total = 0
        for p in (self.path, self.replay_path):
            with contextlib.suppress(OSError):
                total += p.stat().st_size
        return total

    def append(self, frames: list[bytes]) -> list[bytes]:
        """Write frames; returns those that did not fit (the caller counts them as dropped)."""
        room = self.max_bytes - self.size()
        kept, dropped = [], []
        for f in frames:
            if len(f) <= room:
                kept.append(f)
                room -= len(f)
            else:
                dropped.append(f)
        if kept:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as fh:
                fh.write(b"".join(kept))
                fh.flush()
        return dropped

    def start_replay(self) -> bool:
        """Move the spool into the replay file (appending to one left unfinished).

        Call only when no frames of the replay file are in flight: the file is deleted once
        everything read from it has been acknowledged.
        """
        if self.path.exists() and self.path.stat().st_size:
            if self.replay_path.exists():
                data = self.replay_path.read_bytes()
                complete = data[: _complete_length(data)]  # drop a torn tail before appending
                self.replay_path.write_bytes(complete + self.path.read_bytes())
                self.path.unlink()
            else:
                os.replace(self.path, self.replay_path)
        return self.replay_path.exists()

    def replay_frames(self) -> list[bytes]:
        data = self.replay_path.read_bytes()
        frames, pos, end = [], 0, _complete_length(data)
        while pos < end:
            length, _kind = protocol.HEADER.unpack_from(data, pos)
            frames.append(data[pos : pos + protocol.HEADER.size + length])
            pos += protocol.HEADER.size + length
        return frames

    def finish_replay(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.replay_path.unlink()


def _complete_length(data: bytes) -> int:
    """Bytes of ``data`` made of whole frames (a crashed writer can leave a torn last one)."""
    pos = 0
    while pos + protocol.HEADER.size <= len(data):
        length, _kind = protocol.HEADER.unpack_from(data, pos)
        if pos + protocol.HEADER.size + length > len(data):
            break
        pos += protocol.HEADER.size + length
    return pos


def frame_seq(frame: bytes) -> int:
    return protocol.SAMPLES_HEAD.unpack_from(frame, protocol.HEADER.size)[0]


class Sender:
    def __init__(
        self,
        socket_path: Path,
        hello: dict[str, Any],
        spool_path: Path,
        *,
        spool_max_bytes: int = 64 << 20,
        memory_bytes: int = 16 << 20,
        queue_batches: int = 1024,
        max_frame_bytes: int = 4 << 20,
        io_timeout: float = 5.0,
    ) -> None:
        self.socket_path = socket_path
        self.hello = hello
        self.spool = Spool(spool_path, spool_max_bytes)
        self.memory_bytes = memory_bytes
        self.max_frame_bytes = max_frame_bytes
        self.io_timeout = io_timeout
        self.dropped_points = 0
        self.connected = False
        self.refused: str | None = None
        self.on_command: Callable[[dict[str, Any]], None] | None = None
        self.early_commands: list[dict[str, Any]] = []
        #: What the daemon granted in its WELCOME (empty until connected, and from an old daemon).
        self.daemon_capabilities: frozenset[str] = frozenset()
        self.dropped_events = 0
        self._queue: queue.Queue[Batch | dict[str, Any]] = queue.Queue(maxsize=queue_batches)
        # seq -> frame, oldest first; a unique base so seqs never collide with a spool's.
        self._pending: OrderedDict[int, bytes] = OrderedDict()
        self._pending_bytes = 0
        self._unsent: list[int] = []
        self._replaying: set[int] = set()
        self._seq = time.time_ns()
        self._sock: socket.socket | None = None
        self._rx = bytearray()
        self._next_connect = 0.0
        self._backoff = 0.1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="runwatch-sender", daemon=True)
        self._thread.start()

    # -- training thread ---------------------------------------------------------------

    def put(self, batch: Batch) -> None:
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            self.dropped_points += batch.n_points

    def put_event(self, event: dict[str, Any]) -> None:
        """Queue a control event (never blocks; dropped and logged if the queue is full)."""
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            log.warning("runwatch: event %s dropped: the sender is stuck", event.get("type"))

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued has been acknowledged (True) or the timeout passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.refused is None:
            if self._queue.empty() and not self._pending and not self._replaying and \
                    not self.spool.size() and self._thread.is_alive():
                return True
            if not self._thread.is_alive():
                return False
            time.sleep(0.01)
        return False

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what can be delivered within ``timeout``; spool the rest."""
        self.flush(timeout)
        self._stop.set()
        self._thread.join(timeout=self.io_timeout + 5)

    # -- sender thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            try:
                self._take_batches(wait=0.0 if stopping else 0.05)
                if self._sock is None and not stopping and self.refused is None:
                    self._maybe_connect()
                if self._sock is not None:
                    self._pump()
                self._spill()
                self._maybe_replay_while_connected()
            except Exception:  # the thread must survive anything; training must not notice
                log.exception("runwatch sender: unexpected error; reconnecting")
                self._disconnect()
            if stopping:
                self._disconnect()
                self._spill(everything=True)
                return

    def _take_batches(self, wait: float) -> None:
        try:
            batch = self._queue.get(timeout=wait) if wait else self._queue.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(batch, dict):
                if self.refused is None:
                    self._seq += 1
                    self._add_pending(protocol.event_frame(self._seq, batch))
            elif self.refused is not None:
                self.dropped_points += batch.n_points
            else:
                for frame in self._frames(batch):
                    self._add_pending(frame)
            try:
                batch = self._queue.get_nowait()
            except queue.Empty:
                return

    def _frames(self, batch: Batch) -> list[bytes]:
        frames, current, size = [], [], 0
        for block in encode_blocks(batch):
            if current and size + len(block) > self.max_frame_bytes - 64:
                frames.append(self._samples(current))
                current, size = [], 0
            current.append(block)
            size += len(block)
        if current:
            frames.append(self._samples(current))
        return frames

    def _samples(self, blocks: list[bytes]) -> bytes:
        self._seq += 1
        return protocol.samples_frame(self._seq, blocks)

    def _add_pending(self, frame: bytes) -> None:
        seq = frame_seq(frame)
        self._pending[seq] = frame
        self._pending_bytes += len(frame)
        self._unsent.append(seq)

    def _maybe_connect(self) -> None:
        now = time.monotonic()
        if now < self._next_connect:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.io_timeout)
        try:
            sock.connect(str(self.socket_path))
            sock.sendall(protocol.json_frame(Kind.HELLO, self.hello))
            kind, payload = self._read_frame_blocking(sock)
        except OSError:
            sock.close()
            self._next_connect = now + self._backoff
            self._backoff = min(self._backoff * 2, 5.0)
            return
        if kind != Kind.WELCOME:
            sock.close()
            reply = protocol.decode_json(payload) if kind == Kind.ERROR else {}
            code = reply.get("error", "unexpected")
            detail = str(reply.get("detail", ""))
            extra = [k for k in HELLO_EXTENSIONS if k in self.hello and detail.startswith(f"{k}:")]
            if code == "bad_handshake" and extra:
                # A daemon from before capability negotiation: watched without control is far
                # better than not watched; retry at once with the HELLO it knows.
                log.warning("runwatch: the daemon at %s predates the control channel (%s); monitoring"
                            " without pause/rewind", self.socket_path, detail)
                self.hello = {k: v for k, v in self.hello.items() if k not in HELLO_EXTENSIONS}
                self._next_connect = 0.0
                return
            if code in FATAL_HANDSHAKE:
                self.refused = f"{code}: {reply.get('detail')}"
                log.error("runwatch: the daemon refused this run (%s); monitoring is off",
                          self.refused)
            self._next_connect = now + self._backoff
            self._backoff = min(self._backoff * 2, 5.0)
            return
        welcome = protocol.decode_json(payload)
        self.max_frame_bytes = min(self.max_frame_bytes, int(welcome.get("max_frame_bytes", 1 << 20)))
        granted = welcome.get("capabilities")
        self.daemon_capabilities = frozenset(granted) if isinstance(granted, list) else frozenset()
        self._sock = sock
        self._rx.clear()
        self.connected = True
        self._backoff = 0.1
        if not self._replaying:
            self._load_replay()
        # Everything not yet acked goes again on the new connection, the spool first.
        self._unsent = [s for s in self._pending if s in self._replaying] + [
            s for s in self._pending if s not in self._replaying
        ]

    def _load_replay(self) -> list[int]:
        """Read spooled frames into memory to be sent; returns their seqs, oldest first."""
        loaded: list[int] = []
        if not self.spool.start_replay():
            return loaded
        for frame in self.spool.replay_frames():
            seq = frame_seq(frame)
            if seq not in self._pending:
                self._replaying.add(seq)
                self._pending[seq] = frame
                self._pending_bytes += len(frame)
                loaded.append(seq)
        if not self._replaying:
            self.spool.finish_replay()
        return loaded

    def _maybe_replay_while_connected(self) -> None:
        """Frames spilled while connected (a slow daemon) go back out once it catches up."""
        if self._sock is None or self._replaying or self._pending_bytes > self.memory_bytes // 2:
            return
        if self.spool.path.exists() or self.spool.replay_path.exists():
            loaded = self._load_replay()
            self._unsent = loaded + [s for s in self._unsent if s not in self._replaying]

    @staticmethod
    def _read_frame_blocking(sock: socket.socket) -> tuple[Kind, bytes]:
        def exactly(n: int) -> bytes:
            buf = b""
            while len(buf) < n:
                chunk = sock.recv(n - len(buf))
                if not chunk:
                    raise ConnectionError("daemon closed the connection")
                buf += chunk
            return buf

        kind, length = protocol.parse_header(exactly(protocol.HEADER.size), 1 << 20)
        return kind, exactly(length)

    def _pump(self) -> None:
        sock = self._sock
        assert sock is not None
        try:
            while self._unsent and self._in_flight_ok():
                seq = self._unsent.pop(0)
                frame = self._pending.get(seq)
                if frame is None:
                    continue
                if frame[protocol.HEADER.size - 1] == Kind.EVENT and "events" not in self.daemon_capabilities:
                    self._drop_event(seq)
                    continue
                sock.sendall(frame)
            self._read_acks(sock)
        except (OSError, ConnectionError, protocol.ProtocolError) as exc:
            log.debug("runwatch sender: connection lost: %s", exc)
            self._disconnect()

    def _in_flight_ok(self) -> bool:
        # At most 64 frames sent and not yet acknowledged; the rest waits (and may spill).
        sent = len(self._pending) - len(self._unsent)
        return sent < 64

    def _read_acks(self, sock: socket.socket) -> None:
        while True:
            ready, _, _ = select.select([sock], [], [], 0.0 if self._unsent else 0.02)
            if not ready:
                return
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("daemon closed the connection")
            self._rx += chunk
            while len(self._rx) >= protocol.HEADER.size:
                kind, length = protocol.parse_header(bytes(self._rx[:protocol.HEADER.size]), 1 << 20)
                end = protocol.HEADER.size + length
                if len(self._rx) < end:
                    break
                payload = bytes(self._rx[protocol.HEADER.size:end])
                del self._rx[:end]
                if kind == Kind.ACK:
                    self._acked(protocol.ACK.unpack(payload)[0])
                elif kind == Kind.COMMAND:
                    if "events" not in self.daemon_capabilities:
                        # A daemon that sends commands takes their answers: it has the control channel
                        # and only predates the negotiation. Without answers it would push the same
                        # command forever and take the paused run for a stalled one.
                        self.daemon_capabilities = self.daemon_capabilities | {"commands", "events"}
                    command = protocol.decode_json(payload)
                    if self.on_command is not None:
                        self.on_command(command)
                    else:  # pushed on connect, before the watch attached its handler
                        self.early_commands.append(command)
                elif kind == Kind.ERROR:
                    reply = protocol.decode_json(payload)
                    log.warning("runwatch: daemon closed the connection: %s: %s",
                                reply.get("error"), reply.get("detail"))
                    raise ConnectionError(reply.get("error", "error"))

    def _drop_event(self, seq: int) -> None:
        """Forget an EVENT frame this daemon does not take (as if acknowledged), counted."""
        if not self.dropped_events:
            log.warning("runwatch: the daemon at %s takes no control events (it predates the control "
                        "channel); checkpoint registrations and command answers are not sent to it",
                        self.socket_path)
        self.dropped_events += 1
        self._acked(seq)

    def _acked(self, seq: int) -> None:
        frame = self._pending.pop(seq, None)
        if frame is None:
            return
        self._pending_bytes -= len(frame)
        if seq in self._replaying:
            self._replaying.discard(seq)
            if not self._replaying:
                self.spool.finish_replay()

    def _disconnect(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None
        self.connected = False
        self._unsent = list(self._pending)

    def _spill(self, everything: bool = False) -> None:
        """Move the oldest unacknowledged frames to the spool file while over budget."""
        limit = 0 if everything else self.memory_bytes
        if self._pending_bytes <= limit:
            return
        if not everything and self._sock is not None:
            # Connected but the daemon is behind: spill only frames not yet sent.
            candidates = [s for s in self._unsent if s not in self._replaying]
        else:
            candidates = [s for s in self._pending if s not in self._replaying]
        moving: list[bytes] = []
        for seq in candidates:
            if self._pending_bytes <= limit:
                break
            frame = self._pending.pop(seq)
            self._pending_bytes -= len(frame)
            moving.append(frame)
        if everything:
            # Frames of an unfinished replay are still in the replay file: nothing to do.
            for seq in list(self._replaying):
                frame = self._pending.pop(seq, None)
                if frame is not None:
                    self._pending_bytes -= len(frame)
            self._replaying.clear()
        moved = {frame_seq(f) for f in moving}
        self._unsent = [s for s in self._unsent if s not in moved]
        try:
            dropped = self.spool.append(moving)
        except OSError as exc:
            log.warning("runwatch: cannot write spool %s: %s", self.spool.path, exc)
            dropped = moving
        for frame in dropped:
            self.dropped_points += _frame_points(frame)


def _frame_points(frame: bytes) -> int:
    if frame[protocol.HEADER.size - 1] != Kind.SAMPLES:
        return 0
    try:
        return protocol.SamplesDecoder().decode(frame[protocol.HEADER.size:]).n_points
    except protocol.ProtocolError:
        return 0
