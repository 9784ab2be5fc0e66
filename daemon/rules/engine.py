"""The rules engine: judges every committed step against its rules, emits firings and resolutions.

Data flows one way: the writer commits a batch of steps, then hands each stream's new
steps to :meth:`Engine.observe`; the clock drives :meth:`Engine.tick` for ``absent`` rules.
Both return :class:`Event` s (a series starting or stopping to fire), which the writer stores
with the decisions they name. The engine itself keeps only bounded per-series state.

Threading: ``observe``/``tick``/``load`` run on the writer thread only. ``active()`` is read
by the exporter's and the CLI's threads, hence the one lock around the firing table.

A series is (rule, run, rank, metric). Per step, a condition is true or false; ``for`` asks
for it to hold N consecutive steps (or T seconds) before the series fires, and it resolves
at the first step the condition is false again. Steps reach the engine in order per stream:
a step older than one already judged (a late replay) is stored but not judged.
"""

from __future__ import annotations

import fnmatch
import math
import statistics
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from runwatch.daemon.hostio import HostIO
from runwatch.daemon.rules.baseline import Window, describe
from runwatch.daemon.rules.spec import Condition, Leaf, LoadedRule, Rule

SHARD_KEY = "data_shard"
DATA_WAIT_KEY = "data_wait_seconds"
STEP_SECONDS_KEY = "step_duration_seconds"
_NAN = np.float64(np.nan)
_TRUE_READY = np.True_
ZSCORE_FLOOR = 0.01  # a spread below 1% of the center counts as 1%: tiny moves of flat series are not news
ARRIVAL_HISTORY = 32
RECENT_VALUES = 5
WAIT_HISTORY = 256
MIN_ARRIVALS = 3
FORGET_SECONDS = 3600.0  # a stream silent and disconnected this long loses its rule state


@dataclass(frozen=True)
class Event:
    """A series started (``firing``) or stopped (``resolved``) firing."""

    rule: str
    version: str
    severity: str
    state: Literal["firing", "resolved"]
    run: str
    rank: int
    metric: str
    step: int
    sample_time: float
    value: float
    baseline: float
    window: str
    summary: str
    actions: tuple[str, ...]
    labels: dict[str, str] = field(default_factory=dict)  # the rule's own labels (routing)
    shard: float | None = None
    context: dict[str, str] = field(default_factory=dict)  # what the node looked like (host_io)

    @property
    def key(self) -> tuple[str, str, int, str]:
        return (self.rule, self.run, self.rank, self.metric)


@dataclass(frozen=True)
class StreamRef:
    id: int
    run: str
    rank: int
    host: str = ""


# -- per-series state ---------------------------------------------------------------------


