"""Drift monitors: PSI and Jensen–Shannon between a frozen reference and windows of streamed counts.

The hook never sends raw values. Per monitored signal it streams counts over a fixed *fine* grid
known in advance: ``fine`` equal-width bins over ``[lo, hi)`` plus an underflow bin (index 0,
values ``< lo``) and an overflow bin (index ``fine + 1``, values ``>= hi``), so a counts vector
has ``fine + 2`` entries. A value ``v`` goes to ``searchsorted(edges, v, side="right")``, which
is what ``torch.bucketize(v, edges, right=True)`` computes on the device (:func:`fine_counts`
is the same rule in numpy). Memory is independent of window size: a monitor keeps the
reference counts, one coarse counts vector for the open window and the last ``debounce_m`` tiers.

Reference: steps seen in the first ``warmup_steps`` (counted in step numbers from the first step
the monitor sees) are ignored; the next ``reference_steps`` are summed as the reference (longer if
it holds fewer than ``min_reference_values`` values). Its coarse bins are then frozen: the fine
bins the reference touches are merged at its quantiles into ``bins`` bins of about equal mass.
Underflow and overflow stay bins of their own, and so (``split_empty_tails``) do the parts of
the fine grid below and above anything the reference saw: a new mode in a region the reference
never reached lands in a bin of its own instead of being diluted into a wide tail bin. A
reference may also be given directly as fine counts (a step range from the store, another run),
restored with its own coarse bins (a persisted one), or be an absolute step range of the
monitored stream (``reference_steps``).

Data shards (:meth:`DriftMonitor.add_shard`): counts tagged with a shard fill that shard's own
windows (``shard_window_values``), each judged against the monitor's one reference with its own
debounce; at most ``MAX_SHARDS`` shards are followed at once, so memory stays bounded.

Window: consecutive steps, in arrival order, whose counts sum to at least ``window_values``
values. Steps are not split, so a window's N is ``window_values`` or a little more; windows do
not overlap. Each completed window is compared with the reference.

Statistics, for reference shares p and window shares q over the coarse bins:

- PSI = sum((q - p) * ln(q / p)), natural log. Empty-bin rule (counts, M reference and N window
  values): bins empty in both histograms are dropped (they carry no evidence); every remaining
  bin of both gets the extra share 0.5 / min(N, M), and both are renormalised. With N == M that
  is adding 0.5 to every count (Jeffreys / Krichevsky–Trofimov); tying it to the smaller sample
  keeps a large reference from calling a bin it never saw impossible. :func:`psi` takes shares
  (no sample size) and does no smoothing: a bin empty on one side only gives ``inf``.
- Jensen–Shannon *distance* (the square root of the divergence), base 2, so in [0, 1], from
  scipy on the unsmoothed counts. It is reported, not used for tiers.
- Tiers: with B bins, window N and reference M, (N*M/(N+M)) * PSI is about chi-square with B-1
  degrees of freedom when nothing drifted (PSI is the Jeffreys divergence KL(p|q) + KL(q|p); its
  mean is about (B-1)(1/N + 1/M)). warn = max(chi2.ppf(0.99, B-1) * (1/N + 1/M), 0.1) and
  critical = max(chi2.ppf(0.999, B-1) * (1/N + 1/M), 0.25); a tier is reached at or above its
  threshold. B counts underflow and overflow always and every other bin either histogram
  reaches.
- Debounce: a tier is active while at least ``debounce_k`` of the last ``debounce_m`` windows
  reached it; the state is the highest active tier.

False alarms: where the chi-square term is above the floor (N below about 250 for B = 12) and
every bin holds mass, the raw warning rate is the nominal 1 - warn_quantile, 1%; sparse tail
bins make it lower (tests/test_drift.py measures 0.4-0.8% at N = 64-256 and none at N >= 1024
for i.i.d. values, and no debounced warning at all). The chi-square part assumes independent
values. Values from one batch or one sequence are correlated (per-token loss, activations),
which widens the no-drift spread of PSI and raises false alarms above that; the floors limit
the damage for large windows.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from enum import IntEnum
from functools import lru_cache
from itertools import pairwise
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "CoarseBins",
    "DriftConfig",
    "DriftMonitor",
    "DriftResult",
    "Reference",
    "Tier",
    "fine_counts",
    "fine_edges",
    "freeze_coarse_bins",
    "js_distance",
    "psi",
    "psi_counts",
    "smoothed_shares",
    "thresholds",
]

Counts = npt.ArrayLike


class Tier(IntEnum):
    """How far a window is from the reference, ordered so that comparisons read naturally."""

    OK = 0
    WARNING = 1
    CRITICAL = 2


# --- the fine grid ------------------------------------------------------------------------


def fine_edges(lo: float, hi: float, fine: int) -> np.ndarray:
    """The ``fine + 1`` edges of the fine grid (the hook must bin with the same edges)."""
    return np.linspace(lo, hi, fine + 1)


def fine_counts(values: npt.ArrayLike, lo: float, hi: float, fine: int) -> np.ndarray:
    """Counts of ``values`` over the fine grid plus underflow (index 0) and overflow (last).

    NaN is dropped (non-finite values are the rules' business, not drift's); -inf is underflow,
    +inf overflow.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    idx = np.searchsorted(fine_edges(lo, hi, fine), v, side="right")
    return np.bincount(idx, minlength=fine + 2).astype(np.int64)


