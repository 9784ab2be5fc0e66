"""The rule language: YAML files validated with pydantic, refused with file, line and reason.

A rule file holds ``rules:`` (and optionally named ``step_ranges:``)::

    rules:
      - name: grad_norm_divergence
        summary: "gradient norm {value:.3g} is {ratio:.1f}x its rolling median {baseline:.3g}"
        metric: grad_norm                       # a key the hook sends; globs allowed
        baseline: {stat: median, window: 128 steps, min_samples: 32}
        when: ratio >= 5
        for: 1 step
        severity: critical
        actions: [alert, pause, dump_batch]

``when`` is one condition, ``<measure> <op> <number>``, ``<measure> between|outside A and B``,
``nonfinite`` or ``absent``; or ``{all: [...]}`` / ``{any: [...]}`` of conditions that each
name their own ``metric`` (and ``baseline``). Measures: ``value``, ``delta`` (change per
step), ``ratio`` (value / baseline) and ``zscore`` (distance from the baseline in its
spread). ``for`` is ``N steps[, at least DURATION]``, a duration (``30s``, ``5m``) or, for
``absent``, ``Kx interval[, at least DURATION]``.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import math
import operator
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

M = TypeVar("M", bound=BaseModel)
Severity = Literal["info", "warning", "critical"]
Action = Literal["alert", "pause", "rewind", "dump_batch", "dump_stacks", "skip_shard", "verify_shard",
                 "escalate"]
SEVERITY_ORDER = {"info": 0, "warning": 1, "critical": 2}

#: Fields a ``summary`` may use.
SUMMARY_FIELDS = frozenset(
    {"rule", "run", "rank", "host", "metric", "step", "value", "baseline", "ratio", "window", "severity",
     "shard"}
)


class RuleError(Exception):
    """A rule file that cannot be used; ``str()`` is ``file:line: reason`` lines."""

    def __init__(self, problems: list[tuple[Path, int | None, str]]) -> None:
        self.problems = problems
        super().__init__(
            "\n".join(
                f"{path}:{line}: {reason}" if line else f"{path}: {reason}" for path, line, reason in problems
            )
        )


# -- small parsers ----------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_STEPS = re.compile(r"^\s*(\d+)\s*steps?\s*(?:,?\s*at\s+least\s+(.+))?$")
_INTERVAL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*x\s*interval\s*(?:,?\s*at\s+least\s+(.+))?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_seconds(text: str) -> float:
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration such as '30s', '5m' or '2h'")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class Span:
    """A length of run: ``steps`` steps, or ``seconds``, or ``factor`` x the usual interval."""

    steps: int | None = None
    seconds: float | None = None
    factor: float | None = None
    at_least: float = 0.0

    def __str__(self) -> str:
        if self.steps is not None:
            text = f"{self.steps} step" + ("s" if self.steps != 1 else "")
            return text + (f", at least {self.at_least:g}s" if self.at_least else "")
        if self.seconds is not None:
            return f"{self.seconds:g}s"
        return f"{self.factor:g}x interval" + (f", at least {self.at_least:g}s" if self.at_least else "")


def _span(value: Any, *, interval: bool = False) -> Span:
    if isinstance(value, Span):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        value = f"{value} steps"
    if not isinstance(value, str):
        raise ValueError(f"expected text such as '128 steps' or '10m', got {value!r}")
    if m := _STEPS.match(value):
        if int(m.group(1)) < 1:
            raise ValueError("a number of steps must be at least 1")
        return Span(steps=int(m.group(1)), at_least=parse_seconds(m.group(2)) if m.group(2) else 0.0)
    if interval and (m := _INTERVAL.match(value)):
        return Span(factor=float(m.group(1)), at_least=parse_seconds(m.group(2)) if m.group(2) else 0.0)
    seconds = parse_seconds(value)
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return Span(seconds=seconds)


_OPS: dict[str, Callable[[Any, Any], Any]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}
MEASURES = ("value", "delta", "ratio", "zscore")
_NUM = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?|[-+]?inf)x?"
_COMPARE = re.compile(rf"^\s*({'|'.join(MEASURES)})\s*(>=|<=|>|<)\s*{_NUM}\s*$", re.I)
_RANGE = re.compile(rf"^\s*({'|'.join(MEASURES)})\s+(between|outside)\s+{_NUM}\s+and\s+{_NUM}\s*$", re.I)


@dataclass(frozen=True)
class Condition:
    """``measure op bound`` (or a range); ``nonfinite`` and ``absent`` have no measure."""

    kind: Literal["compare", "between", "outside", "nonfinite", "absent"]
    measure: str = "value"
    op: str = ""
    low: float = math.nan
    high: float = math.nan
    text: str = ""

    def __str__(self) -> str:
        return self.text


def _condition(value: Any) -> Condition:
    if isinstance(value, Condition):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a condition such as 'ratio >= 3', got {value!r}")
    text = " ".join(value.split())
    if text.lower() in ("nonfinite", "absent"):
        return Condition(text.lower(), text=text.lower())  # type: ignore[arg-type]
    if m := _COMPARE.match(text):
        return Condition("compare", m.group(1).lower(), m.group(2), float(m.group(3)), text=text)
    if m := _RANGE.match(text):
        low, high = float(m.group(3)), float(m.group(4))
        if low > high:
            raise ValueError(f"{text!r}: the lower bound {low:g} is above the upper bound {high:g}")
        return Condition(m.group(2).lower(), m.group(1).lower(), "", low, high, text)  # type: ignore[arg-type]
    raise ValueError(
        f"{value!r} is not a condition; write '<measure> <op> <number>' (measures: {', '.join(MEASURES)};"
        " ops: >, >=, <, <=), '<measure> between A and B', '<measure> outside A and B', 'nonfinite'"
        " or 'absent'"
    )


SpanField = Annotated[Span, BeforeValidator(_span)]
ConditionField = Annotated[Condition, BeforeValidator(_condition)]
_NAME = r"^[a-z][a-z0-9_]{0,99}$"
_METRIC_GLOB = re.compile(r"^[a-z_*?\[][^\x00-\x1f\x7f]{0,230}$")


# -- the models ----------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Baseline(_Strict):
    """What "normal" is: a rolling statistic of the series' own recent past."""

    stat: Literal["median", "mean", "ema"]
    window: SpanField = Field(description="'N steps' or a duration such as '10m'")
    min_samples: int = Field(default=32, ge=1, le=100_000)
    frozen: tuple[int, int] | str | None = Field(
        default=None, description="learn only from this step range (or a named step_ranges entry), then hold"
    )

    @model_validator(mode="after")
    def _check(self) -> Baseline:
        if self.window.steps is not None and self.window.steps > 100_000:
            raise ValueError("window: at most 100000 steps (memory is bounded per series)")
        if self.stat == "ema" and self.window.steps is None:
            raise ValueError("window: an EMA baseline spans a number of steps, e.g. '64 steps'")
        if isinstance(self.frozen, tuple) and self.frozen[0] > self.frozen[1]:
            raise ValueError(f"frozen: range {list(self.frozen)} ends before it starts")
        return self


