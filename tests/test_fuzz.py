"""Fuzzing what crosses the socket (issue 11): the decoders and a live daemon.

The decoders take any bytes: each answer is a decoded value or a ``ProtocolError`` with a code,
never another exception (hypothesis: random bytes and mutations of valid frames). A live daemon
is then sent mutated frames over real connections while a well-behaved hook keeps streaming:
every bad connection is refused and counted, the daemon stays up, and the good hook's steps
are all stored.
"""

from __future__ import annotations

import json
import random
import socket
import time

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runwatch.daemon import protocol
from runwatch.daemon.handshake import decode_hello
from runwatch.daemon.protocol import Kind, ProtocolError, SamplesDecoder
from tests.conftest import DaemonProcess, RawClient, wait_for


def _valid_samples() -> bytes:
    names = ("loss", "grad_norm", "hist/x/0", "hist/x/1", "hist/x/2")
    block = protocol.encode_block(names, [3, 4], [time.time(), time.time()], np.ones((2, len(names))))
    return protocol.samples_frame(7, [block])[protocol.HEADER.size:]


VALID = {
    "samples": _valid_samples(),
    "event": protocol.event_frame(9, {"type": "checkpoint", "step": 3, "path": "/x"})[protocol.HEADER.size:],
    "hello": json.dumps({"protocol": 1, "role": "hook", "run": "r", "rank": 0, "world_size": 1, "host": "h",
                         "pid": 1, "hook_version": "t"}).encode(),
}


def _mutate(data: bytes, rnd: random.Random, edits: int) -> bytes:
    b = bytearray(data)
    for _ in range(edits):
        op = rnd.randrange(4)
        i = rnd.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(i, len(b) - 1)] = rnd.randrange(256)
        elif op == 1:
            b[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 9)))
        elif op == 2 and b:
            del b[i:i + rnd.randrange(1, 9)]
        else:
            b = b[:i]
    return bytes(b)


def _decode_all(payload: bytes) -> None:
    """Every decoder on ``payload``: a result or a ProtocolError with a code; nothing else."""
    for decode in (SamplesDecoder().decode, protocol.decode_event, protocol.decode_json, decode_hello):
        try:
            decode(payload)
        except ProtocolError as exc:
            assert exc.code and exc.detail is not None, exc
    if len(payload) >= protocol.HEADER.size:
        try:
            protocol.parse_header(payload[:protocol.HEADER.size], 1 << 20)
        except ProtocolError as exc:
            assert exc.code


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_decoders_answer_random_bytes_with_a_result_or_a_coded_refusal(payload: bytes) -> None:
    _decode_all(payload)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(sorted(VALID)), st.integers(0, 2**32), st.integers(1, 6))
def test_decoders_answer_mutated_frames_with_a_result_or_a_coded_refusal(which: str, seed: int,
                                                                         edits: int) -> None:
    _decode_all(_mutate(VALID[which], random.Random(seed), edits))


def test_a_live_daemon_refuses_mutated_frames_and_keeps_serving_a_good_hook(daemon: DaemonProcess) -> None:
    good = RawClient(daemon.socket)
    good.hello(run="steady")
    rnd = random.Random(11)
    frames = [protocol.frame(Kind.HELLO, VALID["hello"]), protocol.frame(Kind.SAMPLES, VALID["samples"]),
              protocol.frame(Kind.EVENT, VALID["event"])]
    hung = 0
    for i in range(150):
        step = protocol.encode_block(("loss",), [i], [time.time()], [[1.0]])
        good.send(protocol.samples_frame(i + 1, [step]))
        bad = RawClient(daemon.socket, timeout=5)
        try:
            hello = frames[0] if rnd.random() < 0.5 else _mutate(frames[0], rnd, rnd.randrange(1, 4))
            bad.send(hello + _mutate(rnd.choice(frames[1:]), rnd, rnd.randrange(1, 6)))
            bad.sock.shutdown(socket.SHUT_WR)  # nothing more: a truncated frame must not wait forever
            while bad.sock.recv(1 << 16):  # answers (welcome, acks, an error), then the daemon closes
                pass
        except TimeoutError:
            hung += 1
        except OSError:
            pass  # reset by the daemon: refused
        finally:
            bad.close()
    # The good hook: every step acknowledged and stored, none lost among the bad connections.
    acked = set()
    deadline = time.monotonic() + 30
    while len(acked) < 150 and time.monotonic() < deadline:
        kind, payload = good.read()
        if kind == Kind.ACK:
            acked.add(protocol.ACK.unpack(payload)[0])
    assert acked == set(range(1, 151))
    status = wait_for(lambda: daemon.status(), what="the daemon still answering")
    rejected = sum(status["ingest"]["rejected_frames_total"].values())
    print(f"\n150 mutated connections: {rejected} frames rejected and counted, {hung} left hanging")
    # Some mutations only change values and are valid frames; the rest are refused and counted.
    assert rejected >= 50 and hung == 0


