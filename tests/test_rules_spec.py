"""Rule files: what a person writes is validated, and a mistake is named with file and line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from runwatch.daemon.rules.fixture import expand
from runwatch.daemon.rules.spec import RuleError, load_rules, parse_rule_text

GOOD = """\
rules:
  - name: spike
    metric: grad_norm
    baseline: {stat: median, window: 128 steps}
    when: ratio >= 3
    severity: warning
"""


def refuse(text: str) -> list[tuple[int | None, str]]:
    with pytest.raises(RuleError) as info:
        parse_rule_text(text, Path("r.yaml"))
    return [(line, reason) for _, line, reason in info.value.problems]


def test_good_rule_parses_with_its_line_and_a_stable_version() -> None:
    [lr] = parse_rule_text("# header\n" + GOOD, Path("r.yaml"))
    assert (lr.rule.name, lr.line, str(lr.rule.when), str(lr.rule.for_)) == (
        "spike",
        3,
        "ratio >= 3",
        "1 step",
    )
    [again] = parse_rule_text(GOOD, Path("other.yaml"))
    assert again.rule.version == lr.rule.version
    [changed] = parse_rule_text(GOOD.replace(">= 3", ">= 4"), Path("r.yaml"))
    assert changed.rule.version != lr.rule.version


@pytest.mark.parametrize(
    "change, line, words",
    [
        (("severity: warning", "severity: loud"), 6, "severity"),
        (("window: 128 steps", "window: 128 stepz"), 4, "not a duration"),
        (("when: ratio >= 3", "when: ratio >> 3"), 5, "not a condition"),
        (("when: ratio >= 3", "when: value >= 3"), 2, "does not use the baseline"),
        (("    baseline: {stat: median, window: 128 steps}\n", ""), 2, "compares with a baseline"),
        (("name: spike", "name: Spike!"), 2, "name"),
        (("    severity: warning", "    severity: warning\n    colour: red"), 7, "unknown field"),
        (
            ("    severity: warning", "    severity: warning\n    summary: '{valeu}'"),
            2,
            "unknown field {valeu}",
        ),
        (
            ("    severity: warning", "    severity: warning\n    for: 5x interval"),
            2,
            "applies to 'absent' only",
        ),
        (("{stat: median,", "{stat: median, stat: mean,"), 4, "given twice"),
    ],
)
def test_mistakes_are_named_with_their_line(change: tuple[str, str], line: int, words: str) -> None:
    problems = refuse(GOOD.replace(*change))
    assert any(ln == line and words in reason for ln, reason in problems), problems


def test_yaml_syntax_error_has_a_line() -> None:
    [(line, reason)] = refuse(GOOD + "  - name: [unclosed\n")
    assert line == 8 and reason.startswith("YAML")


def test_composite_conditions_name_one_metric_each() -> None:
    text = """\
rules:
  - name: spread
    severity: warning
    when:
      all:
        - metric: "activation_norm/*"
          when: value > 1
"""
    assert any("not a glob" in r for _, r in refuse(text))
    both = (
        text.replace('"activation_norm/*"', "loss")
        + "      any:\n        - {metric: loss, when: value > 2}\n"
    )
    assert any("exactly one of" in r for _, r in refuse(both))


def test_absent_needs_a_clock_span_and_ema_needs_steps() -> None:
    absent = "rules:\n  - name: s\n    when: absent\n    for: 3 steps\n    severity: critical\n"
    assert any("judged on the clock" in r for _, r in refuse(absent))
    ema = GOOD.replace("stat: median, window: 128 steps", "stat: ema, window: 10m")
    assert any("EMA baseline" in r for _, r in refuse(ema))


def test_named_frozen_range_must_exist() -> None:
    text = GOOD.replace("window: 128 steps}", "window: 128 steps, frozen: after_warmup}")
    assert any("no step range named 'after_warmup'" in r for _, r in refuse(text))
    [lr] = parse_rule_text(text + "step_ranges:\n  after_warmup: [100, 500]\n", Path("r.yaml"))
    assert lr.frozen == ((100, 500),)


def test_a_refused_file_keeps_its_previous_rules_and_duplicate_names_are_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(GOOD)
    b.write_text(GOOD.replace("name: spike", "name: other"))
    first, errors = load_rules([tmp_path])
    assert [lr.rule.name for lr in first] == ["spike", "other"] and not errors
    a.write_text(GOOD.replace("ratio >= 3", "ratio >="))
    b.write_text(GOOD)  # now clashes with a.yaml's (kept) rule name
    second, errors = load_rules([tmp_path], previous=first)
    assert [lr.rule.name for lr in second] == ["spike", "other"]
    assert [lr.rule.when for lr in second] == [lr.rule.when for lr in first]
    text = "\n".join(str(e) for e in errors)
    assert f"{a}:5:" in text and "also defined at" in text


def test_series_notation() -> None:
    assert expand("1x3 2+0.5x3 _ nan _x2")[:7] == [1, 1, 1, 2, 2.5, 3, None]
    assert len(expand("1x3 2+0.5x3 _ nan _x2")) == 10
    with pytest.raises(ValueError, match="not a series term"):
        expand("1y3")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runwatch.daemon", *args], capture_output=True, text=True, timeout=120
    )


def test_rules_check_cli(tmp_path: Path) -> None:
    ok = run_cli("rules", "check", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["rules"] >= 8
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("severity: warning", "severity: loud"))
    out = run_cli("rules", "check", str(bad))
    assert out.returncode == 4
    assert f"{bad}:6: rules.0.severity:" in out.stderr


def test_the_shipped_pack_passes_its_own_tests() -> None:
    out = run_cli("rules", "test", str(REPO / "rules" / "tests"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 failed" in out.stdout and "PASS" in out.stdout


def test_rules_test_fails_on_a_wrong_expectation(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(GOOD)
    test = tmp_path / "r.test.yaml"
    test.write_text("""\
rule_files: [r.yaml]
tests:
  - name: expects the spike one step late
    series: {grad_norm: "1x100 9 1x5"}
    expect: [{step: 101, rule: spike}]
""")
    out = run_cli("rules", "test", str(test))
    assert out.returncode == 4
    assert "missing:    step 101 spike firing" in out.stdout
    assert "unexpected: step 100 spike firing" in out.stdout