class Leaf(_Strict):
    """One condition on one metric (a part of an ``all``/``any``)."""

    metric: str
    baseline: Baseline | None = None
    when: ConditionField

    @model_validator(mode="after")
    def _check(self) -> Leaf:
        _check_condition(self.metric, self.baseline, self.when)
        if any(c in self.metric for c in "*?["):
            raise ValueError(
                f"metric {self.metric!r}: a condition inside all/any names one metric, not a glob"
            )
        return self


class Composite(_Strict):
    all: list[Leaf] | None = Field(default=None, min_length=1)
    any: list[Leaf] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> Composite:
        if (self.all is None) == (self.any is None):
            raise ValueError("give exactly one of 'all' or 'any'")
        return self

    @property
    def mode(self) -> str:
        return "all" if self.all is not None else "any"

    @property
    def leaves(self) -> list[Leaf]:
        return self.all if self.all is not None else self.any  # type: ignore[return-value]


def _check_condition(metric: str | None, baseline: Baseline | None, cond: Condition) -> None:
    if metric is not None and not _METRIC_GLOB.match(metric):
        raise ValueError(
            f"metric {metric!r} is not a hook key or glob (e.g. 'grad_norm', 'activation_norm/*')"
        )
    if cond.kind == "absent":
        return
    if metric is None:
        raise ValueError(f"'{cond}' needs a 'metric'")
    if cond.measure in ("ratio", "zscore") and baseline is None:
        raise ValueError(
            f"'{cond}' compares with a baseline: add 'baseline: {{stat: median, window: 128 steps}}'"
        )
    if cond.measure not in ("ratio", "zscore") and cond.kind != "nonfinite" and baseline is not None:
        raise ValueError(f"'{cond}' does not use the baseline; remove 'baseline' or compare 'ratio'/'zscore'")
    if cond.measure == "zscore" and baseline is not None and baseline.stat == "ema":
        raise ValueError("zscore needs a spread: use stat 'mean' (std) or 'median' (MAD), not 'ema'")


