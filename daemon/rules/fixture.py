"""``runwatch rules test FILE``: rule unit tests, in the spirit of ``promtool test rules``.

A test file names the rule files it tests and, per test, input series and the firings
expected at given steps; any other firing fails the test::

    rule_files: [../gradients.yaml]        # relative to this file
    tests:
      - name: a 6x gradient spike is critical at its step
        interval: 1s                       # time between steps (default 1s)
        noise: 0.05                        # relative gaussian noise, seeded (default 0)
        series:
          grad_norm: "1x200 6 1x20"
        expect:
          - {step: 200, rule: grad_norm_spike}
          - {step: 200, rule: grad_norm_divergence}

Series notation, one term per space: ``3`` one value; ``3x200`` 200 values of 3;
``1+0.5x10`` 10 values from 1 rising by 0.5; ``_`` / ``_x30`` steps with no sample (time
still passes, which is how ``absent`` rules are tested); ``nan``, ``inf``, ``-inf``.
Unlike promtool, ``aXN`` is N values, not N+1. Steps are judged one at a time (``batch: K``
hands the engine K steps at once, as a hook flushing every K steps does).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from runwatch.daemon.rules.engine import Engine, Event, StreamRef
from runwatch.daemon.rules.spec import RuleError, load_rules, parse_seconds, validate_yaml

_TERM = re.compile(
    r"^(?P<start>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?|[-+]?inf|nan|_)"
    r"(?:(?P<inc>[-+](?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?))?(?:x(?P<n>\d+))?$",
    re.I,
)


def expand(text: str) -> list[float | None]:
    """Series notation to values; ``None`` is a step with no sample."""
    out: list[float | None] = []
    for term in str(text).split():
        m = _TERM.match(term)
        if not m:
            raise ValueError(f"{term!r} is not a series term such as '3', '3x200', '1+0.5x10', '_' or 'nan'")
        n = int(m.group("n") or 1)
        if n > 1_000_000:
            raise ValueError(f"{term!r}: at most 1000000 values per term")
        if m.group("start") == "_":
            if m.group("inc"):
                raise ValueError(f"{term!r}: a missing step has no increment")
            out.extend([None] * n)
            continue
        start, inc = float(m.group("start")), float(m.group("inc") or 0.0)
        out.extend(start + inc * i for i in range(n))
    return out


def _series(value: Any) -> list[float | None]:
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, str):
        return expand(value)
    if isinstance(value, list):
        return [None if v == "_" else float(v) for v in value]
    raise ValueError(f"expected a series such as '1x100 5', got {value!r}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Expect(_Model):
    step: int = Field(ge=0)
    rule: str
    state: Literal["firing", "resolved"] = "firing"
    metric: str | None = None


class Case(_Model):
    name: str
    interval: Annotated[float, BeforeValidator(lambda v: parse_seconds(v) if isinstance(v, str) else v)] = 1.0
    noise: float = Field(default=0.0, ge=0.0)
    seed: int = 0
    batch: int = Field(default=1, ge=1)
    run: str = "fixture"
    rank: int = 0
    series: dict[str, Annotated[list[float | None], BeforeValidator(_series)]]
    expect: list[Expect] = Field(default_factory=list)


class TestFile(_Model):
    rule_files: list[str] = Field(default_factory=lambda: [".."])
    tests: list[Case] = Field(min_length=1)


@dataclass
class Outcome:
    name: str
    passed: bool
    missing: list[Expect]
    unexpected: list[tuple[int, Event]]
    events: list[tuple[int, Event]]

    def explain(self) -> str:
        lines = [
            f"  missing:    step {e.step} {e.rule} {e.state}" + (f" {e.metric}" if e.metric else "")
            for e in self.missing
        ]
        lines += [
            f"  unexpected: step {i} {e.rule} {e.state} {e.metric}: {e.summary}" for i, e in self.unexpected
        ]
        return "\n".join(lines)


def run_case(case: Case, engine: Engine) -> list[tuple[int, Event]]:
    """Feed a case through ``engine``; returns (step, event) pairs: a condition on data fires at
    the step it judged, an ``absent`` rule at the step whose time it noticed the silence."""
    rng = np.random.default_rng(case.seed)
    ref = StreamRef(1, case.run, case.rank)
    length = max((len(v) for v in case.series.values()), default=0)
    set_ids: dict[tuple[str, ...], int] = {}
    events: list[tuple[int, Event]] = []
    pending: list[tuple[int, tuple[str, ...], list[float]]] = []

    def flush() -> None:
        i = 0
        while i < len(pending):
            j = i
            while j < len(pending) and pending[j][1] == pending[i][1]:
                j += 1
            names = pending[i][1]
            steps = np.array([p[0] for p in pending[i:j]], dtype=np.int64)
            values = np.array([p[2] for p in pending[i:j]], dtype=np.float64).reshape(j - i, len(names))
            sid = set_ids.setdefault(names, len(set_ids))
            now = float(steps[-1]) * case.interval
            events.extend(
                (e.step, e)
                for e in engine.observe(ref, sid, names, steps, steps * case.interval, values, now)
            )
            i = j
        pending.clear()

    for step in range(length):
        row = {k: v[step] for k, v in case.series.items() if step < len(v) and v[step] is not None}
        if row:
            names = tuple(sorted(row))
            vals = [
                row[n] * (1.0 + case.noise * rng.standard_normal())
                if case.noise and math.isfinite(row[n])
                else row[n]
                for n in names
            ]
            pending.append((step, names, vals))
        if len(pending) >= case.batch or step == length - 1:
            flush()
        events.extend((step, e) for e in engine.tick(step * case.interval, [ref.id]))
    return events


def check(case: Case, events: list[tuple[int, Event]]) -> Outcome:
    states = {e.state for e in case.expect} | {"firing"}
    compared = [(i, e) for i, e in events if e.state in states]
    missing = list(case.expect)
    unexpected = []
    for i, e in compared:
        hit = next(
            (
                x
                for x in missing
                if x.step == i
                and x.rule == e.rule
                and x.state == e.state
                and (x.metric is None or x.metric == e.metric)
            ),
            None,
        )
        if hit is None:
            unexpected.append((i, e))
        else:
            missing.remove(hit)
    return Outcome(case.name, not missing and not unexpected, missing, unexpected, events)


def run_file(path: Path) -> list[Outcome]:
    """Run every case of a test file. Raises :class:`RuleError` for a bad test or rule file."""
    spec, _ = validate_yaml(path.read_text(), path, TestFile)
    rules, errors = load_rules([(path.parent / f).resolve() for f in spec.rule_files])
    if errors:
        raise RuleError([p for err in errors for p in err.problems])
    return [check(case, run_case(case, Engine(rules))) for case in spec.tests]