class LeafState:
    """One condition on one stream: its baseline window and its metric columns."""

    def __init__(self, leaf: Leaf, frozen: tuple[int, int] | None) -> None:
        self.leaf = leaf
        self.window = (
            Window(leaf.baseline, frozen, need_scale=leaf.when.measure == "zscore")
            if leaf.baseline is not None
            else None
        )
        self.window_text = describe(leaf.baseline, frozen) if leaf.baseline is not None else ""
        self.keys: list[str] = []
        self.cols: dict[str, int] = {}
        self.prev = np.empty(0)  # last value per column, for delta
        self.tail = np.empty((RECENT_VALUES, 0))  # the last few values per column, for alerts
        self.tail_before = np.empty((RECENT_VALUES, 0))  # ...as they were before the last batch
        self.prev_step = np.empty(0, dtype=np.int64)
        self.last_truth = False  # composite: truth carried when the metric is missing
        self._select: dict[int, tuple[np.ndarray, np.ndarray, list[str]]] = {}

    def select(self, set_id: int, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(block columns, state columns, keys) of the metrics this condition reads."""
        cached = self._select.get(set_id)
        if cached is None:
            pattern = self.leaf.metric
            literal = not any(c in pattern for c in "*?[")
            picked = [
                i
                for i, n in enumerate(names)
                if (n == pattern if literal else fnmatch.fnmatchcase(n, pattern))
            ]
            keys = [names[i] for i in picked]
            for k in keys:
                if k not in self.cols:
                    self.cols[k] = len(self.keys)
                    self.keys.append(k)
            n = len(self.keys)
            if self.window is not None:
                self.window.widen(n)
            if len(self.prev) < n:
                self.tail = np.concatenate(
                    [self.tail, np.full((RECENT_VALUES, n - len(self.prev)), np.nan)], axis=1
                )
                self.prev = np.concatenate([self.prev, np.full(n - len(self.prev), np.nan)])
                self.prev_step = np.concatenate([self.prev_step, np.full(n - len(self.prev_step), -1)])
            cached = (
                np.array(picked, dtype=np.intp),
                np.array([self.cols[k] for k in keys], dtype=np.intp),
                keys,
            )
            self._select[set_id] = cached
        return cached

    def _in_order(self, state_cols: np.ndarray) -> bool:
        return bool(state_cols[0] == 0 and (len(state_cols) == 1 or (np.diff(state_cols) == 1).all()))

    def judge(
        self,
        steps: np.ndarray,
        times: np.ndarray,
        block_cols: np.ndarray,
        state_cols: np.ndarray,
        values: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(truth, value, baseline), k x len(state_cols), and fold the steps into the state.
        Call under ``np.errstate`` that ignores divide/invalid/over (the engine does)."""
        x = values[:, block_cols]
        cond = self.leaf.when
        center = scale = ready = _NAN
        if self.window is not None:
            if len(state_cols) == self.window.columns and self._in_order(state_cols):
                center, scale, ready = self.window.judge(steps, times, x)
            else:
                wide = np.full((len(x), self.window.columns), np.nan)
                wide[:, state_cols] = x
                c, sc, rd = self.window.judge(steps, times, wide)
                rd = np.broadcast_to(rd, c.shape)  # a warm window answers "ready" with one scalar
                center, scale, ready = c[:, state_cols], sc[:, state_cols], rd[:, state_cols]
        if cond.kind == "nonfinite":
            truth = ~np.isfinite(x)
        else:
            if cond.measure == "value":
                m = x
            elif cond.measure == "delta":
                prev = np.concatenate([self.prev[state_cols][None, :], x[:-1]])
                prev_step = np.concatenate(
                    [
                        self.prev_step[state_cols][None, :],
                        np.broadcast_to(steps[:-1, None], (len(x) - 1, len(state_cols))),
                    ]
                )
                m = (x - prev) / np.maximum(steps[:, None] - prev_step, 1)
                m[prev_step < 0] = np.nan
            elif cond.measure == "ratio":
                m = x / center
            else:
                floor = np.maximum(ZSCORE_FLOOR * np.abs(center), 1e-12)
                m = (x - center) / np.maximum(scale, floor)
            truth = _compare(cond, m)
            if self.window is not None and ready is not _TRUE_READY:
                truth &= ready
            if self.window is not None:
                truth &= np.isfinite(x)
        self.prev[state_cols] = x[-1]
        self.prev_step[state_cols] = steps[-1]
        self.tail_before = self.tail[:, state_cols]
        self.tail[:, state_cols] = np.concatenate([self.tail_before, x])[-RECENT_VALUES:]
        return truth, x, np.broadcast_to(center, x.shape)


def _same_baseline(a: LeafState, b: LeafState) -> bool:
    """Whether a reloaded condition may keep the old one's window (and its warm-up)."""
    return (a.leaf.metric, a.leaf.baseline, a.window_text, a.leaf.when.measure == "zscore") == (
        b.leaf.metric,
        b.leaf.baseline,
        b.window_text,
        b.leaf.when.measure == "zscore",
    )


def _compare(cond: Condition, m: np.ndarray) -> np.ndarray:
    if cond.kind == "between":
        return (m >= cond.low) & (m <= cond.high)
    if cond.kind == "outside":
        return (m < cond.low) | (m > cond.high)
    return {">=": np.greater_equal, ">": np.greater, "<=": np.less_equal, "<": np.less}[cond.op](m, cond.low)


class RuleState:
    """A rule on one stream: its conditions and the ``for`` state of each output series."""

    def __init__(self, loaded: LoadedRule, stream: StreamRef) -> None:
        self.loaded = loaded
        self.rule: Rule = loaded.rule
        self.stream = stream
        self.leaves = [LeafState(leaf, fr) for leaf, fr in zip(self.rule.leaves, loaded.frozen, strict=True)]
        self.composite = len(self.leaves) > 1 or not isinstance(self.rule.when, Condition)
        self.run_len = np.zeros(0, dtype=np.int64)
        self.run_start = np.zeros(0)
        self.firing = np.zeros(0, dtype=bool)

    def grow(self, n: int) -> None:
        extra = n - len(self.firing)
        if extra > 0:
            self.run_len = np.concatenate([self.run_len, np.zeros(extra, dtype=np.int64)])
            self.run_start = np.concatenate([self.run_start, np.zeros(extra)])
            self.firing = np.concatenate([self.firing, np.zeros(extra, dtype=bool)])

    def active(self, truth: np.ndarray, cols: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Which steps x series satisfy ``for``, carrying the run of true steps across batches."""
        k = len(truth)
        if not truth.any():
            # The common case: nothing true now, so no run continues and nothing is active.
            self.run_len[cols] = 0
            return np.zeros_like(truth)
        idx = np.arange(k)[:, None]
        last_false = np.maximum.accumulate(np.where(~truth, idx, -1), axis=0)
        fresh = last_false < 0  # no false step yet in this batch: the run continues from before
        run = np.where(truth, idx - last_false + np.where(fresh, self.run_len[cols], 0), 0)
        start_idx = np.clip(last_false + 1, 0, k - 1)
        start = np.where(fresh & (self.run_len[cols] > 0), self.run_start[cols], times[start_idx])
        span = self.rule.for_
        if span.steps is not None:
            active = run >= span.steps
            if span.at_least:
                active &= times[:, None] - start >= span.at_least
        else:
            active = truth & (times[:, None] - start >= float(span.seconds or 0.0))
        self.run_len[cols] = run[-1]
        self.run_start[cols] = start[-1]
        return active


# -- the engine ---------------------------------------------------------------------------


@dataclass
class StreamTrack:
    ref: StreamRef
    last_step: int = -1
    last_arrival: float | None = None
    gaps: deque[float] = field(default_factory=lambda: deque(maxlen=ARRIVAL_HISTORY))
    shard: float | None = None
    # (step, share of the step spent waiting for data), for alerts with ``context: [data_wait]``
    waits: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=WAIT_HISTORY))


class Engine:
    """``host_io``, when given, is sampled on every tick and answers rules with
    ``context: [host_io]``; ``gpu_state`` answers ``context: [gpu]`` (the node sampler's
    last reading, one line)."""

    def __init__(
        self,
        rules: Iterable[LoadedRule] = (),
        host_io: HostIO | None = None,
        gpu_state: Callable[[], str | None] | None = None,
    ) -> None:
        self.host_io = host_io
        self.gpu_state = gpu_state
        self.rules: list[LoadedRule] = []
        self._states: dict[tuple[str, int], RuleState] = {}
        self._per_stream: dict[int, list[RuleState]] = {}
        self._streams: dict[int, StreamTrack] = {}
        self._lock = threading.Lock()
        self._active: dict[tuple[str, str, int, str], Event] = {}
        self.load(list(rules))

    # -- rules --------------------------------------------------------------------------------

    def load(self, rules: list[LoadedRule], now: float = 0.0) -> list[Event]:
        """Swap the rule set. State of an unchanged rule is kept; a changed rule keeps the
        baselines of conditions that did not change. Series of a rule that changed or went
        away are resolved (returned), and fire again if they still should."""
        old = {lr.rule.name: lr for lr in self.rules}
        new = {lr.rule.name: lr for lr in rules}
        events: list[Event] = []
        for key, st in list(self._states.items()):
            name = key[0]
            if name in new and new[name].version == st.loaded.version:
                continue
            why = "rule removed" if name not in new else "rule changed"
            events += self._resolve_all(st, why, now)
            del self._states[key]
            if name in new:
                fresh = RuleState(new[name], st.stream)
                for leaf_new, leaf_old in zip(fresh.leaves, st.leaves, strict=False):
                    if _same_baseline(leaf_new, leaf_old):
                        leaf_new.window, leaf_new.keys, leaf_new.cols = (
                            leaf_old.window,
                            leaf_old.keys,
                            leaf_old.cols,
                        )
                        leaf_new.prev, leaf_new.prev_step = leaf_old.prev, leaf_old.prev_step
                        leaf_new.tail = leaf_old.tail
                self._states[key] = fresh
        del old
        self.rules = list(rules)
        self._per_stream.clear()
        return events

    def _rule_states(self, ref: StreamRef) -> list[RuleState]:
        states = self._per_stream.get(ref.id)
        if states is None:
            states = []
            for lr in self.rules:
                if lr.rule.selects(ref.run, ref.rank):
                    st = self._states.get((lr.rule.name, ref.id))
                    if st is None:
                        st = self._states[(lr.rule.name, ref.id)] = RuleState(lr, ref)
                    states.append(st)
            self._per_stream[ref.id] = states
        return states

    # -- judging ------------------------------------------------------------------------------

    def observe(
        self,
        ref: StreamRef,
        set_id: int,
        names: tuple[str, ...],
        steps: np.ndarray,
        times: np.ndarray,
        values: np.ndarray,
        now: float,
    ) -> list[Event]:
        """Judge newly committed steps of one stream (one metric set, steps ascending)."""
        track = self._streams.get(ref.id)
        if track is None:
            track = self._streams[ref.id] = StreamTrack(ref)
        if len(steps) and steps[0] <= track.last_step:
            keep = steps > track.last_step
            steps, times, values = steps[keep], times[keep], values[keep]
        if len(steps) == 0:
            return []
        track.last_step = int(steps[-1])
        silent = now - track.last_arrival if track.last_arrival is not None else 0.0
        usual = statistics.median(track.gaps) if track.gaps else math.nan
        if track.last_arrival is not None and now > track.last_arrival:
            track.gaps.append(now - track.last_arrival)
        track.last_arrival = now
        shards = values[:, names.index(SHARD_KEY)] if SHARD_KEY in names else None
        if DATA_WAIT_KEY in names and STEP_SECONDS_KEY in names:
            with np.errstate(divide="ignore", invalid="ignore"):
                share = values[:, names.index(DATA_WAIT_KEY)] / values[:, names.index(STEP_SECONDS_KEY)]
            track.waits.extend((int(s), float(w)) for s, w in zip(steps, share, strict=True)
                               if np.isfinite(w))
        events: list[Event] = []
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for st in self._rule_states(ref):
                if not st.rule.absent:
                    events += self._judge(st, set_id, names, steps, times, values, shards, track)
                elif len(st.firing) and st.firing[0]:
                    st.firing[0] = False
                    events.append(self._event(st, "resolved", "", int(steps[0]), float(times[0]), silent,
                                              usual, track.shard, "steps arrive again"))
        if shards is not None:
            track.shard = float(shards[-1])
        if len(events) > 1:
            events.sort(key=lambda e: e.step)
        return events

    def _judge(
        self,
        st: RuleState,
        set_id: int,
        names: tuple[str, ...],
        steps: np.ndarray,
        times: np.ndarray,
        values: np.ndarray,
        shards: np.ndarray | None,
        track: StreamTrack,
    ) -> list[Event]:
        k = len(steps)
        if not st.composite:
            ls = st.leaves[0]
            block_cols, cols, keys = ls.select(set_id, names)
            if len(cols) == 0:
                return []
            truth, x, center = ls.judge(steps, times, block_cols, cols, values)
            out_keys = keys
        else:
            truths, x, center, metric = [], None, None, ""
            for ls in st.leaves:
                block_cols, cols, _ = ls.select(set_id, names)
                if len(cols):
                    t, xv, cv = ls.judge(steps, times, block_cols, cols, values)
                    ls.last_truth = bool(t[-1, 0])
                    if x is None:
                        x, center, metric = xv, cv, ls.leaf.metric
                else:
                    t = np.full((k, 1), ls.last_truth)
                truths.append(t)
            if x is None:
                return []
            reduce = np.logical_and if st.rule.when.mode == "all" else np.logical_or  # type: ignore[union-attr]
            truth = reduce.reduce(truths)
            cols, out_keys = np.zeros(1, dtype=np.intp), [metric]
        st.grow(int(cols.max()) + 1)
        active = st.active(truth, cols, times)
        if not st.firing[cols].any() and not active.any():
            return []
        before = np.concatenate([st.firing[cols][None, :], active[:-1]])
        changed = active != before
        st.firing[cols] = active[-1]
        if not changed.any():
            return []
        events = []
        for i, j in zip(*np.nonzero(changed), strict=True):
            shard = float(shards[i]) if shards is not None else track.shard
            event = self._event(
                st,
                "firing" if active[i, j] else "resolved",
                out_keys[j],
                int(steps[i]),
                float(times[i]),
                float(x[i, j]),
                float(center[i, j]),
                shard,
            )
            if event.state == "firing" and not st.composite:
                # What the on-call person looks up first: the last few values up to this one.
                before = st.leaves[0].tail_before[:, j]
                recent = np.concatenate([before[~np.isnan(before)], x[: i + 1, j]])[-RECENT_VALUES:]
                event.context["recent_values"] = ", ".join(f"{v:.4g}" for v in recent)
            events.append(event)
        return events

    def tick(self, now: float, connected: Iterable[int], held: Iterable[int] = ()) -> list[Event]:
        """Judge ``absent`` rules: a connected stream with no new step for too long. A ``held``
        stream (its run is paused, or busy in an announced phase such as evaluation) is
        connected but not judged, and its silence starts counting only when it is released."""
        if self.host_io is not None:
            self.host_io.sample()
        live, held = set(connected), set(held)
        for sid in held:
            track = self._streams.get(sid)
            if track is not None and track.last_arrival is not None:
                track.last_arrival = max(track.last_arrival, now)
        events = self.forget_idle(now, live | held)
        for sid, track in self._streams.items():
            if sid in held:
                continue
            for st in self._rule_states(track.ref):
                if not st.rule.absent:
                    continue
                st.grow(1)
                span = st.rule.for_
                if span.factor is not None:
                    usual = statistics.median(track.gaps) if len(track.gaps) >= MIN_ARRIVALS else None
                    limit = None if usual is None else max(span.factor * usual, span.at_least)
                else:
                    usual, limit = None, span.seconds
                silent = now - track.last_arrival if track.last_arrival is not None else 0.0
                stalled = sid in live and limit is not None and silent >= limit
                if stalled == bool(st.firing[0]):
                    continue
                st.firing[0] = stalled
                why = None if stalled else "steps arrive again" if sid in live else "the hook disconnected"
                event = self._event(st, "firing" if stalled else "resolved", "", track.last_step, now,
                                    silent, math.nan if usual is None else usual, track.shard, why)
                if stalled:
                    ranks = self._ranks_behind(track.ref.run, now)
                    event = replace(event, summary=f"{event.summary}; {ranks}",
                                    context={**event.context, "ranks": ranks})
                    with self._lock:
                        self._active[event.key] = event
                events.append(event)
        return events

    def _ranks_behind(self, run: str, now: float) -> str:
        """Which ranks of ``run`` are behind, and the step each last reported."""
        tracks = sorted((t for t in self._streams.values()
                         if t.ref.run == run and t.last_arrival is not None), key=lambda t: t.ref.rank)
        if not tracks:
            return ""
        low = min(t.last_step for t in tracks)
        behind = [t for t in tracks if t.last_step == low]

        def show(t: StreamTrack) -> str:
            ago = now - (t.last_arrival or now)
            return f"rank {t.ref.rank} ({t.ref.host or '?'}) step {t.last_step}, {ago:.0f}s ago"

        if len(behind) == len(tracks):
            return f"every rank seen last reported step {low}: " + "; ".join(map(show, tracks))
        ahead = [t for t in tracks if t.last_step != low]
        return ("behind: " + "; ".join(map(show, behind)) + " | ahead: " + "; ".join(map(show, ahead)))

    def forget_idle(self, now: float, connected: set[int]) -> list[Event]:
        """Drop the state of streams gone (not connected, no step) for ``FORGET_SECONDS``,
        resolving what they had firing: memory follows the runs alive, not all runs ever."""
        events: list[Event] = []
        for sid, track in list(self._streams.items()):
            if sid in connected or track.last_arrival is None or now - track.last_arrival < FORGET_SECONDS:
                continue
            for key in [k for k in self._states if k[1] == sid]:
                events += self._resolve_all(self._states.pop(key), "run gone", now)
            del self._streams[sid]
            self._per_stream.pop(sid, None)
        return events

    # -- events -------------------------------------------------------------------------------

    def _event(
        self,
        st: RuleState,
        state: Literal["firing", "resolved"],
        metric: str,
        step: int,
        sample_time: float,
        value: float,
        baseline: float,
        shard: float | None,
        why: str | None = None,
    ) -> Event:
        rule = st.rule
        window = st.leaves[0].window_text if st.leaves else ""
        if rule.absent:
            window = "usual interval between arrivals"
        summary = _summary(rule, st.stream, metric, step, value, baseline, window, shard, state, why)
        context: dict[str, str] = {}
        if state == "firing" and "host_io" in rule.context and self.host_io is not None:
            summary += f"; {self.host_io.describe()}"
            context = self.host_io.context()
        if state == "firing" and "data_wait" in rule.context:
            text = _data_wait(self._streams.get(st.stream.id), step)
            if text:
                summary += f"; {text}"
                context["data_wait"] = text
        if state == "firing" and "gpu" in rule.context and self.gpu_state is not None:
            gpus = self.gpu_state()
            if gpus:
                summary += f"; GPUs: {gpus}"
                context["gpus"] = gpus
        event = Event(
            rule.name,
            st.loaded.version,
            rule.severity,
            state,
            st.stream.run,
            st.stream.rank,
            metric,
            step,
            sample_time,
            value,
            baseline,
            window,
            summary,
            tuple(rule.actions),
            dict(rule.labels),
            shard,
            context,
        )
        with self._lock:
            if state == "firing":
                self._active[event.key] = event
            else:
                self._active.pop(event.key, None)
        return event

    def _resolve_all(self, st: RuleState, why: str, now: float) -> list[Event]:
        events = []
        with self._lock:
            mine = [
                e
                for e in self._active.values()
                if e.rule == st.rule.name and e.run == st.stream.run and e.rank == st.stream.rank
            ]
        for e in mine:
            events.append(
                self._event(st, "resolved", e.metric, e.step, now, e.value, e.baseline, e.shard, why)
            )
        return events

    def clear_firing(self) -> None:
        """Forget what fires and when steps arrived, keeping baselines: after warming up from
        stored steps, which say nothing about how often this daemon will see new ones."""
        for track in self._streams.values():
            track.last_arrival = None
            track.gaps.clear()
        for st in self._states.values():
            st.firing[:] = False
            st.run_len[:] = 0
        with self._lock:
            self._active.clear()

    def restore_firing(self, firing: list[Event], refs: dict[tuple[str, int], StreamRef]) -> list[Event]:
        """Take over series a previous daemon left firing (after :meth:`clear_firing`): they stay
        firing until a new step resolves them. Returns those that cannot be taken over: the
        rule changed or went away, its stream or metric is unknown, or it is an ``absent`` rule
        (judged afresh on the clock)."""
        by_name = {lr.rule.name: lr for lr in self.rules}
        lost = []
        for e in firing:
            lr, ref = by_name.get(e.rule), refs.get((e.run, e.rank))
            if (
                lr is None
                or ref is None
                or lr.version != e.version
                or lr.rule.absent
            ):
                lost.append(e)
                continue
            st = next((s for s in self._rule_states(ref) if s.rule.name == e.rule), None)
            col = (
                0
                if st is not None and st.composite
                else (st.leaves[0].cols.get(e.metric) if st is not None else None)
            )
            if st is None or col is None:
                lost.append(e)
                continue
            st.grow(col + 1)
            st.firing[col] = True
            # As if the condition had held long enough: one more true step keeps it firing.
            st.run_len[col] = max(st.rule.for_.steps or 1, 1)
            st.run_start[col] = -math.inf
            with self._lock:
                self._active[e.key] = e
        return lost

    def active(self) -> list[Event]:
        """Series firing now."""
        with self._lock:
            return list(self._active.values())


def _data_wait(track: StreamTrack | None, step: int) -> str:
    """The share of each step spent waiting for data: over the last few steps up to ``step``
    and, for comparison, the median before them."""
    if track is None:
        return ""
    upto = [w for s, w in track.waits if s <= step]
    if len(upto) < 2:
        return ""
    recent, before = upto[-RECENT_VALUES:], upto[:-RECENT_VALUES]
    text = f"data wait {statistics.median(recent):.0%} of each step over the last {len(recent)} steps"
    if before:
        text += f", {statistics.median(before):.0%} before"
    return text


def _summary(
    rule: Rule,
    stream: StreamRef,
    metric: str,
    step: int,
    value: float,
    baseline: float,
    window: str,
    shard: float | None,
    state: str,
    why: str | None,
) -> str:
    ratio = value / baseline if baseline not in (0.0,) and math.isfinite(baseline) else math.nan
    fields: dict[str, Any] = {
        "rule": rule.name,
        "run": stream.run,
        "rank": stream.rank,
        "host": stream.host or "unknown host",
        "metric": metric,
        "step": step,
        "value": value,
        "baseline": baseline,
        "ratio": ratio,
        "window": window,
        "severity": rule.severity,
        "shard": "unknown" if shard is None else f"{shard:.0f}",
    }
    if state == "resolved":
        # The firing summary says what went wrong and what was done; a resolution says it ended.
        what = metric or "the stream"
        text = f"resolved: {rule.name} on {stream.run} rank {stream.rank}, step {step}"
        if math.isfinite(value) and math.isfinite(baseline) and rule.summary is not None:
            text += f": {what} {value:.4g} against baseline {baseline:.4g}"
        return text + (f" [{why}]" if why else "")
    text = None
    if rule.summary:
        try:
            text = rule.summary.format(**fields)
        except Exception:  # a summary must never stop judging; fall back to the plain one
            text = None
    if text is None:
        cond = rule.when if isinstance(rule.when, Condition) else f"{rule.when.mode} of conditions"
        text = f"{rule.name}: {metric or 'stream'} {cond} (value {value:.4g}"
        text += f", baseline {baseline:.4g}, {window})" if math.isfinite(baseline) else ")"
    return text
