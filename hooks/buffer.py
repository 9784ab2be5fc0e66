"""The step buffer: per-step values held on the device, read back without a host sync.

Rows are steps of the current window; columns are metric keys, allocated the first time a
key is written. Device values are written with ``copy_``/``add_`` into a float64 device
tensor (float64 so loss and fingerprints keep their digits); host values (Python numbers)
go to a numpy array and never touch the device.

When a window is full, :meth:`StepBuffer.flush` enqueues one ``non_blocking`` copy into
pinned host memory and records a CUDA event. :meth:`StepBuffer.drain` hands finished
windows to ``emit`` once ``event.query()`` says the copy landed; with ``wait=True`` (only
at close) it synchronizes on the event instead.

Where a sync would creep in: never index the device buffer with a device tensor, never
``float()``/``.item()`` a value to decide something on the host, and never read
``self._dev`` directly: only ``host`` copies after their event.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from runwatch.hooks.sender import Batch


@dataclass
class _Window:
    host: torch.Tensor
    event: Any  # torch.cuda.Event, or None when the copy is already complete (CPU)
    rows: int
    device_names: tuple[str, ...]
    host_names: tuple[str, ...]
    steps: np.ndarray
    times: np.ndarray
    host_values: np.ndarray
    present: np.ndarray
    counts: np.ndarray  # per device column: values added this step (0 = set, not added)
    scale: np.ndarray


class StepBuffer:
    def __init__(self, rows: int, device: torch.device,
                 emit: Callable[[Batch], None]) -> None:
        self.rows = rows
        self.device = device
        self.cuda = device.type == "cuda"
        self._emit = emit
        self._dev_cols: dict[str, int] = {}
        self._host_cols: dict[str, int] = {}
        self._dev = torch.zeros(rows, 16, device=device, dtype=torch.float64)
        self._host = np.zeros((rows, 16))
        self._present_dev = np.zeros((rows, 16), dtype=bool)
        self._present_host = np.zeros((rows, 16), dtype=bool)
        self._counts = np.zeros((rows, 16))
        self._scale = np.ones((rows, 16))
        self._pending: dict[int, list[torch.Tensor]] = {}
        self._vectors: dict[int, torch.Tensor] = {}
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}
        self._steps = np.zeros(rows, dtype=np.int64)
        self._times = np.zeros(rows)
        self.row = 0
        self._windows: deque[_Window] = deque()
        self._pinned: list[torch.Tensor] = []

    # -- writing the current row ---------------------------------------------------------
    #
    # Device values are not written when they arrive: the row keeps references, and
    # end_step() writes them all with a few kernels (one stack, one cast and one
    # index_copy_ per dtype) instead of a copy kernel each. On a GPU every tiny kernel costs
    # microseconds of GPU time; a step records dozens of values.

    def set(self, key: str, value: torch.Tensor) -> None:
        """Device value for this step; the last one written wins."""
        col = self._device_col(key)
        self._pending[col] = [value.detach().reshape(())]
        self._present_dev[self.row, col] = True
        self._counts[self.row, col] = 0

    def add(self, key: str, value: torch.Tensor, average: bool = True, scale: float = 1.0) -> None:
        """Device value summed over every ``add`` of this step; averaged unless told not to.

        (e.g. the loss of each micro-batch is averaged; useful tokens are summed.) ``scale``
        multiplies the result on the host, after the read-back, for free.
        """
        col = self._device_col(key)
        values = self._pending.get(col)
        if values is None or not self._present_dev[self.row, col]:
            values = self._pending[col] = []
        values.append(value.detach().reshape(()))
        self._present_dev[self.row, col] = True
        self._scale[self.row, col] = scale
        if average:
            self._counts[self.row, col] += 1

    def put_add(self, key: str, value: float) -> None:
        """Host value summed over the step."""
        col = self._host_col(key)
        if not self._present_host[self.row, col]:
            self._host[self.row, col] = 0.0
        self._host[self.row, col] += value
        self._present_host[self.row, col] = True

    def set_many(self, keys: tuple[str, ...], values: torch.Tensor) -> None:
        """Several device values at once (one vector); ``keys`` must be ``reserve``d together."""
        first = self._device_col(keys[0])
        for i, key in enumerate(keys[1:], 1):
            if self._device_col(key) != first + i:
                raise ValueError("set_many keys must be allocated together, in order")
        self._vectors[first] = values.detach()
        self._present_dev[self.row, first : first + len(keys)] = True
        self._counts[self.row, first : first + len(keys)] = 0

    def reserve(self, keys: tuple[str, ...]) -> None:
        """Allocate adjacent device columns for keys written together with ``set_many``."""
        missing = [k for k in keys if k not in self._dev_cols]
        if missing and len(missing) != len(keys):
            raise ValueError("reserve either all keys or none")
        for key in missing:
            self._device_col(key)

    def _write_row(self) -> None:
        row = self._dev[self.row]
        by_dtype: dict[tuple[torch.dtype, torch.device], tuple[list[int], list[torch.Tensor]]] = {}
        for col, values in self._pending.items():
            value = values[0] if len(values) == 1 else torch.stack(values).sum()
            cols, tensors = by_dtype.setdefault((value.dtype, value.device), ([], []))
            cols.append(col)
            tensors.append(value)
        for cols, tensors in by_dtype.values():
            stacked = torch.stack(tensors).to(self.device, torch.float64, non_blocking=True)
            row.index_copy_(0, self._index(cols), stacked)
        for first, vector in self._vectors.items():
            row[first : first + vector.numel()].copy_(vector, non_blocking=True)
        self._pending.clear()
        self._vectors.clear()

    def _index(self, cols: list[int]) -> torch.Tensor:
        key = tuple(cols)
        index = self._indices.get(key)
        if index is None:
            # Built once per distinct column set, from pinned memory: no host sync.
            index = torch.tensor(key, dtype=torch.int64)
            if self.cuda:
                index = index.pin_memory()
            index = index.to(self.device, non_blocking=True)
            self._indices[key] = index
        return index

    def put(self, key: str, value: float) -> None:
        """Host value for this step."""
        col = self._host_col(key)
        self._host[self.row, col] = value
        self._present_host[self.row, col] = True

    def end_step(self, step: int, t: float) -> bool:
        """Close the current row. Returns True when the window is full (call flush)."""
        self._write_row()
        self._steps[self.row] = step
        self._times[self.row] = t
        self.row += 1
        return self.row == self.rows

    # -- columns -----------------------------------------------------------------------

    def _device_col(self, key: str) -> int:
        col = self._dev_cols.get(key)
        if col is None:
            col = len(self._dev_cols)
            if col >= self._dev.shape[1]:
                grown = torch.zeros(self.rows, col * 2, device=self.device, dtype=torch.float64)
                grown[:, :col].copy_(self._dev)
                self._dev = grown
                self._present_dev = _grow(self._present_dev, col * 2)
                self._counts = _grow(self._counts, col * 2)
                self._scale = _grow(self._scale, col * 2, fill=1.0)
            self._dev_cols[key] = col
        return col

    def _host_col(self, key: str) -> int:
        col = self._host_cols.get(key)
        if col is None:
            col = len(self._host_cols)
            if col >= self._host.shape[1]:
                self._host = _grow(self._host, col * 2)
                self._present_host = _grow(self._present_host, col * 2)
            self._host_cols[key] = col
        return col

    # -- moving windows to the host ------------------------------------------------------

    def flush(self) -> None:
        rows = self.row
        if rows == 0:
            return
        n_dev, n_host = len(self._dev_cols), len(self._host_cols)
        event = None
        if n_dev == 0:
            host = torch.empty(rows, 0, dtype=torch.float64)
        elif self.cuda:
            host = self._pinned_buffer(n_dev)
            # Copy and event on the buffer's own device and stream, whatever the current device.
            with torch.cuda.device(self.device):
                host[:rows, :n_dev].copy_(self._dev[:rows, :n_dev], non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.device))
        else:
            host = self._dev[:rows, :n_dev].clone()
        self._windows.append(_Window(
            host=host,
            event=event,
            rows=rows,
            device_names=tuple(self._dev_cols),
            host_names=tuple(self._host_cols),
            steps=self._steps[:rows].copy(),
            times=self._times[:rows].copy(),
            host_values=self._host[:rows, :n_host].copy(),
            present=np.concatenate(
                [self._present_dev[:rows, :n_dev], self._present_host[:rows, :n_host]], axis=1),
            counts=self._counts[:rows, :n_dev].copy(),
            scale=self._scale[:rows, :n_dev].copy(),
        ))
        self._present_dev[:] = False
        self._present_host[:] = False
        self._counts[:] = 0
        self._scale[:] = 1.0
        self.row = 0

    def _pinned_buffer(self, n_dev: int) -> torch.Tensor:
        for i, t in enumerate(self._pinned):
            if t.shape[1] >= n_dev:
                return self._pinned.pop(i)
        return torch.empty(self.rows, max(n_dev, 16), dtype=torch.float64, pin_memory=True)

    def drain(self, wait: bool = False) -> None:
        while self._windows:
            w = self._windows[0]
            if w.event is not None:
                if wait:
                    w.event.synchronize()
                elif not w.event.query():
                    return
            self._windows.popleft()
            device_values = w.host.numpy()[: w.rows, : len(w.device_names)].copy()
            if w.event is not None:
                self._pinned.append(w.host)
            added = w.counts > 0
            device_values[added] /= w.counts[added]
            device_values *= w.scale
            values = np.concatenate([device_values, w.host_values], axis=1)
            batch = Batch(w.device_names + w.host_names, w.steps, w.times, values,
                          None if w.present.all() else w.present)
            self._emit(batch)


def _grow(a: np.ndarray, cols: int, fill: float = 0.0) -> np.ndarray:
    grown = np.full((a.shape[0], cols), fill, dtype=a.dtype)
    grown[:, : a.shape[1]] = a
    return grown