# --- coarse bins --------------------------------------------------------------------------


@dataclass(frozen=True)
class CoarseBins:
    """A frozen merge of fine bins: coarse bin i sums fine bins ``starts[i]:starts[i+1]``.

    ``starts[0] == 0`` is the underflow bin and ``starts[-1] == fine + 1`` the overflow bin;
    both are always bins of their own.
    """

    starts: tuple[int, ...]
    fine: int
    _index: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        s = tuple(int(x) for x in self.starts)
        ok = (len(s) >= 3 and s[0] == 0 and s[1] == 1 and s[-1] == self.fine + 1
              and all(a < b for a, b in pairwise(s)))
        if not ok:
            raise ValueError(f"coarse bin starts must rise strictly from 0, 1 to fine + 1 "
                             f"({self.fine + 1}), got {self.starts}")
        object.__setattr__(self, "starts", s)
        object.__setattr__(self, "_index", np.asarray(s, dtype=np.intp))

    @property
    def n_bins(self) -> int:
        return len(self.starts)

    def coarsen(self, fine_counts: Counts) -> np.ndarray:
        """Coarse counts from fine counts (length ``fine + 2``)."""
        counts = np.asarray(fine_counts)
        if counts.shape != (self.fine + 2,):
            raise ValueError(f"fine counts must have shape ({self.fine + 2},), got {counts.shape}")
        return np.add.reduceat(counts, self._index)

    def edges(self, lo: float, hi: float) -> np.ndarray:
        """Coarse edges in value units, ``n_bins + 1`` of them, from ``-inf`` to ``inf``."""
        fe = fine_edges(lo, hi, self.fine)
        lower = [-math.inf] + [float(fe[s - 1]) for s in self.starts[1:]]
        return np.array([*lower, math.inf])


