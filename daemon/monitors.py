"""Drift monitors on the histograms hooks stream: one :class:`DriftMonitor` per stream and name.

A hook sends a histogram as the columns ``hist/<name>/0`` .. ``hist/<name>/<fine+1>`` of a step's
row (fine-grid counts since its previous flush; see :mod:`runwatch.hooks.histograms`). The
writer passes every block through :meth:`DriftMonitors.derive` before storing it; each window a
monitor completes (:mod:`runwatch.daemon.drift`) adds, to the row of the window's last step,

=================================  =========================================================
``drift_psi/<name>``               PSI of the window against the frozen reference
``drift_js/<name>``                Jensen-Shannon distance (base 2, in [0, 1])
``drift_warn_threshold/<name>``    the PSI at which this window would warn (size-aware)
``drift_state/<name>``             debounced tier: 0 ok, 1 warning, 2 critical
=================================  =========================================================

so they are stored, exported and judged by rules like any value a hook sends. The store keeps
one row per step, hence the derived values ride in the step's own row (blocks are split where
rows gain different columns). Monitors live in memory: a daemon restart learns references again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from runwatch.daemon.drift import DriftConfig, DriftMonitor
from runwatch.daemon.protocol import Block
from runwatch.daemon.store import StreamInfo

log = logging.getLogger("runwatch.drift")

PREFIX = "hist/"
#: Histograms a rank may have monitored; more are refused (memory follows what hooks send).
MAX_MONITORS_PER_STREAM = 64
DERIVED = ("drift_psi", "drift_js", "drift_warn_threshold", "drift_state")


def histogram_columns(names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """``{histogram name: column indices in bin order}`` of the complete histograms in ``names``."""
    found: dict[str, dict[int, int]] = {}
    for col, key in enumerate(names):
        if not key.startswith(PREFIX):
            continue
        name, _, index = key[len(PREFIX):].rpartition("/")
        if name and index.isascii() and index.isdigit():
            found.setdefault(name, {})[int(index)] = col
    out = {}
    for name, bins in found.items():
        n = len(bins)
        if n >= 3 and set(bins) == set(range(n)):  # fine >= 1: underflow, a bin, overflow
            out[name] = np.array([bins[i] for i in range(n)], dtype=np.intp)
    return out


class DriftMonitors:
    """Writer thread only. ``settings`` returns the monitor settings (the grid's lo/hi are
    placeholders: monitors work on counts). Memory per monitor is a few fine-count vectors."""

    def __init__(self, settings: Callable[[], DriftConfig] | None = None) -> None:
        self._settings = settings or (lambda: DriftConfig(lo=0.0, hi=1.0))
        self._monitors: dict[tuple[int, str], DriftMonitor] = {}
        self._last_step: dict[tuple[int, str], int] = {}
        self._columns: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
        self._broken: set[tuple[int, str]] = set()

    def monitor(self, stream_id: int, name: str) -> DriftMonitor | None:
        return self._monitors.get((stream_id, name))

    def _monitor(self, stream_id: int, name: str, fine: int) -> DriftMonitor:
        key = (stream_id, name)
        m = self._monitors.get(key)
        if m is None and sum(1 for sid, _ in self._monitors if sid == stream_id) >= MAX_MONITORS_PER_STREAM:
            raise ValueError(f"more than {MAX_MONITORS_PER_STREAM} histograms on one rank; {name!r} "
                             "is not monitored")
        if m is None or m.config.fine != fine:
            base = self._settings()
            config = DriftConfig(**{**base.__dict__, "lo": 0.0, "hi": 1.0, "fine": fine,
                                    "bins": min(base.bins, fine)})
            m = self._monitors[key] = DriftMonitor(name, config)
        return m

    def derive(self, stream: StreamInfo, blocks: list[Block]) -> list[Block] | None:
        """``blocks`` with drift columns added to the rows that complete a window, or None."""
        out: list[Block] = []
        added = False
        for block in blocks:
            cols = self._columns.get(block.names)
            if cols is None:
                if len(self._columns) > 4096:
                    self._columns.clear()
                cols = self._columns[block.names] = histogram_columns(block.names)
            if not cols:
                out.append(block)
                continue
            rows = [self._row(stream, int(step), values, cols)
                    for step, values in zip(block.steps.tolist(), block.values, strict=True)]
            if not any(rows):
                out.append(block)
                continue
            added = True
            start = 0
            for i in range(1, len(rows) + 1):
                if i == len(rows) or list(rows[i]) != list(rows[start]):
                    extra = rows[start]
                    part = slice(start, i)
                    values = block.values[part]
                    if extra:
                        names = tuple(k for k in extra if k not in block.names)
                        values = np.concatenate(
                            [values, np.array([[r[k] for k in names] for r in rows[part]])], axis=1)
                        out.append(Block((*block.names, *names), block.steps[part], block.times[part],
                                         values))
                    else:
                        out.append(Block(block.names, block.steps[part], block.times[part], values))
                    start = i
        return out if added else None

    def _row(self, stream: StreamInfo, step: int, values: np.ndarray,
             cols: dict[str, np.ndarray]) -> dict[str, float]:
        extra: dict[str, float] = {}
        for name, idx in cols.items():
            key = (stream.id, name)
            if key in self._broken:
                continue
            if step <= self._last_step.get(key, -1):
                continue  # a replayed step (the hook resends after a reconnect): counted once
            counts = values[idx]
            if not np.isfinite(counts).all() or (counts < 0).any() or not np.isfinite(counts.sum()):
                continue
            self._last_step[key] = step
            try:
                results = self._monitor(stream.id, name, len(idx) - 2).add(step, counts)
            except (ValueError, ArithmeticError):
                log.exception("drift monitor %s of run %s rank %d is off", name, stream.run, stream.rank)
                self._broken.add(key)
                continue
            for r in results:
                extra[f"drift_psi/{name}"] = r.psi
                extra[f"drift_js/{name}"] = r.js_distance
                extra[f"drift_warn_threshold/{name}"] = r.warn_threshold
                extra[f"drift_state/{name}"] = float(int(r.state))
        return extra
