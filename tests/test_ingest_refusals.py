"""Bad input against a live daemon: each refused with its reason, everyone else still served."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from runwatch.daemon import protocol
from runwatch.daemon.protocol import Kind
from tests.conftest import DaemonProcess, RawClient


def _good_frame(seq: int, step: int) -> bytes:
    return protocol.samples_frame(seq, [protocol.encode_block(("loss",), [step], [time.time()], [[1.0]])])


def test_each_bad_frame_is_refused_and_counted(daemon: DaemonProcess) -> None:
    # A well-behaved hook is connected the whole time.
    good = RawClient(daemon.socket)
    good.hello(run="good-run")

    cases: list[tuple[str, bytes, bool]] = [
        # (expected code, bytes to send, send HELLO first?)
        ("bad_version", protocol.json_frame(Kind.HELLO, {"protocol": 99, "role": "hook", "run": "x"}), False),
        ("malformed", protocol.frame(Kind.HELLO, b"{not json"), False),
        ("bad_handshake", _good_frame(1, 1), False),  # SAMPLES before HELLO
        ("oversized", protocol.HEADER.pack(1 << 30, Kind.SAMPLES), True),
        ("unknown_kind", protocol.HEADER.pack(4, 200) + b"abcd", True),
        ("malformed", protocol.frame(Kind.SAMPLES, b"\x01" * 37), True),
        ("unexpected", protocol.json_frame(Kind.QUERY, {"op": "status"}), True),
    ]
    for code, data, after_hello in cases:
        c = RawClient(daemon.socket)
        if after_hello:
            c.hello(run="bad-run")
        c.send(data)
        reply = c.expect_error()
        assert reply["error"] == code, (code, reply)
        assert reply["detail"], "every refusal says why"
        c.close()
        # The good client is still served between every bad one.
        good.send(_good_frame(len(cases), 10 + cases.index((code, data, after_hello))))
        kind, _ = good.read()
        assert kind == Kind.ACK

    # Truncated: a header promising 100 bytes, 10 sent, then the client goes away.
    c = RawClient(daemon.socket)
    c.hello(run="bad-run")
    c.send(protocol.HEADER.pack(100, Kind.SAMPLES) + b"x" * 10)
    c.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        rejected = daemon.status()["ingest"]["rejected_frames_total"]
        if rejected.get("truncated"):
            break
        time.sleep(0.05)
    assert rejected == {"bad_version": 1, "bad_handshake": 1, "oversized": 1, "unknown_kind": 1,
                        "malformed": 2, "unexpected": 1, "truncated": 1}
    metrics = daemon.metrics_text()
    assert 'runwatch_ingest_rejected_frames_total{reason="oversized"} 1.0' in metrics
    good.close()


def test_a_silent_client_is_dropped_after_the_handshake_timeout(rootdir) -> None:
    d = DaemonProcess(rootdir, ["--config", str(_config(rootdir, "handshake_timeout_seconds = 0.5"))])
    d.start()
    try:
        silent = RawClient(d.socket)
        good = RawClient(d.socket)
        good.hello()
        reply = silent.expect_error()
        assert reply["error"] == "handshake_timeout"
        good.send(_good_frame(1, 1))
        assert good.read()[0] == Kind.ACK
    finally:
        d.terminate()


def test_a_client_stuck_inside_a_frame_is_dropped(rootdir) -> None:
    d = DaemonProcess(rootdir, ["--config", str(_config(rootdir, "handshake_timeout_seconds = 0.5"))])
    d.start()
    try:
        c = RawClient(d.socket)
        c.hello()
        c.send(protocol.HEADER.pack(64, Kind.SAMPLES) + b"x" * 8)  # and then nothing
        assert c.expect_error()["error"] == "truncated"
    finally:
        d.terminate()


def test_idempotent_on_run_rank_step(daemon: DaemonProcess) -> None:
    from runwatch.daemon.store import Store, count_points, series

    c = RawClient(daemon.socket)
    c.hello(run="replay", rank=0)
    values = np.array([[1.0, 2.0], [3.0, 4.0]])
    block = protocol.encode_block(("loss", "grad_norm"), [5, 6], [1.0, 2.0], values)
    for seq in (1, 2, 3):  # the same steps, three times, as a replay would send them
        c.send(protocol.samples_frame(seq, [block]))
        assert c.read() == (Kind.ACK, protocol.ACK.pack(seq))
    c.close()
    conn = Store.reader(daemon.store_path)
    assert count_points(conn) == 4
    steps, loss = series(conn, "replay", 0, "loss")
    assert steps.tolist() == [5, 6] and loss.tolist() == [1.0, 3.0]


def test_cli_query_errors_do_not_close_the_connection(daemon: DaemonProcess) -> None:
    from runwatch.daemon.client import Client

    with Client(daemon.socket) as c:
        assert "unknown query op" in c.query("frobnicate")["error"]
        assert c.query("status")["daemon"]["socket"] == str(daemon.socket)


def _config(root, text: str):
    path = root / "runwatch.toml"
    path.write_text(text + "\n")
    return path


@pytest.mark.parametrize("n", [3])
def test_many_bad_clients_in_a_row_do_not_stop_the_daemon(daemon: DaemonProcess, n: int) -> None:
    for _ in range(n * 10):
        c = RawClient(daemon.socket)
        c.send(b"\xff" * 5)
        c.expect_error()
        c.close()
    rejected = json.loads(json.dumps(daemon.status()))["ingest"]["rejected_frames_total"]
    assert rejected["unknown_kind"] == n * 10


def test_absurd_handshake_numbers_are_refused_and_runs_stay_apart(daemon: DaemonProcess) -> None:
    c = RawClient(daemon.socket)
    c.send(protocol.json_frame(Kind.HELLO, {"protocol": 1, "role": "hook", "run": "alice",
                                            "pid": 2**70}))
    assert c.expect_error()["error"] == "bad_handshake"
    a, b = RawClient(daemon.socket), RawClient(daemon.socket)
    assert a.hello(run="alice")["stream"] != b.hello(run="bob")["stream"]
