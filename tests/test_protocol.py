"""The wire format: what a hook encodes is what the daemon decodes, and bad frames are named."""

from __future__ import annotations

import numpy as np
import pytest

from runwatch.daemon import protocol
from runwatch.daemon.handshake import decode_hello
from runwatch.daemon.protocol import Kind, ProtocolError, SamplesDecoder


def _payload(frame: bytes) -> bytes:
    return frame[protocol.HEADER.size:]


def test_samples_round_trip_keeps_nan_and_inf() -> None:
    names = ("loss", "grad_norm", "learning_rate/0")
    values = np.array([[1.5, np.nan, 1e-3], [np.inf, 2.0, -np.inf]])
    block = protocol.encode_block(names, [7, 9], [100.0, 101.5], values)
    frame = protocol.samples_frame(42, [block, block.replace(b"", b"")])
    kind, length = protocol.parse_header(frame[:5], 1 << 20)
    assert kind == Kind.SAMPLES and length == len(frame) - 5
    decoded = SamplesDecoder().decode(_payload(frame))
    assert decoded.seq == 42 and len(decoded.blocks) == 2 and decoded.n_points == 12
    b = decoded.blocks[0]
    assert b.names == names
    assert b.steps.tolist() == [7, 9] and b.times.tolist() == [100.0, 101.5]
    np.testing.assert_array_equal(b.values, values)


@pytest.mark.parametrize(
    ("names", "steps", "why"),
    [
        (("Loss",), [1], "snake_case"),
        (("a b",), [1], "snake_case"),
        (("x", "x"), [1], "duplicate"),
        (("ok",), [3, 3], "strictly increasing"),
        (("ok",), [-1], "non-negative"),
    ],
)
def test_bad_blocks_are_refused_with_the_reason(names, steps, why) -> None:
    block = protocol.encode_block(names, steps, [1.0] * len(steps), np.zeros((len(steps), len(names))))
    with pytest.raises(ProtocolError) as err:
        SamplesDecoder().decode(_payload(protocol.samples_frame(1, [block])))
    assert err.value.code == "malformed" and why in err.value.detail


def test_truncated_and_trailing_bytes_are_refused() -> None:
    block = protocol.encode_block(("a",), [1], [1.0], [[1.0]])
    payload = _payload(protocol.samples_frame(1, [block]))
    with pytest.raises(ProtocolError, match="remain"):
        SamplesDecoder().decode(payload[:-3])
    with pytest.raises(ProtocolError, match="trailing"):
        SamplesDecoder().decode(payload + b"xx")
    with pytest.raises(ProtocolError, match="no blocks"):
        SamplesDecoder().decode(protocol.SAMPLES_HEAD.pack(1, 0))


def test_non_finite_step_time_is_refused() -> None:
    block = protocol.encode_block(("a",), [1], [float("nan")], [[1.0]])
    with pytest.raises(ProtocolError, match="finite"):
        SamplesDecoder().decode(_payload(protocol.samples_frame(1, [block])))


def test_header_limits() -> None:
    with pytest.raises(ProtocolError) as err:
        protocol.parse_header(protocol.HEADER.pack(10_000, Kind.SAMPLES), 1000)
    assert err.value.code == "oversized"
    with pytest.raises(ProtocolError) as err:
        protocol.parse_header(protocol.HEADER.pack(1, 99), 1000)
    assert err.value.code == "unknown_kind"


@pytest.mark.parametrize(
    ("hello", "code", "where"),
    [
        ({"protocol": 2, "role": "hook", "run": "r"}, "bad_version", "version"),
        ({"protocol": 1, "role": "hook"}, "bad_handshake", "run"),
        ({"protocol": 1, "role": "hook", "run": "r", "rank": 2, "world_size": 2}, "bad_handshake", "rank"),
        ({"protocol": 1, "role": "hook", "run": "../etc"}, "bad_handshake", "run"),
        ({"protocol": 1, "role": "boss", "run": "r"}, "bad_handshake", "role"),
        ({"protocol": 1, "role": "hook", "run": "r", "extra": 1}, "bad_handshake", "extra"),
    ],
)
def test_bad_handshakes(hello, code, where) -> None:
    import json

    with pytest.raises(ProtocolError) as err:
        decode_hello(json.dumps(hello).encode())
    assert err.value.code == code and where in err.value.detail
