"""Metric names out of PromQL (alert expressions, Grafana targets and variable queries), for the
tests that compare them with what a live daemon exposes.

Not a parser: it removes what cannot name a metric (string literals, label matchers, range and
subquery brackets, grouping label lists, Grafana variables) and keeps the identifiers that are
left, except functions and aggregations (followed by ``(``) and keywords.
``label_values(m, label)`` names ``m`` (``label_values(label)`` none); ``{__name__="m"}``
names ``m``. Names are exposition sample names, as the scrape shows them (``_total``,
``_bucket``, ``_sum``, ``_count`` included).
"""

from __future__ import annotations

import re

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
            "unless", "atan2", "inf", "nan", "start", "end"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME_MATCHER = re.compile(r'__name__\s*=\s*"([a-zA-Z_:][a-zA-Z0-9_:]*)"')
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+(?::\w+)?\]\]")
_LABEL_VALUES = re.compile(r"label_values\(\s*([^,()]*(?:\{[^}]*\})?)\s*,\s*\w+\s*\)")
_LABEL_VALUES_ANY = re.compile(r"label_values\(\s*\w+\s*\)")  # label_values(label): no metric
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.I)
_BRACKETS = re.compile(r"\[[^\]]*\]")
_BRACES = re.compile(r"\{[^}]*\}")
_IDENT = re.compile(r"(?<![0-9A-Za-z_.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    names = set(_NAME_MATCHER.findall(expr))
    text = _LABEL_VALUES_ANY.sub(" ", _LABEL_VALUES.sub(r" \1 ", expr))
    text = _GRAFANA_VAR.sub(" ", text)
    text = _STRING.sub(" ", text)
    text = _BRACES.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    for m in _IDENT.finditer(text):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in KEYWORDS:
            continue
        names.add(name)
    return names