def freeze_coarse_bins(reference: Counts, bins: int = 10, *, split_empty_tails: bool = True) -> CoarseBins:
    """Merge adjacent fine bins at the reference's quantiles into about ``bins`` equal-mass bins.

    Underflow and overflow are always bins of their own. With ``split_empty_tails``, the fine
    bins below the first and above the last one the reference touched are bins of their own
    too. Fewer than ``bins`` quantile bins come out when the fine grid cannot split the mass (a
    fine bin holding more than 1/bins of it); no quantile bin has zero reference mass.
    """
    ref = np.asarray(reference, dtype=np.float64)
    if ref.ndim != 1 or ref.size < 3:
        raise ValueError(f"reference must be fine counts (1-D, length fine + 2 >= 3), got shape {ref.shape}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if not np.all(np.isfinite(ref)) or np.any(ref < 0):
        raise ValueError("reference counts must be finite and >= 0")
    fine = ref.size - 2
    inner = ref[1 : fine + 1]
    touched = np.flatnonzero(inner > 0) + 1  # fine indices the reference reached
    if touched.size == 0:
        # Everything fell outside the grid: one inner bin so that in-grid values still have a home.
        return CoarseBins(starts=(0, 1, fine + 1), fine=fine)
    first, last = (int(touched[0]), int(touched[-1])) if split_empty_tails else (1, fine)

    cum = np.cumsum(ref[first : last + 1])  # cum[i]: reference mass in fine bins first..first+i
    total = cum[-1]
    cuts: list[int] = []  # a cut after fine bin e starts the next coarse bin at e + 1
    if last > first:
        candidates = cum[:-1]
        for j in range(1, bins):
            i = int(np.argmin(np.abs(candidates - total * j / bins)))
            mass = candidates[i]
            # Equal cumulative mass means an empty coarse bin between two cuts; keep the first cut.
            if 0 < mass < total and (not cuts or mass > cum[cuts[-1] - first]):
                cuts.append(first + i)
    starts = [0]
    if first > 1:
        starts.append(1)
    starts.append(first)
    starts.extend(c + 1 for c in cuts)
    if last < fine:
        starts.append(last + 1)
    starts.append(fine + 1)
    return CoarseBins(starts=tuple(starts), fine=fine)


# --- statistics ---------------------------------------------------------------------------


def _shares(x: Counts, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D vector, got shape {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError(f"{name} must be finite and >= 0")
    total = a.sum()
    if total <= 0:
        raise ValueError(f"{name} is all zero")
    return a / total


def psi(reference: Counts, current: Counts) -> float:
    """PSI = sum((q - p) * ln(q / p)) of shares (counts are normalised first), no smoothing.

    Bins empty in both contribute 0; a bin empty in one only makes PSI ``inf``. Use
    :func:`psi_counts` for counts, which applies the empty-bin rule.
    """
    p = _shares(reference, "reference")
    q = _shares(current, "current")
    if p.shape != q.shape:
        raise ValueError(f"reference and current differ in length: {p.size} != {q.size}")
    used = (p > 0) | (q > 0)
    p, q = p[used], q[used]
    if np.any(p == 0) or np.any(q == 0):
        return math.inf
    return float(np.sum((q - p) * np.log(q / p)))


def smoothed_shares(
    reference: Counts, current: Counts, pseudocount: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """The empty-bin rule, on counts with totals M (reference) and N (current).

    Bins empty in both are dropped; every remaining bin of both histograms gets the same extra
    share ``pseudocount / min(N, M)``, and both are renormalised. With N == M this is adding
    ``pseudocount`` (0.5: Jeffreys / Krichevsky–Trofimov) to every count. Tying the extra share
    to the smaller sample keeps a large reference from calling a bin it never saw impossible
    (one stray window value would otherwise add about ln(3M/N)/N to PSI). Returns the shares
    over the bins used.
    """
    r = np.asarray(reference, dtype=np.float64)
    c = np.asarray(current, dtype=np.float64)
    if r.shape != c.shape or r.ndim != 1:
        raise ValueError(f"reference and current must be 1-D of one length, got {r.shape} and {c.shape}")
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(c))) or np.any(r < 0) or np.any(c < 0):
        raise ValueError("counts must be finite and >= 0")
    m, n = r.sum(), c.sum()
    if m <= 0 or n <= 0:
        raise ValueError("reference and current must each hold some counts")
    if not pseudocount > 0:
        raise ValueError(f"pseudocount must be > 0, got {pseudocount}")
    return _smooth(r, c, m, n, pseudocount)


def _smooth(
    r: np.ndarray, c: np.ndarray, m: float, n: float, pseudocount: float
) -> tuple[np.ndarray, np.ndarray]:
    used = (r > 0) | (c > 0)
    extra = pseudocount / min(n, m)
    p = r[used] / m + extra
    q = c[used] / n + extra
    return p / p.sum(), q / q.sum()


def psi_counts(reference: Counts, current: Counts, pseudocount: float = 0.5) -> float:
    """PSI of two count vectors under the empty-bin rule of :func:`smoothed_shares` (always finite)."""
    p, q = smoothed_shares(reference, current, pseudocount)
    return float(np.sum((q - p) * np.log(q / p)))


def js_distance(reference: Counts, current: Counts) -> float:
    """Jensen–Shannon distance, base 2, in [0, 1]: the square root of the JS divergence."""
    p = _shares(reference, "reference")
    q = _shares(current, "current")
    if p.shape != q.shape:
        raise ValueError(f"reference and current differ in length: {p.size} != {q.size}")
    return _js(p, q)


def _js(p: np.ndarray, q: np.ndarray) -> float:
    from scipy.spatial.distance import jensenshannon  # here: scipy's import costs ~1 s of a daemon's start

    return float(jensenshannon(p, q, base=2))


@lru_cache(maxsize=4096)
def _chi2_ppf(quantile: float, dof: int) -> float:
    # ppf costs tens of microseconds; (quantile, dof) pairs are few, so cache them. scipy.stats
    # is imported on first use: it costs about a second of every daemon start otherwise.
    from scipy.stats import chi2

    return float(chi2.ppf(quantile, dof)) if dof > 0 else 0.0


def thresholds(
    bins_used: int,
    n: float,
    m: float,
    *,
    warn_quantile: float = 0.99,
    critical_quantile: float = 0.999,
    warn_floor: float = 0.1,
    critical_floor: float = 0.25,
) -> tuple[float, float]:
    """(warn, critical) PSI thresholds for B bins used, window N and reference M values."""
    if n <= 0 or m <= 0:
        raise ValueError(f"n and m must be > 0, got n={n}, m={m}")
    scale = 1.0 / n + 1.0 / m
    dof = max(int(bins_used) - 1, 0)
    warn = max(_chi2_ppf(warn_quantile, dof) * scale, warn_floor)
    critical = max(_chi2_ppf(critical_quantile, dof) * scale, critical_floor)
    return warn, critical


# --- the monitor --------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftConfig:
    """One monitor's settings. ``lo``, ``hi`` and ``fine`` describe the grid the hook bins on."""

    lo: float
    hi: float
    fine: int = 128
    bins: int = 10
    split_empty_tails: bool = True
    warmup_steps: int = 100
    reference_steps: int = 200
    min_reference_values: int = 1000
    window_values: int = 1024
    shard_window_values: int = 256
    pseudocount: float = 0.5
    warn_quantile: float = 0.99
    critical_quantile: float = 0.999
    warn_floor: float = 0.1
    critical_floor: float = 0.25
    debounce_k: int = 2
    debounce_m: int = 3

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"DriftConfig.{name} {why}, got {getattr(self, name)!r}")

        for name in ("lo", "hi", "pseudocount", "warn_quantile", "critical_quantile", "warn_floor",
                     "critical_floor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise bad(name, "must be a finite number")
        for name in ("fine", "bins", "warmup_steps", "reference_steps", "min_reference_values",
                     "window_values", "shard_window_values", "debounce_k", "debounce_m"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise bad(name, "must be an integer")
        if not isinstance(self.split_empty_tails, bool):
            raise bad("split_empty_tails", "must be a bool")
        if not self.hi > self.lo:
            raise bad("hi", f"must be > lo ({self.lo!r})")
        if self.fine < 1:
            raise bad("fine", "must be >= 1")
        if not 1 <= self.bins <= self.fine:
            raise bad("bins", f"must be between 1 and fine ({self.fine})")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", "must be >= 0")
        if self.reference_steps < 1:
            raise bad("reference_steps", "must be >= 1")
        if self.min_reference_values < 1:
            raise bad("min_reference_values", "must be >= 1")
        if self.window_values < 1:
            raise bad("window_values", "must be >= 1")
        if self.shard_window_values < 1:
            raise bad("shard_window_values", "must be >= 1")
        if not self.pseudocount > 0:
            raise bad("pseudocount", "must be > 0")
        if not 0 < self.warn_quantile < 1:
            raise bad("warn_quantile", "must be in (0, 1)")
        if not self.warn_quantile <= self.critical_quantile < 1:
            raise bad("critical_quantile", f"must be in [warn_quantile ({self.warn_quantile}), 1)")
        if self.warn_floor < 0:
            raise bad("warn_floor", "must be >= 0")
        if self.critical_floor < self.warn_floor:
            raise bad("critical_floor", f"must be >= warn_floor ({self.warn_floor})")
        if self.debounce_m < 1:
            raise bad("debounce_m", "must be >= 1")
        if not 1 <= self.debounce_k <= self.debounce_m:
            raise bad("debounce_k", f"must be between 1 and debounce_m ({self.debounce_m})")


@dataclass(frozen=True, eq=False)
class Reference:
    """A frozen reference: its fine counts, the coarse bins chosen from them, and M."""

    fine_counts: np.ndarray
    bins: CoarseBins
    counts: np.ndarray  # coarse
    first_step: int | None
    last_step: int | None

    @property
    def m(self) -> int:
        return int(self.counts.sum())


@dataclass(frozen=True)
class DriftResult:
    """One completed window compared with the reference."""

    monitor: str
    first_step: int
    last_step: int
    n: int
    m: int
    bins_used: int
    psi: float
    js_distance: float
    warn_threshold: float
    critical_threshold: float
    tier: Tier  # this window alone
    state: Tier  # after k-of-m debounce
    changed: bool  # state differs from the previous window's
    counts: np.ndarray = field(repr=False, compare=False)  # the window's coarse counts


class _Open:
    """A window being filled and the debounce history of the windows before it: the monitor's
    own, or one data shard's (see :meth:`DriftMonitor.add_shard`)."""

    __slots__ = ("counts", "first", "history", "last", "last_fed", "result", "state")

    def __init__(self, n_bins: int, debounce_m: int) -> None:
        self.counts = np.zeros(n_bins, dtype=np.float64)
        self.first: int | None = None
        self.last: int | None = None
        self.history: deque[Tier] = deque(maxlen=debounce_m)
        self.state = Tier.OK
        self.result: DriftResult | None = None  # the last completed window's
        self.last_fed = -1  # step of the last counts added


#: Data shards one monitor follows at once (least recently fed forgotten first): memory stays
#: bounded however many shards a run reads.
MAX_SHARDS = 64
#: A shard counts towards :meth:`DriftMonitor.worst_shard` while it was fed within this many steps.
SHARD_ACTIVE_STEPS = 256


class DriftMonitor:
    """Feeds per-step fine counts through warm-up, reference and windows; see the module doc.

    A ``reference`` (fine counts) given here is frozen at once and warm-up is skipped. With
    ``reference_steps`` (an inclusive ``(first, last)`` of absolute step numbers) the reference
    is the steps in that range instead of the configured warm-up and length: earlier steps are
    ignored, and it freezes at ``last`` (or at the first step past it) however many values it
    holds. Not thread-safe: one monitor belongs to one consumer.
    """

    def __init__(self, name: str, config: DriftConfig, reference: Counts | None = None, *,
                 reference_steps: tuple[int, int] | None = None) -> None:
        if reference_steps is not None and not 0 <= reference_steps[0] <= reference_steps[1]:
            raise ValueError(f"drift monitor {name!r}: reference steps must be 0 <= first <= last, "
                             f"got {reference_steps}")
        self.name = name
        self.config = config
        self.reference_steps = reference_steps
        self._first_seen: int | None = None
        self._ref_acc = np.zeros(config.fine + 2, dtype=np.float64)
        self._ref_first: int | None = None
        self._ref_last: int | None = None
        self._reference: Reference | None = None
        self._open: _Open | None = None
        self._shards: OrderedDict[int, _Open] = OrderedDict()
        if reference is not None:
            self.freeze_reference(reference)

    @property
    def phase(self) -> Literal["warmup", "reference", "monitoring"]:
        """``warmup``, ``reference`` or ``monitoring``."""
        if self._reference is not None:
            return "monitoring"
        if self._ref_first is None:
            return "warmup"
        return "reference"

    @property
    def reference(self) -> Reference | None:
        return self._reference

    @property
    def state(self) -> Tier:
        """The debounced tier after the last completed window."""
        return self._open.state if self._open is not None else Tier.OK

    @property
    def last_result(self) -> DriftResult | None:
        """The last completed window's result (None before the first)."""
        return self._open.result if self._open is not None else None

    def coarse_edges(self) -> np.ndarray | None:
        """The frozen coarse edges in value units (``-inf`` .. ``inf``), or None before freezing."""
        if self._reference is None:
            return None
        return self._reference.bins.edges(self.config.lo, self.config.hi)

    def seed_reference(self, fine_counts: Counts, first_step: int, last_step: int) -> None:
        """Add counts gathered elsewhere (the store's rows of steps this monitor has not seen,
        e.g. before a daemon restart) to the reference being learned."""
        if self._reference is not None:
            raise ValueError(f"drift monitor {self.name!r}: the reference is already frozen")
        self._ref_acc += self._check(fine_counts)
        self._ref_first = first_step if self._ref_first is None else min(self._ref_first, first_step)
        self._ref_last = last_step if self._ref_last is None else max(self._ref_last, last_step)

    def freeze_reference(
        self, fine_counts: Counts | None = None, *, first_step: int | None = None,
        last_step: int | None = None, bins: CoarseBins | None = None,
    ) -> Reference:
        """Freeze the reference: the given fine counts, or else what has accumulated so far.
        ``bins``: coarse bins frozen before (a reference restored from the store keeps its own
        edges even when the ``bins`` setting changed since); default: chosen from the counts.

        Freezing again replaces the reference and starts fresh windows and debounce histories.
        """
        if fine_counts is None:
            counts, first_step, last_step = self._ref_acc.copy(), self._ref_first, self._ref_last
        else:
            counts = self._check(fine_counts).astype(np.float64)
        if counts.sum() <= 0:
            where = "" if first_step is None else f" (steps {first_step}-{last_step})"
            raise ValueError(f"drift monitor {self.name!r}: the reference holds no values{where}")
        if bins is None:
            bins = freeze_coarse_bins(counts, self.config.bins,
                                      split_empty_tails=self.config.split_empty_tails)
        elif bins.fine != self.config.fine:
            raise ValueError(f"drift monitor {self.name!r}: coarse bins of a {bins.fine}-bin grid do not fit "
                             f"its {self.config.fine}-bin grid")
        self._reference = Reference(fine_counts=counts, bins=bins, counts=bins.coarsen(counts),
                                    first_step=first_step, last_step=last_step)
        self._open = _Open(bins.n_bins, self.config.debounce_m)
        self._shards.clear()
        return self._reference

    def add(self, step: int, fine_counts: Counts) -> list[DriftResult]:
        """Take one step's fine counts; return a result for each window this step completed."""
        counts = self._check(fine_counts)
        cfg = self.config
        if self._reference is None:
            if self.reference_steps is not None:
                first, last = self.reference_steps
                if step < first:
                    return []
                if step <= last:
                    self.seed_reference(counts, step, step)
                    if step == last:
                        self.freeze_reference()
                    return []
                if self._ref_acc.sum() <= 0:
                    raise ValueError(f"drift monitor {self.name!r}: no values in its reference steps "
                                     f"{first}-{last} (histograms arrive every histogram_every steps)")
                self.freeze_reference()
                return self._accumulate(self._open, step, counts, cfg.window_values)  # type: ignore[arg-type]
            if self._first_seen is None:
                self._first_seen = step
            offset = step - self._first_seen
            if offset < cfg.warmup_steps:
                return []
            end = cfg.warmup_steps + cfg.reference_steps
            enough = self._ref_acc.sum() >= cfg.min_reference_values
            if offset < end or not enough:
                self.seed_reference(counts, step, step)
                if offset >= end - 1 and self._ref_acc.sum() >= cfg.min_reference_values:
                    self.freeze_reference()
                return []
            # Steps jumped past the reference range with enough values: this step starts monitoring.
            self.freeze_reference()
        assert self._open is not None
        return self._accumulate(self._open, step, counts, cfg.window_values)

    def add_shard(self, shard: int, step: int, fine_counts: Counts) -> list[DriftResult]:
        """Take one step's fine counts of data shard ``shard``: each shard fills windows of its
        own (``shard_window_values``) that are judged against this monitor's reference and
        debounced per shard. Nothing is judged before the reference is frozen. At most
        ``MAX_SHARDS`` shards are followed; the one fed least recently is forgotten first."""
        counts = self._check(fine_counts)
        if self._reference is None:
            return []
        w = self._shards.get(shard)
        if w is None:
            if len(self._shards) >= MAX_SHARDS:
                self._shards.popitem(last=False)
            w = self._shards[shard] = _Open(self._reference.bins.n_bins, self.config.debounce_m)
        else:
            self._shards.move_to_end(shard)
        return self._accumulate(w, step, counts, self.config.shard_window_values,
                                f"{self.name}@shard{shard}")

    def worst_shard(self, step: int) -> tuple[int, DriftResult] | None:
        """The shard fed within ``SHARD_ACTIVE_STEPS`` of ``step`` whose debounced state is the
        highest (then whose last window's PSI is), with that window's result; None when no such
        shard has completed a window."""
        best: tuple[int, DriftResult] | None = None
        for shard, w in self._shards.items():
            r = w.result
            if r is None or w.last_fed < step - SHARD_ACTIVE_STEPS:
                continue
            if best is None or (w.state, r.psi) > (best[1].state, best[1].psi):
                best = (shard, replace(r, state=w.state))
        return best

    @property
    def shards_followed(self) -> int:
        return len(self._shards)

    def _accumulate(self, w: _Open, step: int, counts: np.ndarray, size: int,
                    name: str | None = None) -> list[DriftResult]:
        assert self._reference is not None
        w.counts += self._reference.bins.coarsen(counts)
        w.last_fed = step
        if w.first is None:
            w.first = step
        w.last = step
        if w.counts.sum() < size:
            return []
        result = self._evaluate(w, name or self.name)
        w.counts = np.zeros_like(w.counts)
        w.first = w.last = None
        return [result]

    def _evaluate(self, w: _Open, name: str) -> DriftResult:
        assert self._reference is not None
        assert w.first is not None and w.last is not None
        cfg = self.config
        ref, win = self._reference.counts, w.counts
        n, m = float(win.sum()), float(ref.sum())
        p, q = _smooth(ref, win, m, n, cfg.pseudocount)
        value = float(np.sum((q - p) * np.log(q / p)))
        # Underflow and overflow count as bins even when empty in both (the agreed rule); it
        # makes the threshold a little conservative when the grid is wide. Other bins count
        # when either histogram reaches them.
        bins_used = int(np.count_nonzero((ref[1:-1] > 0) | (win[1:-1] > 0))) + 2
        warn, critical = thresholds(
            bins_used, n, m, warn_quantile=cfg.warn_quantile, critical_quantile=cfg.critical_quantile,
            warn_floor=cfg.warn_floor, critical_floor=cfg.critical_floor,
        )
        tier = Tier.CRITICAL if value >= critical else Tier.WARNING if value >= warn else Tier.OK
        w.history.append(tier)
        state = Tier.OK
        for level in (Tier.CRITICAL, Tier.WARNING):
            if sum(t >= level for t in w.history) >= cfg.debounce_k:
                state = level
                break
        changed = state != w.state
        w.state = state
        w.result = DriftResult(
            monitor=name, first_step=w.first, last_step=w.last, n=round(n), m=round(m),
            bins_used=bins_used, psi=value, js_distance=_js(ref, win),
            warn_threshold=warn, critical_threshold=critical, tier=tier, state=state, changed=changed,
            counts=win.copy(),
        )
        return w.result

    def _check(self, fine_counts: Counts) -> np.ndarray:
        counts = np.asarray(fine_counts)
        expected = (self.config.fine + 2,)
        if counts.shape != expected:
            raise ValueError(f"drift monitor {self.name!r}: fine counts must have shape {expected}, "
                             f"got {counts.shape}")
        if counts.dtype.kind not in "iuf":
            raise ValueError(f"drift monitor {self.name!r}: fine counts must be numbers, got {counts.dtype}")
        # min() is NaN when any entry is NaN, so one reduction checks sign and NaN together.
        low = counts.min()
        if not low >= 0 or (counts.dtype.kind == "f" and not math.isfinite(float(counts.max()))):
            raise ValueError(f"drift monitor {self.name!r}: fine counts must be finite and >= 0")
        return counts