# -- the control API (CLI queries) --------------------------------------------------------------

OPS = ["status", "runs", "alerts", "rules", "silence_add", "silences", "silence_expire", "notifications",
       "control", "incidents", "incident", "command", "checkpoints", "pin", "unpin", "retention_plan",
       "drift", "drift_freeze"]
#: Every argument some op reads (peer_uid too: the daemon must overwrite it, never trust it).
ARGS = ["run", "limit", "all", "id", "matchers", "seconds", "comment", "action", "params", "step",
        "monitor", "rank", "steps", "from_run", "from_rank", "peer_uid"]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-(2**80), 2**80) | st.floats()
    | st.text(max_size=24) | st.sampled_from(["", "~(", "0:10", "10:0", "a:b", "*", "ddp", "../.."]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)
REQUESTS = st.fixed_dictionaries({"op": st.sampled_from(OPS) | JSON}, optional={a: JSON for a in ARGS})


class QueryConn:
    """A CLI connection speaking raw QUERY frames; reconnects after the daemon closes it."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon
        self.raw: RawClient | None = None

    def ask(self, payload: bytes) -> tuple[Kind, dict]:
        if self.raw is None:
            self.raw = RawClient(self.daemon.socket, timeout=20)  # a hang fails the test
            self.raw.send(protocol.json_frame(Kind.HELLO, {"protocol": 1, "role": "cli", "pid": 1,
                                                           "hook_version": "fuzz"}))
            assert self.raw.read()[0] == Kind.WELCOME
        self.raw.send(protocol.frame(Kind.QUERY, payload))
        kind, body = self.raw.read()
        if kind == Kind.ERROR:  # refused frame: the daemon closes this connection
            self.raw.close()
            self.raw = None
        reply = json.loads(body)
        assert isinstance(reply, dict)
        return kind, reply


def test_the_control_api_answers_any_request_with_a_reply_or_a_clear_error(daemon: DaemonProcess) -> None:
    conn = QueryConn(daemon)
    seen = {"replies": 0, "refused": 0, "malformed": 0}

    def check(payload: bytes) -> None:
        kind, reply = conn.ask(payload)
        if kind == Kind.ERROR:
            assert reply["error"] == "malformed" and reply["detail"], reply
            seen["malformed"] += 1
            return
        assert kind == Kind.REPLY
        seen["replies"] += 1
        if "error" in reply:
            # A clear refusal: not an internal failure of a handler (those say "query failed").
            assert isinstance(reply["error"], str) and not reply["error"].startswith("query failed"), reply
            seen["refused"] += 1

    @settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
    @given(REQUESTS)
    def requests(request: dict) -> None:
        check(json.dumps(request).encode())

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(JSON.filter(lambda x: not isinstance(x, dict)) | st.binary(max_size=64))
    def not_objects(payload: object) -> None:
        check(payload if isinstance(payload, bytes) else json.dumps(payload).encode())

    requests()
    not_objects()
    # Huge fields, just under the 8 MB frame limit, and JSON nested past the parser's recursion.
    for big in ({"op": "x" * (7 << 20)}, {"op": "runs", "run": "r" * (7 << 20)},
                {"op": "alerts", "run": "r" * (7 << 20)},
                {"op": "silence_add", "matchers": {"run": "~" + "a" * 100000}, "seconds": 60,
                 "comment": "c" * (1 << 20)}):
        check(json.dumps(big).encode())
    check(b"[" * 100_000)
    check(b'{"op": "status", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")

    # The daemon is up and still serving, nothing failed inside it, and every refusal is counted.
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert daemon.query("status")["daemon"]["pid"] == daemon.proc.pid
    metrics = daemon.metrics_text()
    assert f'runwatch_query_errors_total{{kind="refused"}} {float(seen["refused"])}' in metrics
    assert 'runwatch_query_errors_total{kind="failed"} 0.0' in metrics
    assert daemon.status()["ingest"]["rejected_frames_total"].get("malformed", 0) == seen["malformed"]
    assert "Traceback" not in daemon.log()
    print(f"\ncontrol API: {sum(seen.values()) - seen['refused']} requests, {seen['refused']} refused with"
          f" a reason, {seen['malformed']} not a JSON object (connection refused), 0 internal failures")
