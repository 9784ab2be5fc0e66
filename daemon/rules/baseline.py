"""Rolling baselines: what "normal" was for each series just before each step.

One :class:`Window` serves one rule condition on one stream, for every metric column the
condition selects (``activation_norm/*`` is many columns), so a batch of k steps x C
columns is judged with a handful of numpy calls whatever k and C are.

Cost and memory. The window keeps the last N steps (or, for a time window, at most
``TIME_WINDOW_ROWS`` rows) per column: memory is bounded per series. The statistic is
recomputed every ``refresh`` steps (N/4, at least 1), from the window as it stood before
that chunk of steps, so a spike is never part of its own baseline, the baseline is never
more than N/4 steps old, and the work per point is about 4 window elements: O(1)
amortized. EMA baselines are exact per step.
"""

from __future__ import annotations

import warnings

import numpy as np
from numpy.lib.stride_tricks import as_strided

from runwatch.daemon.rules.spec import Baseline

TIME_WINDOW_ROWS = 4096
MAD_TO_SIGMA = 1.4826
FROZEN_ROWS = 100_000
_TRUE = np.True_


class Window:
    """Baseline state of C columns of one stream. Rows are that stream's steps, in order."""

    def __init__(self, spec: Baseline, frozen: tuple[int, int] | None, need_scale: bool) -> None:
        self.spec = spec
        self.frozen_range = frozen
        self.need_scale = need_scale
        self.by_time = spec.window.seconds is not None
        self.rows = TIME_WINDOW_ROWS if self.by_time else int(spec.window.steps or 1)
        self.refresh = 8 if self.by_time else max(1, self.rows // 4)
        # Time windows: the rows inside the window and their times.
        self.values = np.empty((0, 0))
        self.times = np.empty(0)
        # Step windows: the last ``rows`` values live in a buffer with room to append, shifted
        # back to its start when full (a copy every ``rows`` steps: O(1) amortized per step).
        # It starts with ``rows`` NaN rows of padding.
        self._buf = np.full((2 * self.rows, 0), np.nan)
        self._len = self.rows
        self._seen = 0  # rows judged so far
        self._last_nan = -1  # last judged row holding a NaN (padding rows count as before 0)
        self._cached: tuple[np.ndarray, np.ndarray] | None = None  # the last refresh's statistic
        self._collected_rows = 0
        self.count = np.zeros(0, dtype=np.int64)
        self.ema = np.empty(0)
        # Frozen baselines: rows collected inside the range, then one statistic held.
        self._collected: list[np.ndarray] = []
        self._frozen: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._warm = False  # every column has min_samples finite values: readiness is settled

    @property
    def columns(self) -> int:
        return self.values.shape[1] if self.by_time else self._buf.shape[1]

    def history(self) -> np.ndarray:
        """The rows the next judgement looks back on (bounded: at most the window)."""
        return self.values if self.by_time else self._buf[self._len - self.rows : self._len]

    def widen(self, ncols: int) -> None:
        """Make room for new columns (a metric seen for the first time)."""
        extra = ncols - self.columns
        if extra <= 0:
            return
        self.values = np.concatenate([self.values, np.full((len(self.values), extra), np.nan)], axis=1)
        self._buf = np.concatenate([self._buf, np.full((len(self._buf), extra), np.nan)], axis=1)
        self._last_nan = max(self._last_nan, self._seen - 1)  # the new columns have no past
        if self._cached is not None:
            self._cached = (
                np.append(self._cached[0], [np.nan] * extra),
                np.append(self._cached[1], [np.nan] * extra),
            )
        self.count = np.concatenate([self.count, np.zeros(extra, dtype=np.int64)])
        self._warm = False
        self.ema = np.concatenate([self.ema, np.full(extra, np.nan)])
        self._collected = [
            np.concatenate([c, np.full((len(c), extra), np.nan)], axis=1) for c in self._collected
        ]
        if self._frozen is not None:
            center, scale, n = self._frozen
            self._frozen = (
                np.append(center, [np.nan] * extra),
                np.append(scale, [np.nan] * extra),
                np.append(n, [0] * extra),
            )

    def judge(
        self, steps: np.ndarray, times: np.ndarray, x: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(center, scale, ready), each k x C, for the k steps of ``x`` (non-finite = NaN);
        then fold ``x`` into the window. ``scale`` is NaN unless a zscore needs it."""
        finite = np.isfinite(x)
        all_finite = bool(finite.all())
        if not all_finite:
            x = np.where(finite, x, np.nan)
            self._last_nan = self._seen + int(np.flatnonzero(~finite.all(axis=1))[-1])
        if self.frozen_range is not None:
            return self._judge_frozen(steps, x)
        if self._warm:
            ready: np.ndarray = _TRUE  # steady state: every column is past its warm-up
        else:
            before = self.count + np.cumsum(finite, axis=0) - finite
            ready = before >= self.spec.min_samples
        if self.spec.stat == "ema":
            center, scale = self._ema(x), np.full_like(x, np.nan)
        elif self.by_time:
            center, scale = self._by_time(times, x)
        else:
            center, scale = self._by_steps(x)
        self._seen += len(x)
        if not self._warm:
            self.count = self.count + finite.sum(axis=0)
            self._warm = bool((self.count >= self.spec.min_samples).all())
        return center, scale, ready

    # -- statistics ------------------------------------------------------------------------

    def _stat(self, w: np.ndarray, axis: int, nan: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(center, scale) of ``w`` along ``axis``; scale is NaN unless a zscore needs it."""
        if nan is None:
            nan = bool(np.isnan(w).any())
        if nan:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows: NaN baseline
                return self._nanstat(w, axis)
        if self.spec.stat == "median":
            center = _median(w, axis)
            if not self.need_scale:
                return center, np.full_like(center, np.nan)
            return center, MAD_TO_SIGMA * _median(np.abs(w - np.expand_dims(center, axis)), axis)
        center = w.mean(axis=axis)
        return center, (w.std(axis=axis) if self.need_scale else np.full_like(center, np.nan))

    def _nanstat(self, w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        if self.spec.stat == "median":
            center = np.nanmedian(w, axis=axis)
            if not self.need_scale:
                return center, np.full_like(center, np.nan)
            return center, MAD_TO_SIGMA * np.nanmedian(np.abs(w - np.expand_dims(center, axis)), axis=axis)
        center = np.nanmean(w, axis=axis)
        return center, (np.nanstd(w, axis=axis) if self.need_scale else np.full_like(center, np.nan))

    def _by_steps(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k, c, n, r = len(x), x.shape[1], self.rows, self.refresh
        self._make_room(k)
        start = self._len
        self._buf[start : start + k] = x
        self._len += k
        g = self._seen
        first = (-g) % r  # refresh points are every r judged rows, counted across batches
        center, scale = np.empty((k, c)), np.empty((k, c))
        if first:
            assert self._cached is not None
            center[:first], scale[:first] = self._cached
        if first < k:
            chunks = (k - first + r - 1) // r
            # Windows end just before each refresh row: a strided view, no copy (chunks x n x C).
            s0, s1 = self._buf.strides
            base = self._buf[start + first - n :]
            windows = as_strided(base, shape=(chunks, n, c), strides=(r * s0, s0, s1), writeable=False)
            nan = self._last_nan >= g + first - n
            cc, ss = self._stat(windows, axis=1, nan=nan)
            center[first:], scale[first:] = _spread(cc, r, k - first), _spread(ss, r, k - first)
            self._cached = (cc[-1], ss[-1])
        return center, scale

    def _make_room(self, k: int) -> None:
        n = self.rows
        if self._len + k <= len(self._buf):
            return
        keep = self._buf[self._len - n : self._len].copy()
        if n + k > len(self._buf):
            self._buf = np.full((2 * n + k, self._buf.shape[1]), np.nan)
        self._buf[:n] = keep
        self._len = n

    def _by_time(self, times: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k, c, r = len(x), x.shape[1], self.refresh
        seconds = float(self.spec.window.seconds or 0.0)
        full, full_t = np.concatenate([self.values, x]), np.concatenate([self.times, times])
        h = len(self.values)
        center, scale = np.full((k, c), np.nan), np.full((k, c), np.nan)
        j = 0
        while j < k:
            lo = int(np.searchsorted(full_t[: h + j], times[j] - seconds, side="left"))
            w = full[lo : h + j]
            # Refresh after a quarter of the window's rows (at least r): O(1) work per row.
            step = max(r, len(w) // 4)
            if len(w):
                cc, ss = self._stat(w, axis=0)
                center[j : j + step], scale[j : j + step] = cc, ss
            j += step
        keep_from = int(np.searchsorted(full_t, full_t[-1] - seconds, side="left")) if len(full_t) else 0
        keep_from = max(keep_from, len(full) - self.rows)
        self.values, self.times = full[keep_from:], full_t[keep_from:]
        return center, scale

    def _ema(self, x: np.ndarray) -> np.ndarray:
        a = 2.0 / (self.rows + 1)
        state = self.ema.copy()
        first = np.isnan(state)
        if first.any():
            # A column's EMA starts at its first finite value.
            has = ~np.isnan(x)
            idx = np.where(has.any(axis=0), has.argmax(axis=0), -1)
            for col in np.flatnonzero(first & (idx >= 0)):
                state[col] = x[idx[col], col]
        if np.isnan(x).any():
            # A missing value must leave the EMA as it is at that row: fold row by row.
            center = np.empty_like(x)
            for i, row in enumerate(x):
                center[i] = state
                state = np.where(
                    np.isnan(row), state, np.where(np.isnan(state), row, (1 - a) * state + a * row)
                )
            self.ema = state
            return center
        # No NaN here, so every column's state is set: an exact per-step filter over the batch.
        # Imported here, not at the top: scipy.signal costs 1.5-3 s of every daemon start, and
        # only rules with an EMA baseline (none in the default pack) need it.
        from scipy.signal import lfilter

        y, _ = lfilter([a], [1.0, -(1.0 - a)], x, axis=0, zi=((1.0 - a) * state)[None, :])
        center = np.concatenate([state[None, :], y[:-1]])
        self.ema = y[-1]
        return center

    def _judge_frozen(self, steps: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo, hi = self.frozen_range  # type: ignore[misc]
        k, c = x.shape
        if self._frozen is None:
            inside = (steps >= lo) & (steps <= hi)
            if inside.any() and self._collected_rows < FROZEN_ROWS:
                self._collected.append(x[inside])
                self._collected_rows += int(inside.sum())
            if steps[-1] > hi:
                data = np.concatenate(self._collected) if self._collected else np.full((0, c), np.nan)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    center, scale = (
                        self._stat(data, axis=0) if len(data) else (np.full(c, np.nan), np.full(c, np.nan))
                    )
                self._frozen = (center, scale, (~np.isnan(data)).sum(axis=0))
                self._collected = []
        if self._frozen is None:
            nan = np.full((k, c), np.nan)
            return nan, nan, np.zeros((k, c), dtype=bool)
        center, scale, n = self._frozen
        ready = np.broadcast_to((n >= self.spec.min_samples) & (steps > hi)[:, None], (k, c))
        return (np.broadcast_to(center, (k, c)), np.broadcast_to(scale, (k, c)), ready)


def _median(w: np.ndarray, axis: int) -> np.ndarray:
    """np.median without its per-call overhead (large on small arrays); no NaN in ``w``."""
    n = w.shape[axis]
    half = n // 2
    if n % 2:
        return np.take(np.partition(w, half, axis=axis), half, axis=axis)
    part = np.partition(w, (half - 1, half), axis=axis)
    return 0.5 * (np.take(part, half - 1, axis=axis) + np.take(part, half, axis=axis))


def _spread(chunks: np.ndarray, r: int, k: int) -> np.ndarray:
    """Per-chunk rows repeated over the chunk's steps."""
    return chunks if r == 1 else np.repeat(chunks, r, axis=0)[:k]


def describe(spec: Baseline, frozen: tuple[int, int] | None) -> str:
    if frozen is not None:
        return f"{spec.stat} of steps {frozen[0]}-{frozen[1]}"
    what = {"median": "median", "mean": "mean", "ema": "EMA"}[spec.stat]
    return f"{what} of the last {spec.window}"
