"""Stragglers: how long the other ranks of a run wait for each rank, as a series of its own.

Under synchronous data parallelism every rank waits, once per step, for the slowest one, so
step durations are the same on every rank and say nothing about who is slow. What differs is
the part of a step a rank spends on its own before it can wait for anyone: waiting for its
data and running its forward pass (the hook's ``data_wait_seconds`` and ``forward_seconds``).
For each step of each rank this module derives

    ``rank_lag_fraction`` = (this rank's own time − the median of the other ranks' own time)
                            / this rank's step duration

each term a median over the rank's last ``WINDOW`` steps: the share of every step the others
spend waiting for this rank (negative for a rank faster than the rest). The writer stores it
in the step's row like any value a hook sends, so the rule ``rank_straggler`` judges it and
Prometheus gets it.

On a GPU the forward time is the host's time to queue the kernels: a rank slowed by its data
loader, its CPU or Python shows; a GPU that itself runs slow (throttled clocks) shows in the
node sampler's clock-event reasons instead.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from runwatch.daemon.protocol import Block
from runwatch.daemon.store import StreamInfo

WINDOW = 16
MIN_STEPS = 4  # a rank's median needs this many steps before it is compared or compared with
OWN_KEYS = ("data_wait_seconds", "forward_seconds")
STEP_KEY = "step_duration_seconds"
LAG_KEY = "rank_lag_fraction"


@dataclass
class _Rank:
    own: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    step: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    median_own: float | None = None


class RankComparison:
    """Writer thread only. Memory: ``2 * WINDOW`` numbers per rank of each multi-rank run seen."""

    def __init__(self) -> None:
        self._runs: dict[str, dict[int, _Rank]] = {}

    def derive(self, stream: StreamInfo, blocks: list[Block]) -> list[Block] | None:
        """``blocks`` with a ``rank_lag_fraction`` column added to the steps that have one, or
        None when there is none to add (a single-rank run, blocks without step timings). The
        store keeps one row per step, so the derived value rides in the step's own row."""
        if stream.world_size < 2:
            return None
        out: list[Block] = []
        added = False
        for block in blocks:
            if STEP_KEY not in block.names or LAG_KEY in block.names or \
                    not any(k in block.names for k in OWN_KEYS):
                out.append(block)
                continue
            lag = self._lags(stream, block)
            have = ~np.isnan(lag)
            if not have.any():
                out.append(block)
                continue
            added = True
            names = (*block.names, LAG_KEY)
            values = np.concatenate([block.values, lag[:, None]], axis=1)
            # Consecutive steps with and without the new value become separate blocks.
            edges = np.flatnonzero(np.diff(have.astype(np.int8))) + 1
            for part in np.split(np.arange(len(lag)), edges):
                if have[part[0]]:
                    out.append(Block(names, block.steps[part], block.times[part], values[part]))
                else:
                    out.append(Block(block.names, block.steps[part], block.times[part], block.values[part]))
        return out if added else None

    def _lags(self, stream: StreamInfo, block: Block) -> np.ndarray:
        ranks = self._runs.setdefault(stream.run, {})
        me = ranks.setdefault(stream.rank, _Rank())
        cols = [block.names.index(k) for k in OWN_KEYS if k in block.names]
        own = np.nan_to_num(block.values[:, cols], nan=0.0).sum(axis=1)
        step = block.values[:, block.names.index(STEP_KEY)]
        # The other ranks' medians as they stand now: their steps arrive in their own frames.
        others = [r.median_own for rank, r in ranks.items()
                  if rank != stream.rank and r.median_own is not None]
        center = statistics.median(others) if others else None
        lag = np.full(len(own), np.nan)
        for i, (o, s) in enumerate(zip(own.tolist(), step.tolist(), strict=True)):
            if not (np.isfinite(o) and np.isfinite(s) and s > 0):
                continue
            me.own.append(o)
            me.step.append(s)
            if len(me.own) < MIN_STEPS:
                continue
            me.median_own = statistics.median(me.own)
            if center is not None:
                lag[i] = (me.median_own - center) / statistics.median(me.step)
        return lag
