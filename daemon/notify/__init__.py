"""Alerts that reach people: routing, grouping, dedup, inhibition, silences, a durable outbox,
and the receivers (Slack, PagerDuty, webhook, log). Modelled on Alertmanager's notify pipeline."""
