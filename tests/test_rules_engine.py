"""Rule semantics, step by step, through the same engine the daemon runs (no daemon needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from runwatch.daemon.rules.engine import Engine, StreamRef
from runwatch.daemon.rules.fixture import Case, run_case
from runwatch.daemon.rules.spec import LoadedRule, parse_rule_text


def rules(text: str) -> list[LoadedRule]:
    return parse_rule_text("rules:\n" + text, Path("t.yaml"))


def judge(
    rule_text: str, series: dict[str, Any], engine: Engine | None = None, **case: Any
) -> list[tuple[int, str, str, str]]:
    engine = engine or Engine(rules(rule_text))
    c = Case.model_validate({"name": "t", "series": series, **case})
    return [(i, e.rule, e.state, e.metric) for i, e in run_case(c, engine)]


SPIKE = """\
  - name: spike
    metric: grad_norm
    baseline: {stat: median, window: 32 steps, min_samples: 16}
    when: ratio >= 3
    severity: warning
"""


def test_for_n_steps_fires_on_the_nth_and_resolves_on_the_first_false_step() -> None:
    text = SPIKE.replace("severity", "for: 3 steps\n    severity")
    assert judge(text, {"grad_norm": "1x40 5x2 1 5x4 1x3"}) == [
        (45, "spike", "firing", "grad_norm"),
        (47, "spike", "resolved", "grad_norm"),
    ]


def test_for_steps_with_a_time_floor() -> None:
    text = SPIKE.replace("severity", "for: 2 steps, at least 25s\n    severity")
    assert judge(text, {"grad_norm": "1x40 5x2 1 5x4 1"}, interval="10s") == [
        (46, "spike", "firing", "grad_norm"),
        (47, "spike", "resolved", "grad_norm"),
    ]


def test_for_seconds_counts_time_not_steps() -> None:
    text = SPIKE.replace("severity", "for: 20s\n    severity")
    assert judge(text, {"grad_norm": "1x40 5x4 1"}, interval="10s") == [
        (42, "spike", "firing", "grad_norm"),
        (44, "spike", "resolved", "grad_norm"),
    ]


def test_delta_is_change_per_step_across_gaps() -> None:
    text = """\
  - name: jump
    metric: learning_rate/0
    when: delta > 0.5
    severity: info
"""
    # 1 -> 3 over two steps (a missing step between) is +1 per step: fires; +0.4 per step does not.
    assert judge(text, {"learning_rate/0": "1 _ 3 3.4 3.8"}) == [
        (2, "jump", "firing", "learning_rate/0"),
        (3, "jump", "resolved", "learning_rate/0"),
    ]


def test_frozen_baseline_holds_what_it_learned() -> None:
    text = SPIKE.replace("min_samples: 16}", "min_samples: 16, frozen: [10, 39]}").replace(">= 3", ">= 2")
    # A slow rise to 3x after the range: a rolling median would follow it; the frozen one does not.
    events = judge(text, {"grad_norm": "1x50 1+0.05x60"})
    assert events == [(70, "spike", "firing", "grad_norm")]
    assert judge(text, {"grad_norm": "5x10 1x30 5"}) == [(40, "spike", "firing", "grad_norm")]


def test_ema_and_time_window_baselines() -> None:
    ema = SPIKE.replace("stat: median, window: 32 steps", "stat: ema, window: 16 steps")
    assert judge(ema, {"grad_norm": "1x40 4 1"}, noise=0.05) == [
        (40, "spike", "firing", "grad_norm"),
        (41, "spike", "resolved", "grad_norm"),
    ]
    timed = SPIKE.replace("window: 32 steps", "window: 60s")
    assert judge(timed, {"grad_norm": "1x40 4 1"}, noise=0.05, interval="2s") == [
        (40, "spike", "firing", "grad_norm"),
        (41, "spike", "resolved", "grad_norm"),
    ]


def test_zscore_uses_the_spread_of_the_window() -> None:
    text = """\
  - name: z
    metric: loss
    baseline: {stat: mean, window: 64 steps, min_samples: 32}
    when: zscore > 6
    severity: warning
