"""Drift math: known vectors, scipy agreement, false-alarm rates without drift, detection delays,
coarse-bin freezing and config validation. Run with ``-s`` to see the measured rates."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr
from scipy.stats import chi2, norm

from runwatch.daemon.drift import (
    MAX_SHARDS,
    CoarseBins,
    DriftConfig,
    DriftMonitor,
    DriftResult,
    Tier,
    fine_counts,
    fine_edges,
    freeze_coarse_bins,
    js_distance,
    psi,
    psi_counts,
    smoothed_shares,
    thresholds,
)

# A copy of ../shared/testdata/psi_vectors.json (the team's reference values), kept in the repo
# so that a clean clone tests against it wherever it is checked out.
VECTORS = Path(__file__).resolve().parent / "data" / "psi_vectors.json"

Sampler = Callable[[np.random.Generator, int], np.ndarray]


def load_vectors() -> dict[str, dict]:
    assert VECTORS.is_file(), f"known PSI/JS vectors missing: {VECTORS}"
    return {v["id"]: v for v in json.loads(VECTORS.read_text())["vectors"]}


def step_counts(rng: np.random.Generator, sample: Sampler, steps: int, per_step: int,
                cfg: DriftConfig) -> np.ndarray:
    """Fine counts of ``steps`` steps of ``per_step`` values each, as the hook would stream them."""
    v = sample(rng, steps * per_step)
    idx = np.searchsorted(fine_edges(cfg.lo, cfg.hi, cfg.fine), v, side="right")
    row = np.repeat(np.arange(steps), per_step) * (cfg.fine + 2)
    return np.bincount(row + idx, minlength=steps * (cfg.fine + 2)).reshape(steps, cfg.fine + 2)


def feed(mon: DriftMonitor, counts: np.ndarray, first_step: int) -> list[DriftResult]:
    out: list[DriftResult] = []
    for i, c in enumerate(counts):
        out += mon.add(first_step + i, c)
    return out


# --- 1. known vectors -----------------------------------------------------------------------


def test_known_vectors_psi_and_js() -> None:
    vectors = load_vectors()
    checked = 0
    for v in vectors.values():
        if "psi" in v:
            assert psi(v["reference"], v["current"]) == pytest.approx(v["psi"], rel=1e-12), v["id"]
            checked += 1
        if "js_distance_base2" in v:
            d = js_distance(v["reference"], v["current"])
            assert d == pytest.approx(v["js_distance_base2"], rel=1e-9), v["id"]
            assert d**2 == pytest.approx(v["js_divergence_base2"], rel=1e-9), v["id"]
            checked += 1
    assert checked >= 4


def test_known_vectors_disjoint_tail_under_the_empty_bin_rule() -> None:
    v = load_vectors()["disjoint-tail"]
    ref, cur = np.array(v["reference"]), np.array(v["current"])
    # Shares alone carry no sample size, so no smoothing: one-sided empty bins make PSI infinite.
    assert psi(ref, cur) == math.inf
    # As counts of 100 values each, the rule adds 0.5 to every count: 25.5 and 0.5 out of 102.5.
    # Two bins differ, each by 25/102.5 in share, with log ratio ln(25.5 / 0.5), in opposite
    # directions, so both terms are positive and equal.
    expected = 2 * (25.0 / 102.5) * math.log(25.5 / 0.5)
    got = psi_counts(ref * 100, cur * 100)
    assert math.isfinite(got)
    assert got == pytest.approx(expected, rel=1e-12)
    # The extra share is pseudocount / min(N, M): a reference 10x larger changes nothing.
    assert psi_counts(ref * 1000, cur * 100) == pytest.approx(expected, rel=1e-12)
    # JS needs no rule: its mixture is never empty where either side has mass.
    assert js_distance(ref, cur) == pytest.approx(v["js_distance_base2"], rel=1e-12)


def test_empty_in_both_bins_are_dropped() -> None:
    p, q = smoothed_shares([10, 0, 30, 0], [20, 0, 20, 0])
    assert p.size == 2 and q.size == 2
    assert psi_counts([10, 0, 30, 0], [20, 0, 20, 0]) == pytest.approx(psi_counts([10, 30], [20, 20]))
    # psi on shares ignores bins empty on both sides too.
    assert psi([0.5, 0.0, 0.5], [0.6, 0.0, 0.4]) == pytest.approx(psi([0.5, 0.5], [0.6, 0.4]))


# --- 2. scipy agreement ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_psi_and_js_agree_with_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    b = int(rng.integers(2, 60))
    p = rng.dirichlet(np.full(b, 0.7))
    q = rng.dirichlet(np.full(b, 0.7))
    p, q = np.maximum(p, 1e-12), np.maximum(q, 1e-12)  # strictly positive
    p, q = p / p.sum(), q / q.sum()
    want = float(np.sum(rel_entr(q, p) + rel_entr(p, q)))
    assert psi(p, q) == pytest.approx(want, rel=1e-10, abs=1e-14)
    assert psi(p * 1234.5, q * 7.0) == pytest.approx(want, rel=1e-10, abs=1e-14)  # counts normalised
    assert psi(p, q) == pytest.approx(psi(q, p), rel=1e-12)  # symmetric
    assert js_distance(p, q) == pytest.approx(float(jensenshannon(p, q, base=2)), rel=1e-12)
    # With zeros in the inputs JS is still scipy's, and bounded.
    pz, qz = p.copy(), q.copy()
    pz[rng.integers(0, b)] = 0.0
    assert js_distance(pz, qz) == pytest.approx(float(jensenshannon(pz, qz, base=2)), rel=1e-12)
    assert 0.0 <= js_distance(pz, qz) <= 1.0
    # The empty-bin rule with N == M is "add 0.5 to every count", checked against scipy.
    counts_p = rng.integers(0, 50, size=b).astype(float)
    counts_q = rng.integers(0, 50, size=b).astype(float)
    counts_q *= counts_p.sum() / counts_q.sum()
    used = (counts_p > 0) | (counts_q > 0)
    sp = (counts_p[used] + 0.5) / (counts_p[used] + 0.5).sum()
    sq = (counts_q[used] + 0.5) / (counts_q[used] + 0.5).sum()
    want = float(np.sum(rel_entr(sq, sp) + rel_entr(sp, sq)))
    assert psi_counts(counts_p, counts_q) == pytest.approx(want, rel=1e-10, abs=1e-14)


def test_thresholds_formula() -> None:
    warn, crit = thresholds(12, 64, 100_000)
    scale = 1 / 64 + 1 / 100_000
    assert warn == pytest.approx(chi2.ppf(0.99, 11) * scale)
    assert crit == pytest.approx(chi2.ppf(0.999, 11) * scale)
    # Large windows: the effect-size floors decide.
    assert thresholds(12, 100_000, 100_000) == (0.1, 0.25)
    warn, crit = thresholds(5, 200, 1000, warn_quantile=0.95, critical_quantile=0.99, warn_floor=0.0,
                            critical_floor=0.0)
    assert warn == pytest.approx(chi2.ppf(0.95, 4) * (1 / 200 + 1 / 1000))
    assert crit == pytest.approx(chi2.ppf(0.99, 4) * (1 / 200 + 1 / 1000))


# --- 3. no drift: false alarms --------------------------------------------------------------

NO_DRIFT_SIZES = (64, 256, 1024, 4096)
NO_DRIFT_WINDOWS = 1000
REFERENCE_VALUES = 32_768


def _t5(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.standard_t(5, n)  # heavy tails: under/overflow of [-6, 6] get ~0.2% of values


def _gamma(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.gamma(2.0, 1.0, n)  # skewed, like per-token loss; nothing below the grid


@pytest.mark.parametrize(("name", "sample", "lo", "hi"),
                         [("t5", _t5, -6.0, 6.0), ("gamma2", _gamma, 0.0, 12.0)])
def test_no_drift_false_alarm_rate(name: str, sample: Sampler, lo: float, hi: float) -> None:
    rates: list[tuple[int, float, float]] = []
    lines = []
    for size in NO_DRIFT_SIZES:
        rng = np.random.default_rng([size, len(name)])
        per_step = size // 4  # four steps a window, so N is exactly the window size
        ref_steps = REFERENCE_VALUES // per_step
        cfg = DriftConfig(lo=lo, hi=hi, warmup_steps=10, reference_steps=ref_steps, window_values=size)
        mon = DriftMonitor(name, cfg)
        stream = step_counts(rng, sample, 10 + ref_steps + 4 * NO_DRIFT_WINDOWS, per_step, cfg)
        results = feed(mon, stream, first_step=0)
        assert len(results) == NO_DRIFT_WINDOWS
        assert all(r.n == size and r.m == REFERENCE_VALUES for r in results)
        raw = float(np.mean([r.tier >= Tier.WARNING for r in results]))
        debounced = float(np.mean([r.state >= Tier.WARNING for r in results]))
        critical = float(np.mean([r.tier >= Tier.CRITICAL for r in results]))
        mean_psi = float(np.mean([r.psi for r in results]))
        # Expected PSI without drift, from the bins that actually carry reference mass.
        b = int(np.count_nonzero(mon.reference.counts))
        expected = (b - 1) * (1 / size + 1 / REFERENCE_VALUES)
        rates.append((size, raw, debounced))
        lines.append(f"{name} N={size:5d}: warning raw {raw:.2%}, debounced {debounced:.2%}, critical raw "
                     f"{critical:.2%}; mean PSI {mean_psi:.4f} (expected ~{expected:.4f}), warn threshold "
                     f"{results[0].warn_threshold:.3f}, {len(results)} windows")
    report = "\n".join(lines)
    print("\n" + report)
    for size, raw, debounced in rates:
        assert raw <= 0.01, f"raw warning rate above 1% at N={size}:\n{report}"
        assert debounced <= 0.01, f"debounced warning rate above 1% at N={size}:\n{report}"


def test_mean_psi_without_drift_matches_chi_square_expectation() -> None:
    # The tiers rest on (N*M/(N+M)) * PSI being about chi-square(B-1); check its mean on a
    # grid where every coarse bin holds mass, so B is unambiguous.
    rng = np.random.default_rng(7)
    cfg = DriftConfig(lo=-2.0, hi=2.0, warmup_steps=0, reference_steps=64, window_values=256)
    mon = DriftMonitor("x", cfg)
    results = feed(mon, step_counts(rng, lambda r, n: r.normal(size=n), 64 + 4 * 2000, 64, cfg), 0)
    b = int(np.count_nonzero(mon.reference.counts))
    assert b == 12
    scaled = np.array([r.psi * r.n * r.m / (r.n + r.m) for r in results])
    print(f"\nmean of N*M/(N+M)*PSI = {scaled.mean():.2f} (chi-square mean B-1 = {b - 1}), "
          f"99th percentile {np.quantile(scaled, 0.99):.2f} (chi2.ppf(0.99) = {chi2.ppf(0.99, b - 1):.2f})")
    assert scaled.mean() == pytest.approx(b - 1, rel=0.1)
    assert np.quantile(scaled, 0.99) == pytest.approx(chi2.ppf(0.99, b - 1), rel=0.15)


# --- 4. drift detected ----------------------------------------------------------------------

DETECT_WITHIN_WINDOWS = 3  # counting the window that straddles the change


def _normal(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.normal(0.0, 1.0, n)


def _shifted(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.normal(0.5, 1.0, n)  # half a standard deviation


def _wider(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.normal(0.0, 1.5, n)


def _new_mode(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(0.0, 1.0, n)
    moved = rng.random(n) < 0.10  # 10% of the mass at a place the reference never reached
    v[moved] = rng.normal(5.5, 0.2, int(moved.sum()))
    return v


def _run_change(after: Sampler, size: int, seed: int, split_empty_tails: bool = True
                ) -> tuple[list[DriftResult], int, int]:
    rng = np.random.default_rng(seed)
    per_step = size // 4
    cfg = DriftConfig(lo=-8.0, hi=8.0, warmup_steps=5, reference_steps=REFERENCE_VALUES // per_step,
                      window_values=size, split_empty_tails=split_empty_tails)
    mon = DriftMonitor("drift", cfg)
    before_steps = 5 + cfg.reference_steps + 4 * 20 + 2  # 20 windows, then the change mid-window
    results = feed(mon, step_counts(rng, _normal, before_steps, per_step, cfg), 0)
    after_results = feed(mon, step_counts(rng, after, 4 * 12, per_step, cfg), before_steps)
    return results + after_results, before_steps, len(results)


@pytest.mark.parametrize("size", [256, 1024])
@pytest.mark.parametrize(("change", "after"), [("mean +0.5 sd", _shifted), ("sd x1.5", _wider),
                                               ("10% new mode", _new_mode)])
def test_drift_detected_within_bound(change: str, after: Sampler, size: int) -> None:
    results, change_step, n_before = _run_change(after, size, seed=size)
    before, later = results[:n_before], results[n_before:]
    assert all(r.state == Tier.OK for r in before), f"{change}: alarm before the change"
    detected = next((i for i, r in enumerate(later) if r.state >= Tier.WARNING), None)
    print(f"\n{change} at N={size}: detected in window {None if detected is None else detected + 1} "
          f"after the change; PSI {[round(r.psi, 3) for r in later[:4]]}, "
          f"warn {later[0].warn_threshold:.3f}, tiers {[r.tier.name for r in later[:4]]}")
    assert detected is not None and detected < DETECT_WITHIN_WINDOWS, (
        f"{change} at N={size} not detected within {DETECT_WITHIN_WINDOWS} windows: "
        f"{[(round(r.psi, 3), r.tier.name, r.state.name) for r in later[:6]]}")
    hit = later[detected]
    assert hit.changed and hit.last_step >= change_step
    # It stays detected while the drift lasts.
    assert all(r.state >= Tier.WARNING for r in later[detected:])


def test_new_mode_in_an_empty_tail_needs_its_own_bin() -> None:
    # Without split_empty_tails the new mode is merged into the top equal-mass bin: one bin's
    # share goes from 0.1 to ~0.19, PSI ~0.067, below the 0.1 warning floor at any N.
    merged, _, n_before = _run_change(_new_mode, 1024, seed=3, split_empty_tails=False)
    assert all(r.psi < 0.1 and r.state == Tier.OK for r in merged[n_before + 1:])
    split, _, n_before = _run_change(_new_mode, 1024, seed=3, split_empty_tails=True)
    assert all(r.tier == Tier.CRITICAL for r in split[n_before + 1:])


def test_debounce_k_of_m_and_resolve() -> None:
    fine = 16
    cfg = DriftConfig(lo=0.0, hi=1.0, fine=fine, bins=4, warmup_steps=0, reference_steps=1,
                      window_values=1000, debounce_k=2, debounce_m=3)
    ref = np.zeros(fine + 2)
    ref[1 : fine + 1] = 1000
    mon = DriftMonitor("d", cfg, reference=ref)
    same = ref / ref.sum() * 1000
    bad = np.zeros(fine + 2)
    bad[1:3] = 500  # all mass in the first coarse bin: PSI far above critical
    pattern = [bad, same, bad, same, same, bad, bad, same, same, same]
    results = [mon.add(i, w)[0] for i, w in enumerate(pattern)]
    assert [r.tier.name for r in results] == ["CRITICAL", "OK", "CRITICAL", "OK", "OK", "CRITICAL",
                                              "CRITICAL", "OK", "OK", "OK"]
    assert [r.state.name for r in results] == ["OK", "OK", "CRITICAL", "OK", "OK", "OK", "CRITICAL",
                                               "CRITICAL", "OK", "OK"]
    assert [r.changed for r in results] == [False, False, True, True, False, False, True, False, True,
                                            False]
    assert mon.state == Tier.OK


# --- 5. coarse bins, under/overflow, windows ------------------------------------------------


def test_fine_counts_puts_every_value_somewhere() -> None:
    lo, hi, fine = -1.0, 1.0, 8
    values = [-100.0, -math.inf, lo, 0.0, 0.999, hi, 100.0, math.inf, math.nan]
    c = fine_counts(values, lo, hi, fine)
    assert c.shape == (fine + 2,)
    assert c[0] == 2  # -100, -inf
    assert c[-1] == 3  # hi itself, 100, inf: bins are [a, b), like torch.bucketize(right=True)
    assert c[1] == 1 and c[5] == 1 and c[8] == 1  # lo, 0.0, 0.999
    assert c.sum() == len(values) - 1  # NaN dropped


def test_quantile_merge_gives_equal_reference_mass() -> None:
    lo, hi, fine, bins = -4.0, 4.0, 128, 10
    # The exact expected counts of a normal reference, so the bound below is deterministic.
    probs = np.diff(norm.cdf(np.concatenate([[-np.inf], fine_edges(lo, hi, fine), [np.inf]])))
    ref = probs * 1e6
    cb = freeze_coarse_bins(ref, bins)
    coarse = cb.coarsen(ref)
    assert cb.starts[:2] == (0, 1) and cb.starts[-1] == fine + 1  # under/overflow are their own bins
    assert coarse[0] == pytest.approx(ref[0]) and coarse[-1] == pytest.approx(ref[-1])
    assert coarse.sum() == pytest.approx(ref.sum())
    inner = coarse[1:-1] / ref[1 : fine + 1].sum()
    assert inner.size == bins
    # Each cut sits on the fine edge nearest its quantile, so no inner bin misses 1/B by more
    # than the largest fine bin's share.
    tolerance = ref[1 : fine + 1].max() / ref[1 : fine + 1].sum()
    assert np.all(np.abs(inner - 1 / bins) <= tolerance), (inner, tolerance)
    assert np.all(np.abs(inner - 1 / bins) <= 0.25 / bins)
    edges = cb.edges(lo, hi)
    assert edges[0] == -math.inf and edges[1] == lo and edges[-2] == hi and edges[-1] == math.inf
    assert edges[len(edges) // 2] == pytest.approx(0.0, abs=(hi - lo) / fine)  # the median


def test_empty_tails_and_degenerate_references() -> None:
    fine = 64
    ref = np.zeros(fine + 2)
    ref[20:40] = 50
    cb = freeze_coarse_bins(ref, 10)
    # underflow, empty low [1, 20), 10 equal bins over 20..39 (two fine bins each), empty high, overflow
    assert cb.starts == (0, 1, 20, 22, 24, 26, 28, 30, 32, 34, 36, 38, 40, fine + 1)
    assert freeze_coarse_bins(ref, 10, split_empty_tails=False).starts == (
        0, 1, 22, 24, 26, 28, 30, 32, 34, 36, 38, fine + 1)
    # One fine bin holds everything: no empty inner bins are made up.
    one = np.zeros(fine + 2)
    one[30] = 1000
    cb = freeze_coarse_bins(one, 10)
    assert cb.starts == (0, 1, 30, 31, fine + 1)
    assert list(cb.coarsen(one)) == [0, 0, 1000, 0, 0]
    # Lumpy mass: fewer than B quantile bins, none of them empty.
    lumpy = np.zeros(fine + 2)
    lumpy[[10, 11, 30]] = [10, 10, 980]
    cb = freeze_coarse_bins(lumpy, 10)
    assert cb.starts == (0, 1, 10, 12, 31, fine + 1)
    assert list(cb.coarsen(lumpy)) == [0, 0, 20, 980, 0, 0]
    with pytest.raises(ValueError, match="starts"):
        CoarseBins(starts=(0, 2, fine + 1), fine=fine)


def test_values_outside_the_grid_are_counted_and_raise_psi() -> None:
    cfg = DriftConfig(lo=-3.0, hi=3.0, warmup_steps=0, reference_steps=1, window_values=1000)
    rng = np.random.default_rng(11)
    mon = DriftMonitor("x", cfg, reference=fine_counts(rng.normal(size=50_000), cfg.lo, cfg.hi, cfg.fine))
    ref = mon.reference
    assert ref is not None and ref.first_step is None
    window = fine_counts(np.concatenate([rng.normal(size=900), np.full(50, -10.0), np.full(50, 10.0)]),
                         cfg.lo, cfg.hi, cfg.fine)
    [r] = mon.add(0, window)
    assert r.counts[0] >= 50 and r.counts[-1] >= 50 and r.n == 1000
    assert r.tier == Tier.CRITICAL


def test_phases_windows_and_reference_range() -> None:
    fine = 8
    cfg = DriftConfig(lo=0.0, hi=1.0, fine=fine, bins=4, warmup_steps=10, reference_steps=5,
                      min_reference_values=10, window_values=25)
    mon = DriftMonitor("x", cfg)
    junk = np.zeros(fine + 2, dtype=np.int64)
    junk[-1] = 1000  # warm-up values must not reach the reference
    good = np.zeros(fine + 2, dtype=np.int64)
    good[1 : fine + 1] = 1
    for step in range(100, 110):
        assert mon.add(step, junk) == [] and mon.phase == "warmup"
    for step in range(110, 115):
        assert mon.add(step, good) == []
    assert mon.phase == "monitoring"
    ref = mon.reference
    assert ref is not None and (ref.first_step, ref.last_step) == (110, 114)
    assert ref.m == 5 * fine and ref.counts[-1] == 0
    edges = mon.coarse_edges()
    assert edges is not None and edges.size == ref.bins.n_bins + 1
    assert edges[0] == -math.inf and edges[1] == 0.0 and edges[-2] == 1.0 and edges[-1] == math.inf
    # 8 values a step: a window closes on the step that reaches 25 values (4 steps, N = 32).
    out = [r for step in range(115, 127) for r in mon.add(step, good)]
    assert [(r.first_step, r.last_step, r.n) for r in out] == [(115, 118, 32), (119, 122, 32), (123, 126, 32)]
    assert all(r.psi == pytest.approx(0.0, abs=1e-12) and r.js_distance == pytest.approx(0.0, abs=1e-7)
               for r in out)
    # Freezing anew replaces the reference and restarts windows and debounce.
    mon.freeze_reference(good * 3)
    assert mon.reference.m == 3 * fine and mon.state == Tier.OK


def test_reference_waits_for_enough_values() -> None:
    fine = 8
    cfg = DriftConfig(lo=0.0, hi=1.0, fine=fine, bins=2, warmup_steps=0, reference_steps=2,
                      min_reference_values=30, window_values=8)
    mon = DriftMonitor("x", cfg)
    good = np.zeros(fine + 2, dtype=np.int64)
    good[1 : fine + 1] = 1
    for step in range(4):
        assert mon.add(step, good) == []
    assert mon.phase == "monitoring" and mon.reference.m == 32
    assert len(mon.add(4, good)) == 1


# --- 6. validation --------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("lo", math.nan), ("hi", -5.0), ("fine", 0), ("fine", 1.5), ("bins", 0), ("bins", 129),
    ("split_empty_tails", "yes"), ("warmup_steps", -1), ("reference_steps", 0),
    ("min_reference_values", 0), ("window_values", 0), ("window_values", True), ("pseudocount", 0.0),
    ("warn_quantile", 1.0), ("critical_quantile", 0.5), ("critical_quantile", 1.0), ("warn_floor", -0.1),
    ("critical_floor", 0.05), ("debounce_m", 0), ("debounce_k", 0), ("debounce_k", 4),
])
def test_bad_config_names_the_field(field: str, value: object) -> None:
    kwargs: dict[str, object] = {"lo": 0.0, "hi": 1.0, field: value}
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        DriftConfig(**kwargs)  # type: ignore[arg-type]


def test_bad_counts_are_refused() -> None:
    mon = DriftMonitor("x", DriftConfig(lo=0.0, hi=1.0, fine=8, warmup_steps=0, reference_steps=1, bins=2))
    with pytest.raises(ValueError, match="shape"):
        mon.add(0, np.ones(9))
    with pytest.raises(ValueError, match=">= 0"):
        mon.add(0, -np.ones(10))
    with pytest.raises(ValueError, match="finite"):
        mon.add(0, np.full(10, np.nan))
    with pytest.raises(ValueError, match="no values"):
        mon.freeze_reference(np.zeros(10))


# --- references from a step range, restored bins, data shards ---------------------------------


def test_reference_from_an_absolute_step_range() -> None:
    """``reference_steps`` takes exactly the steps in the range, whatever warm-up says, and
    freezes at its last step; steps before it are ignored."""
    fine = 8
    cfg = DriftConfig(lo=0.0, hi=1.0, fine=fine, bins=4, warmup_steps=1000, reference_steps=1000,
                      min_reference_values=10_000, window_values=16)
    mon = DriftMonitor("x", cfg, reference_steps=(20, 29))
    junk = np.zeros(fine + 2, dtype=np.int64)
    junk[-1] = 100
    good = np.zeros(fine + 2, dtype=np.int64)
    good[1 : fine + 1] = 1
    for step in range(0, 20):
        assert mon.add(step, junk) == [] and mon.phase == "warmup"
    for step in range(20, 30):
        mon.add(step, good)
    ref = mon.reference
    assert ref is not None and (ref.first_step, ref.last_step) == (20, 29) and ref.counts[-1] == 0
    assert ref.m == 10 * fine  # min_reference_values does not apply to a range the user chose
    [r] = [r for step in range(30, 32) for r in mon.add(step, good)]
    assert r.psi == pytest.approx(0.0, abs=1e-12)
    # A range that holds nothing is an error that names it, not a silent empty reference.
    empty = DriftMonitor("y", cfg, reference_steps=(5, 6))
    with pytest.raises(ValueError, match=r"'y'.*no values in its reference steps 5-6"):
        empty.add(40, good)
    with pytest.raises(ValueError, match="first <= last"):
        DriftMonitor("z", cfg, reference_steps=(9, 3))


def test_a_reference_restored_with_its_bins_judges_like_the_original() -> None:
    cfg = DriftConfig(lo=-4, hi=4, warmup_steps=0, reference_steps=1, min_reference_values=1,
                      window_values=512)
    rng = np.random.default_rng(3)
    ref_counts = fine_counts(rng.normal(size=20_000), -4, 4, 128)
    a = DriftMonitor("a", cfg, ref_counts)
    assert a.reference is not None
    # Settings changed since (20 bins): a restored reference keeps the bins it was frozen with.
    b = DriftMonitor("b", DriftConfig(**{**cfg.__dict__, "bins": 20}))
    b.freeze_reference(a.reference.fine_counts, first_step=5, last_step=9, bins=a.reference.bins)
    assert b.reference is not None and b.reference.bins == a.reference.bins
    assert (b.reference.first_step, b.reference.last_step) == (5, 9)
    window = fine_counts(rng.normal(0.3, 1, 600), -4, 4, 128)
    [ra], [rb] = a.add(1, window), b.add(1, window)
    assert ra.psi == rb.psi and ra.warn_threshold == rb.warn_threshold
    with pytest.raises(ValueError, match="do not fit"):
        DriftMonitor("c", DriftConfig(lo=0, hi=1, fine=16)).freeze_reference(
            np.ones(18), bins=a.reference.bins)


def test_shard_windows_name_the_shard_from_another_distribution() -> None:
    """Shards are judged against the monitor's one reference in windows of their own: the shard
    whose data is shifted is the worst, the healthy ones stay ok, and memory stays bounded."""
    cfg = DriftConfig(lo=-6, hi=6, warmup_steps=0, reference_steps=1, min_reference_values=1,
                      window_values=4096, shard_window_values=256)
    rng = np.random.default_rng(11)
    mon = DriftMonitor("seq", cfg, fine_counts(rng.normal(size=50_000), -6, 6, 128))
    per_shard: dict[int, list[DriftResult]] = {}
    step = 0
    for _turn in range(6):
        for shard in (3, 7, 12):
            mean = 1.5 if shard == 7 else 0.0
            step += 1
            per_shard.setdefault(shard, []).extend(
                mon.add_shard(shard, step, fine_counts(rng.normal(mean, 1, 128), -6, 6, 128)))
    assert all(len(rs) == 3 for rs in per_shard.values())  # 6 x 128 values = 3 windows of 256
    assert per_shard[7][-1].state == Tier.CRITICAL and per_shard[7][-1].monitor == "seq@shard7"
    assert all(r.state == Tier.OK for s in (3, 12) for r in per_shard[s])
    worst = mon.worst_shard(step)
    assert worst is not None and worst[0] == 7 and worst[1].state == Tier.CRITICAL
    # A shard not read for a while no longer counts; the others still do.
    assert mon.worst_shard(step + 10_000) is None
    # However many shards go by, at most MAX_SHARDS are followed.
    for shard in range(1000, 1300):
        mon.add_shard(shard, step, fine_counts(rng.normal(size=8), -6, 6, 128))
    assert mon.shards_followed == MAX_SHARDS
    # Before a reference exists nothing is judged.
    fresh = DriftMonitor("f", cfg)
    assert fresh.add_shard(1, 0, fine_counts(rng.normal(size=1000), -6, 6, 128)) == []
