"""The live view: latest value of every metric of every stream, for the exporter and CLI.

It is a cache of the store's newest rows (rebuilt from the store at start), written by the
writer thread after each commit and read by the exporter's HTTP thread and the asyncio
loop, hence the one lock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np

from runwatch.daemon.protocol import Block
from runwatch.daemon.store import StreamInfo


@dataclass
class StreamState:
    info: StreamInfo
    connections: int = 0
    last_step: int = -1
    last_time: float = 0.0
    steps_per_second: float = 0.0
    latest: dict[str, float] = field(default_factory=dict)
    latest_step: dict[str, int] = field(default_factory=dict)


class LiveView:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[int, StreamState] = {}

    def add_stream(self, info: StreamInfo) -> None:
        with self._lock:
            state = self._streams.get(info.id)
            if state is None:
                self._streams[info.id] = StreamState(info)
            else:
                state.info = info

    def connected(self, stream_id: int, delta: int) -> None:
        with self._lock:
            self._streams[stream_id].connections += delta

    def apply(self, stream_id: int, block: Block) -> None:
        """Fold a committed block in. Out-of-order (replayed) steps never move 'latest' back."""
        last = len(block.steps) - 1
        step = int(block.steps[last])
        t = float(block.times[last])
        row = block.values[last].tolist()
        with self._lock:
            state = self._streams.get(stream_id)
            if state is None:
                return
            for name, value in zip(block.names, row, strict=True):
                if name.startswith("hist/"):
                    continue  # histogram bins (drift monitors' input): stored, not live values
                if step >= state.latest_step.get(name, -1):
                    state.latest[name] = value
                    state.latest_step[name] = step
            if step > state.last_step:
                if state.last_step >= 0 and t > state.last_time:
                    rate = (step - state.last_step) / (t - state.last_time)
                    state.steps_per_second = (
                        rate if state.steps_per_second == 0 else 0.7 * state.steps_per_second + 0.3 * rate
                    )
                elif last > 0 and t > float(block.times[0]):
                    state.steps_per_second = (step - int(block.steps[0])) / (t - float(block.times[0]))
                state.last_step, state.last_time = step, t

    def load_row(self, stream_id: int, step: int, t: float, names: tuple[str, ...], data: bytes) -> None:
        values = np.frombuffer(data, dtype="<f8").reshape(1, -1)
        self.apply(stream_id, Block(names, np.array([step]), np.array([t]), values))

    def snapshot(self) -> list[StreamState]:
        with self._lock:
            return [replace(s, latest=dict(s.latest), latest_step={}) for s in self._streams.values()]

    def live(self, max_age: float, now: float | None = None) -> list[StreamState]:
        """Streams connected now or that sent a sample within ``max_age`` seconds."""
        now = time.time() if now is None else now
        return [s for s in self.snapshot() if s.connections > 0 or now - s.last_time <= max_age]
