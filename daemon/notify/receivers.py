"""Where notifications go: Slack (Web API or incoming webhook), PagerDuty Events API v2, a
generic JSON webhook, and the log. Each makes exactly one attempt per ``send`` and says what
to do next; retrying, backing off and ordering are the notifier's job.

Secrets (tokens, webhook URLs, routing keys) are read when a receiver is built and never
logged: errors name the receiver and the HTTP status, not the URL.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import pagerduty
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.webhook import WebhookClient

from runwatch.daemon.notify.config import Receiver as ReceiverConfig
from runwatch.daemon.notify.model import Alert
from runwatch.daemon.notify.pipeline import Notification

log = logging.getLogger("runwatch.notify")
# slack_sdk logs request URLs at DEBUG; a webhook URL is a secret.
logging.getLogger("slack_sdk").setLevel(logging.INFO)

TIMEOUT_SECONDS = 10
PD_SUMMARY_MAX = 1024
PD_DEDUP_MAX = 255
PD_ALERTS_MAX = 20  # alerts listed in custom_details (an event must stay under 512 KB)
PD_SEVERITY = {"critical": "critical", "warning": "warning", "info": "info"}


@dataclass(frozen=True)
class Delivery:
    """The outcome of one attempt: ``ok`` (with the receiver's message id, if any), ``retry``
    (after ``retry_after`` seconds when the receiver said so), or neither: give up."""

    ok: bool
    retry: bool = False
    retry_after: float | None = None
    error: str = ""
    ref: str | None = None


OK = Delivery(True)


def _http_outcome(status: int, retry_after: str | None, what: str) -> Delivery:
    if 200 <= status < 300:
        return OK
    after = _seconds(retry_after)
    if status == 429 or status >= 500:
        return Delivery(False, True, after, f"{what}: HTTP {status}")
    return Delivery(False, False, None, f"{what}: HTTP {status} (not retried)")


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def title(n: Notification) -> str:
    """One line saying what happened: the top-level text every message carries."""
    alerts = n.firing or n.resolved
    if not alerts:
        return f"[RESOLVED] {n.receiver}: {n.group_labels}"
    first = alerts[0]
    state = "FIRING" if n.firing else "RESOLVED"
    more = f" (+{len(alerts) - 1} more)" if len(alerts) > 1 else ""
    return f"[{state}:{first.severity}] {first.labels.get('alertname')} on {first.labels.get('run')}{more}"


def describe(a: Alert) -> str:
    lines = [a.summary]
    if math.isfinite(a.value) or math.isfinite(a.baseline):
        lines.append(f"value {a.value:.4g} against baseline {a.baseline:.4g} ({a.window})")
    lines.append(
        f"run {a.labels.get('run')} rank {a.labels.get('rank')} on {a.labels.get('node')}, step {a.step}"
    )
    if a.actions and a.actions != ("alert",):
        lines.append("actions: " + ", ".join(x for x in a.actions if x != "alert"))
    if a.context:
        lines.append("context: " + ", ".join(f"{k}={v}" for k, v in sorted(a.context.items())))
    return "\n".join(lines)


class Receiver:
    name: str
    config: ReceiverConfig

    def send(self, n: Notification, ref: str | None) -> Delivery:  # pragma: no cover - interface
        raise NotImplementedError


class LogReceiver(Receiver):
    def __init__(self, name: str, config: ReceiverConfig) -> None:
        self.name, self.config = name, config

    def send(self, n: Notification, ref: str | None) -> Delivery:
        log.warning("%s: %s", title(n), "; ".join(a.summary for a in n.firing or n.resolved))
        return OK


def slack_blocks(n: Notification, dashboard_url: str | None) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": title(n)[:150]}}
    ]
    for a in (n.firing or n.resolved)[:10]:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": describe(a)[:3000]}})
    if dashboard_url:
        blocks.append(
            {"type": "context", "elements": [{"type": "mrkdwn", "text": f"<{dashboard_url}|dashboard>"}]}
        )
    return blocks


class SlackReceiver(Receiver):
    """chat.postMessage with Block Kit; a resolution is posted in the firing message's thread."""

    def __init__(self, name: str, config: ReceiverConfig) -> None:
        self.name, self.config = name, config
        kw: dict[str, Any] = {"base_url": config.base_url} if config.base_url else {}
        self.client = WebClient(
            token=config.secret("token"),
            timeout=TIMEOUT_SECONDS,
            retry_handlers=[],
            ssl=config.ssl_context(),
            **kw,
        )

    def send(self, n: Notification, ref: str | None) -> Delivery:
        kw: dict[str, Any] = {"thread_ts": ref} if ref and not n.firing else {}
        try:
            resp = self.client.chat_postMessage(
                channel=self.config.channel,
                text=title(n),
                blocks=slack_blocks(n, self.config.dashboard_url),
                **kw,
            )
        except SlackApiError as exc:
            r = exc.response
            return _http_outcome(
                r.status_code if r.status_code != 200 else 400,
                r.headers.get("Retry-After") or r.headers.get("retry-after"),
                f"slack {r.get('error', 'error')}",
            )
        except Exception as exc:  # network trouble (the Web API URL holds no secret; the token is a header)
            return Delivery(False, True, None, f"slack: {type(exc).__name__}: {exc}"[:300])
        return Delivery(True, ref=resp.get("ts"))


class SlackWebhookReceiver(Receiver):
    """An incoming webhook: its reply is checked (it does not raise)."""

    def __init__(self, name: str, config: ReceiverConfig) -> None:
        self.name, self.config = name, config
        self.client = WebhookClient(
            config.secret("url"), timeout=TIMEOUT_SECONDS, retry_handlers=[], ssl=config.ssl_context()
        )

    def send(self, n: Notification, ref: str | None) -> Delivery:
        try:
            resp = self.client.send(text=title(n), blocks=slack_blocks(n, self.config.dashboard_url))
        except Exception as exc:  # the URL is the secret: report the type only
            return Delivery(False, True, None, f"slack webhook: {type(exc).__name__}")
        if resp.status_code == 200 and resp.body.strip() == "ok":
            return OK
        return _http_outcome(
            resp.status_code if resp.status_code != 200 else 400,
            (resp.headers or {}).get("Retry-After") or (resp.headers or {}).get("retry-after"),
            "slack webhook",
        )


def dedup_key(n: Notification) -> str:
    """One PagerDuty incident per alert group and receiver (≤ 255 characters)."""
    digest = hashlib.sha256(f"{n.receiver}\n{n.group_key}".encode()).hexdigest()[:32]
    label = "-".join(f"{v}" for v in n.group_labels.values())[: PD_DEDUP_MAX - 50]
    return f"runwatch-{label}-{digest}"[:PD_DEDUP_MAX]


class PagerDutyReceiver(Receiver):
    """Events API v2 through the ``pagerduty`` package: trigger and resolve by ``dedup_key``."""

    def __init__(self, name: str, config: ReceiverConfig) -> None:
        self.name, self.config = name, config
        client = pagerduty.EventsApiV2Client(
            config.secret("routing_key"), base_url=config.base_url, verify=config.ssl_context()
        )
        # One attempt per send: the notifier retries from its durable outbox, with its own limits.
        # (The package retries 429 forever unless a status has a retry budget; with a budget
        # and max_http_attempts -1 it hands every error status straight back, unslept.)
        client.retry = {status: 1 for status in (429, 500, 502, 503, 504)}
        client.max_http_attempts = -1
        client.max_network_attempts = 1
        client.sleep_timer = 0.0
        client.timeout = TIMEOUT_SECONDS
        self.client = client

    def send(self, n: Notification, ref: str | None) -> Delivery:
        key = dedup_key(n)
        try:
            if n.firing:
                first = n.firing[0]
                self.client.send_event(
                    "trigger",
                    dedup_key=key,
                    payload={
                        "summary": f"{title(n)}: {first.summary}"[:PD_SUMMARY_MAX],
                        "source": first.labels.get("node", "runwatch"),
                        "severity": PD_SEVERITY.get(first.severity, "error"),
                        "component": first.labels.get("run"),
                        "group": first.labels.get("alertname"),
                        "custom_details": {
                            "alerts": [a.to_json() for a in n.firing[:PD_ALERTS_MAX]],
                            "alerts_total": len(n.firing),
                            "reason": n.reason.value,
                        },
                    },
                    **(
                        {"links": [{"href": self.config.dashboard_url, "text": "dashboard"}]}
                        if self.config.dashboard_url
                        else {}
                    ),
                )
            else:
                self.client.resolve(key)
        except pagerduty.HttpError as exc:
            resp = exc.response
            return _http_outcome(resp.status_code, resp.headers.get("Retry-After"), "pagerduty")
        except Exception as exc:  # network trouble; the text may hold the key, so only its type
            return Delivery(False, True, None, f"pagerduty: {type(exc).__name__}")
        return Delivery(True, ref=key)


class WebhookReceiver(Receiver):
    """POST of the notification as JSON (alerts with labels, values, baselines and context)."""

    def __init__(self, name: str, config: ReceiverConfig) -> None:
        self.name, self.config = name, config
        self.url = config.secret("url")
        self.ssl = config.ssl_context()

    def send(self, n: Notification, ref: str | None) -> Delivery:
        body = json.dumps(
            {
                "receiver": n.receiver,
                "status": n.state,
                "reason": n.reason.value,
                "group_labels": n.group_labels,
                "title": title(n),
                "alerts": [a.to_json() for a in n.firing + n.resolved],
            }
        ).encode()
        try:
            req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=TIMEOUT_SECONDS, context=self.ssl) as resp:
                return _http_outcome(resp.status, None, "webhook")
        except urllib.error.HTTPError as exc:
            return _http_outcome(exc.code, exc.headers.get("Retry-After"), "webhook")
        except Exception as exc:  # the URL may carry a token: report the type only
            return Delivery(False, True, None, f"webhook: {type(exc).__name__}")


KINDS: dict[str, type[Receiver]] = {
    "slack": SlackReceiver,
    "slack_webhook": SlackWebhookReceiver,
    "pagerduty": PagerDutyReceiver,
    "webhook": WebhookReceiver,
    "log": LogReceiver,
}


def build(name: str, config: ReceiverConfig) -> Receiver:
    return KINDS[config.type](name, config)  # type: ignore[call-arg]
