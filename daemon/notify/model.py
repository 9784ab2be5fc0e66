"""What the notify pipeline moves: alerts (one per rule series), and notifications (one message
to one receiver about one group of alerts)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from runwatch.daemon.rules.engine import Event


@dataclass(frozen=True)
class Alert:
    """A rule series as people see it: identifying labels, and what to show about it."""

    labels: dict[str, str]
    state: Literal["firing", "resolved"]
    starts_at: float
    ends_at: float | None
    summary: str
    value: float
    baseline: float
    window: str
    step: int
    actions: tuple[str, ...]
    context: dict[str, str] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.labels)

    @property
    def severity(self) -> str:
        return self.labels.get("severity", "warning")

    @classmethod
    def from_event(cls, e: Event, node: str, at: float) -> Alert:
        labels = {
            "alertname": e.rule,
            "severity": e.severity,
            "run": e.run,
            "rank": str(e.rank),
            "metric": e.metric,
            "node": node,
            **e.labels,
        }
        context = dict(e.context)
        if e.shard is not None:
            context["data_shard"] = f"{e.shard:.0f}"
        return cls(
            labels,
            e.state,
            at,
            at if e.state == "resolved" else None,
            e.summary,
            e.value,
            e.baseline,
            e.window,
            e.step,
            e.actions,
            context,
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["value"] = _num(self.value)
        d["baseline"] = _num(self.baseline)
        d["actions"] = list(self.actions)
        d["fingerprint"] = self.fingerprint
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Alert:
        d = {k: v for k, v in d.items() if k != "fingerprint"}
        d["value"] = float(d["value"])
        d["baseline"] = float(d["baseline"])
        d["actions"] = tuple(d["actions"])
        return cls(**d)


def fingerprint(labels: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:16]


def _num(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)
