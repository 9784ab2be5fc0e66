"""The runwatch wire protocol, version 1: framing, handshake and sample blocks.

Every frame is a 5-byte header followed by a payload::

    u32 payload_length (little-endian) | u8 kind | payload[payload_length]

The first frame a client sends is HELLO (JSON). The daemon answers WELCOME (JSON) or
ERROR (JSON ``{"error": code, "detail": text}``) and closes. A hook then sends SAMPLES
frames and receives one ACK per frame once its points are committed to disk; a CLI
client sends QUERY (JSON) and receives REPLY (JSON).

The control channel rides on a hook's connection. The daemon sends COMMAND frames (JSON:
``{"origin", "id", "action", "args", ...}``) whenever it has a command the rank has not
acknowledged; the hook applies each once (by ``(origin, id)``) at a step boundary. The hook
sends EVENT frames (``u64 seq | JSON``: a checkpoint saved, a command applied, a heartbeat
while paused), ACKed by ``seq`` like SAMPLES once stored, and spooled like them while the
daemon is away.

Capabilities. COMMAND and EVENT came after the first hooks and daemons of version 1, so
both ends say what they speak instead of bumping the version (which would cut old hooks off
from monitoring altogether). A hook's HELLO lists ``capabilities`` (:data:`CAPABILITIES`:
``commands``, it applies COMMAND frames; ``events``, it sends EVENT frames); the WELCOME
answers with the ones this connection will use (the intersection; names either end does
not know are ignored). A hook that lists none (written before this negotiation) is never
sent a COMMAND frame: it would drop the connection on the unknown kind and reconnect to
the same frame forever. A daemon whose WELCOME lists none is never sent an EVENT frame for
the same reason. A HELLO may also carry ``launch``: an id that every rank of one launch of
the run shares and the next launch does not (see ``runwatch.hooks.watch``), so a relaunch
under the same run name is told apart from a reconnect.

A SAMPLES payload carries many steps and metrics at once, as dense blocks::

    u64 seq | u16 n_blocks | block*
    block := u32 n_steps | u16 n_metrics | u32 names_len | names (UTF-8, '\\n'-joined)
             | i64 steps[n_steps] | f64 times[n_steps] | f64 values[n_steps * n_metrics]

``values`` is row-major (one row per step); NaN and Inf are values, not gaps: a metric
absent at a step goes in another block. Steps are strictly increasing within a block.
``times`` are Unix seconds at the end of each step. Ingest is idempotent on
(run, rank, step): a step that was already stored is ignored when it is sent again.

Metric keys are ``base`` or ``base/sub``: ``base`` is snake_case (it becomes the
Prometheus name ``runwatch_train_<base>``) and ``sub`` is a free label value such as a
parameter group or layer name.

This module is shared by the daemon and the hook; it needs only numpy (the daemon validates
the HELLO with pydantic in :mod:`runwatch.daemon.handshake`).
"""

from __future__ import annotations

import json
import math
import operator
import re
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

PROTOCOL_VERSION = 1
#: Optional parts of version 1 that the two ends negotiate in HELLO / WELCOME.
CAPABILITIES = ("commands", "events")
#: Commands that change a run's training state: if one fails on any rank, every rank stays paused.
STATEFUL_ACTIONS = frozenset({"pause", "resume", "rewind", "skip_shard"})
HEADER = struct.Struct("<IB")
SAMPLES_HEAD = struct.Struct("<QH")
BLOCK_HEAD = struct.Struct("<IHI")
ACK = struct.Struct("<Q")

MAX_METRICS_PER_BLOCK = 4096
MAX_KEY_LENGTH = 200
METRIC_KEY = re.compile(r"[a-z_][a-z0-9_]{0,99}(/[^\x00-\x1f\x7f]{1,128})?")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,199}")


