"""Alerting configuration, the ``[alerting]`` table of the daemon's TOML::

    [alerting]
    group_by = ["run", "alertname"]      # defaults shown
    group_wait = "30s"
    group_interval = "5m"
    repeat_interval = "4h"

    [alerting.receivers.team-slack]
    type = "slack"                       # slack | slack_webhook | pagerduty | webhook | log
    channel = "#training"
    token_env = "SLACK_BOT_TOKEN"        # or token = "xoxb-..." (never logged nor shown)

    [alerting.receivers.oncall]
    type = "pagerduty"
    routing_key_env = "PD_ROUTING_KEY"

    [[alerting.routes]]                  # first match wins unless continue = true
    match = { severity = "critical" }
    receivers = ["oncall", "team-slack"]

Without routes: critical goes to every PagerDuty and Slack receiver, warning to Slack, info
is only stored; with no receiver configured at all, critical and warning go to the log.
"""

from __future__ import annotations

import os
import re
import ssl
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, model_validator

from runwatch.daemon.rules.spec import parse_seconds

Seconds = Annotated[float, BeforeValidator(lambda v: parse_seconds(v) if isinstance(v, str) else v)]
ReceiverType = Literal["slack", "slack_webhook", "pagerduty", "webhook", "log"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Receiver(_Model):
    type: ReceiverType
    send_resolved: bool = True
    # slack
    channel: str | None = None
    token: SecretStr | None = None
    token_env: str | None = None
    # slack_webhook, webhook
    url: SecretStr | None = None
    url_env: str | None = None
    # pagerduty
    routing_key: SecretStr | None = None
    routing_key_env: str | None = None
    # slack, pagerduty: an API base other than the public one (a proxy, or a test server)
    base_url: str | None = None
    ca_file: str | None = Field(default=None, description="CA bundle to trust for this receiver's HTTPS")
    messages_per_second: float = Field(default=1.0, gt=0, description="rate limit of this receiver")
    max_attempts: int = Field(
        default=300,
        ge=1,
        le=100_000,
        description="deliveries tried before giving up (300: a day of outage at 5 min)",
    )
    dashboard_url: str | None = None

    @model_validator(mode="after")
    def _urls(self) -> Receiver:
        url = self.url.get_secret_value() if self.url is not None else None
        for what, value in (("url", url), ("base_url", self.base_url)):
            if value is not None and not value.startswith(("https://", "http://")):
                raise ValueError(f"{what}: must start with https:// (or http://)")
        if self.type == "pagerduty" and self.base_url and not self.base_url.startswith("https://"):
            raise ValueError("base_url: PagerDuty's client only speaks https://")
        if self.ca_file is not None and not os.path.isfile(self.ca_file):
            raise ValueError(f"ca_file: {self.ca_file} is not a file")
        return self

    @model_validator(mode="after")
    def _needs(self) -> Receiver:
        need = {
            "slack": ("token", "channel"),
            "slack_webhook": ("url",),
            "pagerduty": ("routing_key",),
            "webhook": ("url",),
            "log": (),
        }[self.type]
        for name in need:
            if name == "channel":
                if not self.channel:
                    raise ValueError("a slack receiver needs 'channel'")
                continue
            if getattr(self, name) is None and getattr(self, f"{name}_env") is None:
                raise ValueError(f"a {self.type} receiver needs '{name}' or '{name}_env'")
        return self

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    def secret(self, name: str) -> str:
        """The secret ``name`` (token, url, routing_key), from the config or the environment."""
        inline: SecretStr | None = getattr(self, name)
        if inline is not None:
            return inline.get_secret_value()
        env = getattr(self, f"{name}_env")
        value = os.environ.get(env or "")
        if not value:
            raise ValueError(f"environment variable {env} (the {name} of a {self.type} receiver) is not set")
        return value


class Route(_Model):
    match: dict[str, str] = Field(default_factory=dict, description="label = value, all must hold")
    match_re: dict[str, str] = Field(default_factory=dict, description="label = regex (full match)")
    receivers: list[str] = Field(min_length=1)
    continue_: bool = Field(default=False, alias="continue")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _regexes(self) -> Route:
        for label, pattern in self.match_re.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"match_re.{label}: {exc}") from None
        return self

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match.items()) and all(
            re.fullmatch(p, labels.get(k, "")) for k, p in self.match_re.items()
        )


class Inhibit(_Model):
    """A firing alert matching ``source`` mutes alerts matching ``target`` that agree on ``equal``."""

    source: dict[str, str]
    target: dict[str, str]
    equal: list[str] = Field(default_factory=list)


def _default_inhibits() -> list[Inhibit]:
    # A critical alert mutes the warning about the same signal of the same run and rank
    # (grad_norm_divergence mutes grad_norm_spike).
    return [
        Inhibit(
            source={"severity": "critical"}, target={"severity": "warning"}, equal=["run", "rank", "metric"]
        )
    ]


class Alerting(_Model):
    group_by: list[str] = Field(default_factory=lambda: ["run", "alertname"])
    group_wait: Seconds = 30.0
    group_interval: Seconds = 300.0
    repeat_interval: Seconds = 4 * 3600.0
    receivers: dict[str, Receiver] = Field(default_factory=dict)
    routes: list[Route] = Field(default_factory=list)
    inhibit: list[Inhibit] = Field(default_factory=_default_inhibits)
    node: str | None = Field(default=None, description="the node label of alerts (default: host name)")
    retry_max_seconds: Seconds = Field(default=300.0, description="longest wait between delivery attempts")

    @model_validator(mode="after")
    def _known_receivers(self) -> Alerting:
        for i, route in enumerate(self.routes):
            for name in route.receivers:
                if name not in self.receivers:
                    known = ", ".join(self.receivers) or "none configured"
                    raise ValueError(f"routes[{i}]: no receiver named {name!r} ({known})")
        if min(self.group_wait, self.group_interval, self.repeat_interval) < 0:
            raise ValueError("group_wait, group_interval and repeat_interval must not be negative")
        return self

    def effective_routes(self) -> list[Route]:
        """The routes in force: the configured ones, else the defaults described above."""
        if self.routes:
            return self.routes
        by_type: dict[str, list[str]] = {}
        for name, r in self.receivers.items():
            by_type.setdefault(r.type, []).append(name)
        slack = by_type.get("slack", []) + by_type.get("slack_webhook", [])
        pager = by_type.get("pagerduty", [])
        others = by_type.get("webhook", []) + by_type.get("log", [])
        if not self.receivers:
            return [Route(match={"severity": s}, receivers=["log"]) for s in ("critical", "warning")]
        routes = []
        if pager + slack + others:
            routes.append(Route(match={"severity": "critical"}, receivers=pager + slack + others))
        if slack + others:
            routes.append(Route(match={"severity": "warning"}, receivers=slack + others))
        return routes

    def effective_receivers(self) -> dict[str, Receiver]:
        return self.receivers or {"log": Receiver(type="log")}