class Rule(_Strict):
    name: Annotated[str, Field(pattern=_NAME)]
    summary: str | None = None
    description: str | None = None
    severity: Severity
    actions: list[Action] = Field(default_factory=lambda: ["alert"], min_length=1)
    run: str = Field(default="*", description="glob over run names")
    rank: int | list[int] | None = Field(default=None, description="rank(s) judged; default every rank")
    metric: str | None = None
    baseline: Baseline | None = None
    when: Annotated[
        Annotated[ConditionField, Tag("Condition")] | Annotated[Composite, Tag("Composite")],
        Discriminator(lambda v: "Composite" if isinstance(v, dict | Composite) else "Condition"),
    ]
    for_: SpanField = Field(default=Span(steps=1), alias="for")
    labels: dict[str, str] = Field(default_factory=dict)
    context: list[Literal["host_io", "gpu", "data_wait"]] = Field(
        default_factory=list,
        description="add to a firing: host_io, the node's disk and network rates; gpu, each GPU's state;"
        " data_wait, the share of each step the run waited for data, now and before",
    )

    @model_validator(mode="after")
    def _check(self) -> Rule:
        if isinstance(self.when, Composite):
            if self.metric is not None or self.baseline is not None:
                raise ValueError(
                    "with 'when: {all|any: ...}' each condition names its own metric and baseline"
                )
        else:
            _check_condition(self.metric, self.baseline, self.when)
            if self.when.kind == "absent" and self.for_.steps is not None:
                raise ValueError("'absent' is judged on the clock: give 'for' as a duration or 'Kx interval'")
        if self.for_.factor is not None and not self.absent:
            raise ValueError("'for: Kx interval' applies to 'absent' only")
        if self.summary is not None:
            _check_summary(self.summary)
        if len(set(self.actions)) != len(self.actions):
            raise ValueError("actions: listed twice")
        return self

    @model_validator(mode="before")
    @classmethod
    def _absent_for(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("for"), str) and "interval" in data["for"]:
            data = {**data, "for": _span(data["for"], interval=True)}
        return data

    @property
    def absent(self) -> bool:
        """An ``absent`` rule is judged on the clock (by the tick), not on steps."""
        return isinstance(self.when, Condition) and self.when.kind == "absent"

    @property
    def leaves(self) -> list[Leaf]:
        if isinstance(self.when, Composite):
            return self.when.leaves
        return [Leaf.model_construct(metric=self.metric or "", baseline=self.baseline, when=self.when)]

    @functools.cached_property
    def version(self) -> str:
        """Content hash: the same text anywhere is the same version."""
        return hashlib.sha256(self.model_dump_json(by_alias=True).encode()).hexdigest()[:12]

    def selects(self, run: str, rank: int) -> bool:
        if not fnmatch.fnmatchcase(run, self.run):
            return False
        if self.rank is None:
            return True
        return rank in (self.rank if isinstance(self.rank, list) else [self.rank])


def _check_summary(text: str) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as exc:
        raise ValueError(f"summary: {exc}") from None
    for f in fields:
        root = re.split(r"[.\[]", f, maxsplit=1)[0]
        if root not in SUMMARY_FIELDS:
            raise ValueError(f"summary: unknown field {{{f}}}; known: {', '.join(sorted(SUMMARY_FIELDS))}")
    sample = {
        "rule": "r",
        "run": "run",
        "rank": 0,
        "host": "node1",
        "metric": "m",
        "step": 1,
        "value": 1.5,
        "baseline": 1.0,
        "ratio": 1.5,
        "window": "w",
        "severity": "warning",
        "shard": "7",
    }
    try:
        text.format(**sample)
    except Exception as exc:
        raise ValueError(f"summary: cannot be formatted: {exc}") from None