def shard_id(shard: str | int) -> int:
    """The number a data shard is known by in the daemon (``data_shard``): the shard itself
    when it is a number (``17``, ``"00017"``), else a stable 31-bit CRC of its name."""
    text = str(shard).strip()
    if text.isdigit() and len(text) <= 15:
        return int(text)
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


class Kind(IntEnum):
    HELLO = 1
    WELCOME = 2
    ERROR = 3
    SAMPLES = 4
    ACK = 5
    QUERY = 6
    REPLY = 7
    EVENT = 8
    COMMAND = 9


class ProtocolError(Exception):
    """A frame the daemon refuses. ``code`` is a short stable reason (a metric label)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Block:
    names: tuple[str, ...]
    steps: np.ndarray  # int64[n_steps]
    times: np.ndarray  # float64[n_steps]
    values: np.ndarray  # float64[n_steps, n_metrics]

    @property
    def n_points(self) -> int:
        return int(self.values.size)


@dataclass(frozen=True)
class Samples:
    seq: int
    blocks: list[Block]

    @property
    def n_points(self) -> int:
        return sum(b.n_points for b in self.blocks)


# -- encoding -------------------------------------------------------------------------


def frame(kind: Kind, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), kind) + payload


def json_frame(kind: Kind, obj: Any) -> bytes:
    return frame(kind, json.dumps(obj, separators=(",", ":")).encode())


def error_frame(code: str, detail: str) -> bytes:
    return json_frame(Kind.ERROR, {"error": code, "detail": detail})


def ack_frame(seq: int) -> bytes:
    return frame(Kind.ACK, ACK.pack(seq))


def event_frame(seq: int, obj: dict[str, Any]) -> bytes:
    return frame(Kind.EVENT, ACK.pack(seq) + json.dumps(obj, separators=(",", ":")).encode())


def decode_event(payload: bytes) -> tuple[int, dict[str, Any]]:
    if len(payload) < ACK.size:
        raise ProtocolError("malformed", "event frame shorter than its sequence number")
    return ACK.unpack_from(payload)[0], decode_json(payload[ACK.size:])


def encode_block(names: tuple[str, ...] | list[str], steps: Any, times: Any, values: Any) -> bytes:
    names_bytes = "\n".join(names).encode()
    steps_a = np.ascontiguousarray(steps, dtype="<i8")
    times_a = np.ascontiguousarray(times, dtype="<f8")
    values_a = np.ascontiguousarray(values, dtype="<f8")
    if values_a.shape != (len(steps_a), len(names)):
        raise ValueError(f"values shape {values_a.shape} != ({len(steps_a)}, {len(names)})")
    return b"".join(
        (
            BLOCK_HEAD.pack(len(steps_a), len(names), len(names_bytes)),
            names_bytes,
            steps_a.tobytes(),
            times_a.tobytes(),
            values_a.tobytes(),
        )
    )


def samples_frame(seq: int, encoded_blocks: list[bytes]) -> bytes:
    return frame(Kind.SAMPLES, SAMPLES_HEAD.pack(seq, len(encoded_blocks)) + b"".join(encoded_blocks))


# -- decoding -------------------------------------------------------------------------


def parse_header(header: bytes, max_payload: int) -> tuple[Kind, int]:
    length, kind = HEADER.unpack(header)
    try:
        kind_e = Kind(kind)
    except ValueError:
        raise ProtocolError("unknown_kind", f"frame kind {kind} is not part of protocol 1") from None
    if length > max_payload:
        raise ProtocolError(
            "oversized", f"frame of {length} bytes exceeds the limit of {max_payload} bytes"
        )
    return kind_e, length


def decode_json(payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError("malformed", f"payload is not JSON: {exc}") from None
    except RecursionError:  # "[[[[..." a few thousand deep: the stdlib parser recurses
        raise ProtocolError("malformed", "payload is JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise ProtocolError("malformed", "payload must be a JSON object")
    return obj


class SamplesDecoder:
    """Decodes SAMPLES payloads, caching validated metric-name sets by their raw bytes.

    Names are validated once per distinct set; after that a block costs a dict lookup and
    three ``np.frombuffer`` views (no copies) of the payload.
    """

    def __init__(self, cache_size: int = 4096) -> None:
        self._names: dict[bytes, tuple[str, ...]] = {}
        self._cache_size = cache_size

    def _names_for(self, raw: memoryview, n_metrics: int, where: str) -> tuple[str, ...]:
        # A read-only memoryview hashes and compares like the bytes it shows: no copy to look up.
        names = self._names.get(raw)  # type: ignore[call-overload]
        if names is None:
            raw = raw.tobytes()  # type: ignore[assignment]
            try:
                names = tuple(raw.decode().split("\n"))
            except UnicodeDecodeError:
                raise ProtocolError("malformed", f"{where}: metric names are not UTF-8") from None
            if len(names) != n_metrics:
                raise ProtocolError(
                    "malformed", f"{where}: {len(names)} metric names for {n_metrics} columns"
                )
            if len(set(names)) != len(names):
                raise ProtocolError("malformed", f"{where}: duplicate metric names")
            for name in names:
                if len(name) > MAX_KEY_LENGTH or not METRIC_KEY.fullmatch(name):
                    raise ProtocolError(
                        "malformed",
                        f"{where}: metric key {name[:80]!r} is not 'snake_case' or "
                        "'snake_case/label'",
                    )
            if len(self._names) >= self._cache_size:
                self._names.clear()
            self._names[raw] = names
        return names

    def decode(self, payload: bytes | memoryview) -> Samples:
        buf = memoryview(payload)
        if len(buf) < SAMPLES_HEAD.size:
            raise ProtocolError("malformed", "samples frame shorter than its header")
        seq, n_blocks = SAMPLES_HEAD.unpack_from(buf, 0)
        if n_blocks == 0:
            raise ProtocolError("malformed", "samples frame with no blocks")
        pos = SAMPLES_HEAD.size
        blocks: list[Block] = []
        for b in range(n_blocks):
            where = f"block {b}"
            if pos + BLOCK_HEAD.size > len(buf):
                raise ProtocolError("malformed", f"{where}: truncated block header")
            n_steps, n_metrics, names_len = BLOCK_HEAD.unpack_from(buf, pos)
            pos += BLOCK_HEAD.size
            if n_steps == 0 or n_metrics == 0 or n_metrics > MAX_METRICS_PER_BLOCK:
                raise ProtocolError(
                    "malformed", f"{where}: {n_steps} steps x {n_metrics} metrics is not allowed"
                )
            body = names_len + 8 * n_steps * (2 + n_metrics)
            if pos + body > len(buf):
                raise ProtocolError(
                    "malformed", f"{where}: needs {body} bytes, {len(buf) - pos} remain"
                )
            names = self._names_for(buf[pos : pos + names_len], n_metrics, where)
            pos += names_len
            steps = np.frombuffer(buf, dtype="<i8", count=n_steps, offset=pos)
            pos += 8 * n_steps
            times = np.frombuffer(buf, dtype="<f8", count=n_steps, offset=pos)
            pos += 8 * n_steps
            values = np.frombuffer(buf, dtype="<f8", count=n_steps * n_metrics, offset=pos)
            pos += 8 * n_steps * n_metrics
            # Plain Python beats numpy's per-call overhead on the ~10-element arrays of a frame.
            step_list = steps.tolist()
            if step_list[0] < 0 or not all(map(operator.lt, step_list, step_list[1:])):
                raise ProtocolError(
                    "malformed", f"{where}: steps must be non-negative and strictly increasing"
                )
            if not math.isfinite(math.fsum(times.tolist())):
                raise ProtocolError("malformed", f"{where}: step times must be finite")
            blocks.append(Block(names, steps, times, values.reshape(n_steps, n_metrics)))
        if pos != len(buf):
            raise ProtocolError("malformed", f"{len(buf) - pos} trailing bytes after the last block")
        return Samples(seq, blocks)