"""
    # 10% noise: a 1.3x value is 3 sigma (quiet), a 2x value is 10 sigma.
    assert judge(text, {"loss": "1x100 1.3 1x5 2 1"}, noise=0.1, seed=3) == [
        (106, "z", "firing", "loss"),
        (107, "z", "resolved", "loss"),
    ]


def test_nonfinite_values_neither_fire_baseline_rules_nor_poison_the_baseline() -> None:
    assert judge(SPIKE, {"grad_norm": "1x40 nan inf 1x5 5"}) == [(47, "spike", "firing", "grad_norm")]


def test_same_events_whether_steps_come_one_by_one_or_in_frames() -> None:
    series = {"grad_norm": "1x100 6 1x30 4 1x50 9 9 1x20"}
    one = judge(SPIKE, series, noise=0.05, seed=1)
    assert one and one == judge(SPIKE, series, noise=0.05, seed=1, batch=7)
    assert one == judge(SPIKE, series, noise=0.05, seed=1, batch=64)


def test_a_replayed_step_is_not_judged_twice() -> None:
    engine = Engine(rules(SPIKE))
    ref = StreamRef(1, "r", 0)
    names = ("grad_norm",)
    steps = np.arange(40)
    values = np.ones((40, 1))
    values[35] = 9
    first = engine.observe(ref, 0, names, steps, steps * 1.0, values, now=40)
    again = engine.observe(ref, 0, names, steps[30:], steps[30:] * 1.0, values[30:], now=41)
    assert [(e.step, e.state) for e in first] == [(35, "firing"), (36, "resolved")]
    assert again == []


def test_glob_rules_judge_each_metric_and_pick_up_new_ones() -> None:
    text = SPIKE.replace("metric: grad_norm", 'metric: "group_grad_norm/*"')
    series = {"group_grad_norm/a": "1x60 7 1", "group_grad_norm/b": "_x20 2x40 2 9"}
    assert judge(text, series) == [
        (60, "spike", "firing", "group_grad_norm/a"),
        (61, "spike", "resolved", "group_grad_norm/a"),
        (61, "spike", "firing", "group_grad_norm/b"),
    ]


def test_composite_any_and_all() -> None:
    text = """\
  - name: both
    severity: warning
    when:
      {mode}:
        - {{metric: a, when: value > 1}}
        - {{metric: b, when: value > 1}}
"""
    series = {"a": "0 2 2 0", "b": "0 0 2 2"}
    assert judge(text.format(mode="all"), series) == [
        (2, "both", "firing", "a"),
        (3, "both", "resolved", "a"),
    ]
    assert judge(text.format(mode="any"), series) == [(1, "both", "firing", "a")]


def test_run_and_rank_selectors() -> None:
    text = SPIKE.replace("severity", "run: 'llama-*'\n    rank: [0, 1]\n    severity")
    series = {"grad_norm": "1x40 9"}
    assert judge(text, series, run="llama-7b", rank=1)
    assert not judge(text, series, run="llama-7b", rank=2)
    assert not judge(text, series, run="gpt", rank=0)


def test_stall_needs_a_history_of_arrivals_and_a_connection() -> None:
    text = """\
  - name: stalled
    when: absent
    for: 3x interval
    severity: critical