class RuleFile(_Strict):
    rules: list[Rule] = Field(default_factory=list)
    step_ranges: dict[str, tuple[int, int]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _resolve_ranges(self) -> RuleFile:
        for rule in self.rules:
            for leaf in rule.leaves:
                b = leaf.baseline
                if b is not None and isinstance(b.frozen, str) and b.frozen not in self.step_ranges:
                    known = ", ".join(self.step_ranges) or "none defined"
                    raise ValueError(f"rule {rule.name}: frozen: no step range named {b.frozen!r} ({known})")
        return self

    def frozen_range(self, baseline: Baseline) -> tuple[int, int] | None:
        if isinstance(baseline.frozen, str):
            return self.step_ranges[baseline.frozen]
        return baseline.frozen


# -- loading, with line numbers --------------------------------------------------------------


@dataclass(frozen=True)
class LoadedRule:
    rule: Rule
    path: Path
    line: int
    frozen: tuple[tuple[int, int] | None, ...]  # per leaf, ranges resolved

    @functools.cached_property
    def version(self) -> str:
        """The rule's content hash, with named step ranges resolved (editing a range is a change)."""
        if not any(self.frozen):
            return self.rule.version
        return hashlib.sha256(f"{self.rule.version}{self.frozen}".encode()).hexdigest()[:12]


def _to_python(node: yaml.Node, path: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = (
                yaml.safe_load(yaml.serialize(key_node))
                if not isinstance(key_node, yaml.ScalarNode)
                else _scalar(key_node)
            )
            if key in out:
                raise yaml.MarkedYAMLError(
                    problem=f"key {key!r} given twice", problem_mark=key_node.start_mark
                )
            out[key] = _to_python(value_node, (*path, key), lines)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(v, (*path, i), lines) for i, v in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    return yaml.SafeLoader("").construct_object(node, deep=True)  # type: ignore[no-untyped-call]


def _line_of(loc: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> int | None:
    """The line of the deepest YAML node along a pydantic error location."""
    path: tuple[Any, ...] = ()
    best = lines.get(())
    for part in loc:
        if (*path, part) in lines:
            path = (*path, part)
            best = lines[path]
    return best


def validate_yaml(text: str, path: Path, model: type[M]) -> tuple[M, dict[tuple[Any, ...], int]]:
    """Parse YAML and validate it as ``model``; :class:`RuleError` says file:line: what is wrong.
    Also returns the line of every node, by path."""
    lines: dict[tuple[Any, ...], int] = {}
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = {} if node is None else _to_python(node, (), lines)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise RuleError([(path, mark.line + 1 if mark else None, f"YAML: {exc.problem or exc}")]) from None
    except yaml.YAMLError as exc:
        raise RuleError([(path, None, f"YAML: {exc}")]) from None
    if not isinstance(data, dict):
        raise RuleError([(path, 1, f"expected a mapping with {', '.join(model.model_fields)}")])
    try:
        return model.model_validate(data), lines
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            # pydantic adds union-member tags (``Composite``, ``function-before[...]``) to locations.
            where = ".".join(
                str(p)
                for p in loc
                if not ((isinstance(p, str) and p[:1].isupper()) or "[" in str(p) or "-" in str(p))
            )
            msg = (
                "unknown field"
                if err["type"] == "extra_forbidden"
                else err["msg"].removeprefix("Value error, ")
            )
            problems.append((path, _line_of(loc, lines), f"{where}: {msg}" if where else msg))
        raise RuleError(_dedup(problems)) from None


def parse_rule_text(text: str, path: Path) -> list[LoadedRule]:
    """Validate one rule file's text. Raises :class:`RuleError` naming every problem found."""
    parsed, lines = validate_yaml(text, path, RuleFile)
    return [
        LoadedRule(
            rule,
            path,
            lines.get(("rules", i), 1),
            tuple(parsed.frozen_range(leaf.baseline) if leaf.baseline else None for leaf in rule.leaves),
        )
        for i, rule in enumerate(parsed.rules)
    ]


def _dedup(problems: list[tuple[Path, int | None, str]]) -> list[tuple[Path, int | None, str]]:
    seen, out = set(), []
    for p in problems:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def rule_files(path: Path) -> list[Path]:
    """The rule files a path names: itself, or the ``*.yaml``/``*.yml`` directly in a folder
    (``*.test.yaml`` fixtures and dot-files are not rules)."""
    if path.is_dir():
        return sorted(
            p
            for p in path.iterdir()
            if p.is_file()
            and p.suffix in (".yaml", ".yml")
            and not p.name.startswith(".")
            and not p.stem.endswith(".test")
        )
    return [path]


def load_rules(
    paths: list[Path], previous: list[LoadedRule] | None = None
) -> tuple[list[LoadedRule], list[RuleError]]:
    """Every usable rule under ``paths``, and an error per refused file. Rule names are unique:
    a second rule of the same name refuses its file. A refused file that was loaded before
    keeps its ``previous`` rules running (a typo saved in one file silences nothing)."""
    kept: dict[Path, list[LoadedRule]] = {}
    for lr in previous or []:
        kept.setdefault(lr.path, []).append(lr)
    rules: list[LoadedRule] = []
    errors: list[RuleError] = []
    seen: dict[str, LoadedRule] = {}
    for root in paths:
        if not root.exists():
            errors.append(RuleError([(root, None, "no such file or folder")]))
            continue
        for path in rule_files(root):
            try:
                loaded = parse_rule_text(path.read_text(), path)
                clash = [
                    (
                        path,
                        lr.line,
                        f"rule {lr.rule.name}: also defined at {seen[lr.rule.name].path}:"
                        f"{seen[lr.rule.name].line}",
                    )
                    for lr in loaded
                    if lr.rule.name in seen
                ]
                if clash:
                    raise RuleError(clash)
            except (OSError, UnicodeDecodeError) as exc:
                errors.append(RuleError([(path, None, f"cannot be read: {exc}")]))
                loaded = [lr for lr in kept.get(path, []) if lr.rule.name not in seen]
            except RuleError as exc:
                errors.append(exc)
                loaded = [lr for lr in kept.get(path, []) if lr.rule.name not in seen]
            for lr in loaded:
                seen[lr.rule.name] = lr
            rules.extend(loaded)
    return rules, errors