"""
    assert judge(text, {"loss": "1x10 _x5 1"}) == [
        (12, "stalled", "firing", ""),
        (15, "stalled", "resolved", ""),
    ]
    assert judge(text, {"loss": "1x2 _x5 1"}) == []  # two arrivals: no usual interval yet
    engine = Engine(rules(text))
    ref = StreamRef(1, "r", 0)
    for i in range(10):
        engine.observe(ref, 0, ("loss",), np.array([i]), np.array([float(i)]), np.ones((1, 1)), now=float(i))
    assert engine.tick(100.0, connected=[]) == []  # the hook went away: a finished run is not a stall


def test_reload_keeps_unchanged_state_and_resolves_what_changed() -> None:
    engine = Engine(rules(SPIKE))
    ref = StreamRef(1, "r", 0)

    def feed(start: int, vals: list[float]) -> list[tuple[int, str, str]]:
        steps = np.arange(start, start + len(vals))
        out = engine.observe(
            ref, 0, ("grad_norm",), steps, steps * 1.0, np.array(vals)[:, None], now=float(start)
        )
        return [(e.step, e.rule, e.state) for e in out]

    assert feed(0, [1.0] * 40 + [9.0]) == [(40, "spike", "firing")]
    assert engine.load(rules(SPIKE)) == []  # same rule: still firing, still warm
    assert feed(41, [1.0]) == [(41, "spike", "resolved")]
    assert feed(42, [9.0]) == [(42, "spike", "firing")]
    changed = engine.load(rules(SPIKE.replace(">= 3", ">= 20")))
    assert [(e.rule, e.state) for e in changed] == [("spike", "resolved")]
    assert "rule changed" in changed[0].summary
    assert feed(43, [1.0, 30.0]) == [(44, "spike", "firing")]  # the baseline survived the change
    gone = engine.load([])
    assert [(e.rule, e.state) for e in gone] == [("spike", "resolved")] and engine.active() == []


def test_window_memory_is_bounded() -> None:
    engine = Engine(rules(SPIKE))
    ref = StreamRef(1, "r", 0)
    for start in range(0, 20_000, 1000):
        steps = np.arange(start, start + 1000)
        engine.observe(ref, 0, ("grad_norm",), steps, steps * 1.0, np.ones((1000, 1)), now=float(start))
    [state] = engine._states.values()
    window = state.leaves[0].window
    assert window is not None and window.history().shape == (32, 1)
    assert window._buf.shape[0] <= 2 * 32 + 1000  # room for one batch, never the whole run


def test_a_glob_rule_survives_metric_sets_that_hold_some_of_its_columns() -> None:
    # The hook splits blocks by which values are present: a warm glob rule then sees a set
    # with one of its two columns, in another order, then both again.
    text = SPIKE.replace("metric: grad_norm", 'metric: "activation_norm/*"')
    series = {"activation_norm/a": "1x40 _x5 1x5", "activation_norm/b": "1x45 9 1x4"}
    assert judge(text, series) == [
        (45, "spike", "firing", "activation_norm/b"),
        (46, "spike", "resolved", "activation_norm/b"),
    ]


def test_a_summary_that_cannot_be_formatted_is_refused_at_load() -> None:
    import pytest

    from runwatch.daemon.rules.spec import RuleError

    for bad in ("{metric.foo}", "{step:c}x{value:d}"):
        with pytest.raises(RuleError, match="cannot be formatted"):
            rules(SPIKE.replace("severity", f"summary: '{bad}'\n    severity"))


def test_reload_from_ratio_to_zscore_on_the_same_baseline_starts_a_spread() -> None:
    engine = Engine(rules(SPIKE.replace(">= 3", ">= 100")))
    ref = StreamRef(1, "r", 0)
    rng = np.random.default_rng(0)
    steps = np.arange(60)
    vals = 1 + 0.05 * rng.standard_normal((60, 1))
    engine.observe(ref, 0, ("grad_norm",), steps, steps * 1.0, vals, now=60.0)
    engine.load(rules(SPIKE.replace("ratio >= 3", "zscore >= 5")))
    steps = np.arange(60, 100)
    vals = 1 + 0.05 * rng.standard_normal((40, 1))
    vals[-1] = 2.0
    events = engine.observe(ref, 0, ("grad_norm",), steps, steps * 1.0, vals, now=100.0)
    assert [(e.step, e.state) for e in events] == [(99, "firing")]


def test_ema_with_gaps_is_the_same_in_one_batch_or_step_by_step() -> None:
    ema = SPIKE.replace("stat: median, window: 32 steps", "stat: ema, window: 8 steps").replace(
        "min_samples: 16", "min_samples: 4"
    )
    series = {"grad_norm": "1x10 nan nan 1x10 5 1"}
    assert (
        judge(ema, series)
        == judge(ema, series, batch=30)
        == [(22, "spike", "firing", "grad_norm"), (23, "spike", "resolved", "grad_norm")]
    )


def test_host_io_context_is_attached_to_firings_that_ask_for_it() -> None:
    from runwatch.daemon.hostio import HostIO

    engine = Engine(rules(SPIKE.replace("severity", "context: [host_io]\n    severity")), host_io=HostIO())
    engine.tick(0.0, [])
    engine.tick(1.0, [])  # two samples of the real /proc counters
    ref = StreamRef(1, "r", 0)
    steps = np.arange(41)
    vals = np.ones((41, 1))
    vals[40] = 9.0
    [event] = engine.observe(ref, 0, ("grad_norm",), steps, steps * 1.0, vals, now=41.0)
    assert "; host: disk read" in event.summary and "network in" in event.summary
    assert float(event.context["disk_read_mb_per_s"]) >= 0 and "net_sent_mb_per_s" in event.context


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    spikes=st.lists(st.tuples(st.integers(40, 199), st.floats(2.0, 20.0)), max_size=5),
    nans=st.lists(st.integers(0, 199), max_size=3),
    batch=st.integers(2, 64),
    for_steps=st.integers(1, 3),
)
def test_batching_never_changes_what_fires(
    seed: int, spikes: list[tuple[int, float]], nans: list[int], batch: int, for_steps: int
) -> None:
    rng = np.random.default_rng(seed)
    values = 1.0 + 0.05 * rng.standard_normal(200)
    for at, size in spikes:
        values[at] = size
    for at in nans:
        values[at] = np.nan
    text = SPIKE.replace("severity", f"for: {for_steps} steps\n    severity")

    def events(k: int) -> list[tuple[int, str]]:
        engine = Engine(rules(text))
        ref = StreamRef(1, "r", 0)
        out = []
        for start in range(0, 200, k):
            steps = np.arange(start, min(200, start + k))
            out += [
                (e.step, e.state)
                for e in engine.observe(
                    ref, 0, ("grad_norm",), steps, steps * 1.0, values[steps][:, None], now=float(start)
                )
            ]
        return out

    assert events(1) == events(batch)
