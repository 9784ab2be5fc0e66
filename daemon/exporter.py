"""Prometheus exposition: the daemon's own health and every run's latest training values.

Names follow the Prometheus conventions: base units, ``_total`` on counters, ``_seconds``
on durations, and labels of low cardinality (run, rank, and one label for a metric key's
``/sub`` part such as a parameter group or layer). Training values are exported as
``runwatch_train_<key base>``, so a hook key ``learning_rate/0`` becomes
``runwatch_train_learning_rate{run="..",rank="0",param_group="0"}``.

Each daemon has its own :class:`CollectorRegistry`; nothing registers globally.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from typing import get_args
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import start_wsgi_server
from prometheus_client.registry import Collector

from runwatch.daemon import __version__
from runwatch.daemon.live import LiveView
from runwatch.daemon.rules.engine import Engine
from runwatch.daemon.rules.spec import Action
from runwatch.daemon.sampler import Sampler

log = logging.getLogger("runwatch.exporter")

REJECT_REASONS = (
    "bad_version",
    "bad_handshake",
    "handshake_timeout",
    "oversized",
    "malformed",
    "truncated",
    "unknown_kind",
    "unexpected",
    "forbidden",
    "store_unavailable",
)

#: Label name used for the ``/sub`` part of a hook key, by key base.
SUB_LABELS = {
    "learning_rate": "param_group",
    "group_grad_norm": "group",
    "activation_norm": "layer",
    "drift_psi": "monitor",
    "drift_js": "monitor",
    "drift_warn_threshold": "monitor",
    "drift_state": "monitor",
    "drift_shard": "monitor",
}

#: HELP text for the keys the hook sends by default; other keys get a generic one.
TRAIN_HELP = {
    "loss": "Training loss of the step (mean over micro-batches).",
    "grad_norm": "Total L2 norm of the gradients before the optimizer step.",
    "group_grad_norm": "L2 norm of the gradients of one parameter group of layers.",
    "learning_rate": "Learning rate of an optimizer parameter group.",
    "step_duration_seconds": "Wall time between consecutive optimizer steps on the host.",
    "activation_norm": "L2 norm of a watched layer's output.",
    "drift_psi": "PSI of a drift monitor's last window against its reference (natural log).",
    "drift_js": "Jensen-Shannon distance (base 2) of a drift monitor's last window to its reference.",
    "drift_warn_threshold": "PSI at which a drift monitor's last window would warn (window-size aware).",
    "drift_state": "Debounced drift tier of a monitor: 0 ok, 1 warning, 2 critical.",
}

NODE_RUN_PREFIX = "node:"
RESERVED = {"step", "last_sample_timestamp_seconds", "steps_per_second", "hook_connections"}
_INVALID = re.compile(r"[^a-zA-Z0-9_]")


class DaemonMetrics:
    """The daemon's own counters, in the daemon's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.points = Counter("runwatch_ingest_points", "Points committed to the store.", registry=registry)
        self.frames = Counter(
            "runwatch_ingest_frames", "Sample frames committed and acknowledged.", registry=registry
        )
        self.rejected = Counter(
            "runwatch_ingest_rejected_frames",
            "Frames refused, by reason; the connection that sent one is closed.",
            ["reason"],
            registry=registry,
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        self.connections = Gauge(
            "runwatch_ingest_connections", "Open client connections.", ["role"], registry=registry
        )
        for role in ("hook", "cli"):
            self.connections.labels(role)
        self.commit_seconds = Histogram(
            "runwatch_store_commit_duration_seconds",
            "Time to commit one batch of frames to SQLite.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )
        self.store_errors = Counter(
            "runwatch_store_errors",
            "Failed store commits, by kind (disk_full, read_only, busy, other).",
            ["kind"],
            registry=registry,
        )
        for kind in ("disk_full", "read_only", "busy", "other"):
            self.store_errors.labels(kind)
        self.alert_transitions = Counter(
            "runwatch_alert_transitions",
            "Rule series that started (state=firing) or stopped (state=resolved) firing.",
            ["rule", "severity", "state"],
            registry=registry,
        )
        self.decisions = Counter(
            "runwatch_rule_decisions",
            "Actions named by rule firings (alert, pause, rewind, dump_batch, skip_shard, escalate).",
            ["action"],
            registry=registry,
        )
        for action in get_args(Action):  # from 0, so that increase() counts a node's first pause
            self.decisions.labels(action)
        self.rule_seconds = Counter(
            "runwatch_rules_evaluation_seconds",
            "Writer-thread time spent judging committed steps against the rules.",
            registry=registry,
        )
        self.rule_errors = Counter(
            "runwatch_rules_evaluation_errors",
            "Failures while judging steps (logged; the steps are stored and acknowledged anyway).",
            registry=registry,
        )
        self.query_errors = Counter(
            "runwatch_query_errors",
            "CLI queries answered with an error: refused (unknown op, bad arguments, not found) or"
            " failed (the daemon failed answering; logged).",
            ["kind"],
            registry=registry,
        )
        for kind in ("refused", "failed"):
            self.query_errors.labels(kind)
        self.control_refused = Counter(
            "runwatch_control_refused",
            "Pause/resume/rewind requests refused (not the run's owner or root, bad arguments).",
            registry=registry,
        )
        self.retention_freed_bytes = Counter(
            "runwatch_retention_freed_bytes", "Checkpoint bytes the retention manager deleted.",
            registry=registry,
        )
        self.retention_kept_bytes = Gauge(
            "runwatch_retention_kept_bytes", "Checkpoint bytes kept, by run.", ["run"], registry=registry,
        )
        self.retention_checkpoints = Gauge(
            "runwatch_retention_checkpoints", "Checkpoints by the reason they are kept (tier) or not_kept.",
            ["run", "tier"], registry=registry,
        )
        self.retention_errors = Counter(
            "runwatch_retention_errors", "Retention failures (scan, delete, purge, pass); retried.",
            ["kind"], registry=registry,
        )
        self.rules_loaded = Gauge("runwatch_rules_loaded", "Rules in force.", registry=registry)
        self.history_rows = Counter(
            "runwatch_history_rows",
            "Metric-history rows by what retention did: rolled (into 1m/1h), pruned_raw, pruned_rollup.",
            ["action"], registry=registry,
        )
        for action in ("rolled", "pruned_raw", "pruned_rollup"):
            self.history_rows.labels(action)
        self.repeated_steps = Counter(
            "runwatch_ingest_repeated_steps",
            "Steps sent again that were already stored (ignored): replays after a daemon restart, or a"
            " relaunch whose step count started again.", registry=registry)
        self.history_backlog = Gauge(
            "runwatch_history_backlog_rows", "Stored steps not yet rolled up.", registry=registry)
        self.store_bytes = Gauge(
            "runwatch_store_bytes", "Size of the store: file (on disk) and free (pages SQLite will reuse).",
            ["kind"], registry=registry,
        )
        self.store_full = Gauge(
            "runwatch_store_full",
            "1 while the store's disk is full: history is paused (hooks keep and resend), alerts go on.",
            registry=registry,
        )
        self.notifications = Counter(
            "runwatch_notifications",
            "Delivery attempts by receiver and result (sent, retry, failed: given up).",
            ["receiver", "result"],
            registry=registry,
        )
        self.outbox_pending = Gauge(
            "runwatch_notify_outbox_pending_messages",
            "Notifications waiting in the durable outbox, by receiver (the backlog while it is down).",
            ["receiver"],
            registry=registry,
        )
        self.notify_decisions = Counter(
            "runwatch_notify_decisions",
            "Notifications decided, by reason (first_notification, new_alerts_in_group, ...).",
            ["reason"],
            registry=registry,
        )
        self.rule_file_errors = Gauge(
            "runwatch_rules_file_errors",
            "Problems in a rule file whose current contents were refused (0 when it loads).",
            ["file"],
            registry=registry,
        )
        self.rule_reloads = Counter(
            "runwatch_rules_reloads",
            "Rule reloads, by result: ok, or refused when any file was refused.",
            ["result"],
            registry=registry,
        )
        for result in ("ok", "refused"):
            self.rule_reloads.labels(result)
        Info("runwatch_build", "Version of the running daemon.", registry=registry).info(
            {"version": __version__}
        )


def train_metric_name(base: str) -> str:
    return "runwatch_train_" + _INVALID.sub("_", base)


class TrainCollector(Collector):
    """Reads the live view at scrape time; one gauge family per key base."""

    def __init__(self, live: LiveView) -> None:
        self.live = live

    def collect(self) -> Iterator[Metric]:
        streams = self.live.snapshot()
        step = GaugeMetricFamily(
            "runwatch_train_step", "Last optimizer step reported by the rank.", labels=["run", "rank"]
        )
        seen = GaugeMetricFamily(
            "runwatch_train_last_sample_timestamp_seconds",
            "Unix time of the rank's last reported step.",
            labels=["run", "rank"],
        )
        rate = GaugeMetricFamily(
            "runwatch_train_steps_per_second", "Recent optimizer steps per second.", labels=["run", "rank"]
        )
        conns = GaugeMetricFamily(
            "runwatch_train_hook_connections",
            "Hook connections open for the rank (0 when it has gone away).",
            labels=["run", "rank"],
        )
        families: dict[str, GaugeMetricFamily] = {}
        for s in streams:
            if s.info.run.startswith(NODE_RUN_PREFIX):
                continue  # the node sampler's stream: NodeCollector exports it
            base_labels = [s.info.run, str(s.info.rank)]
            conns.add_metric(base_labels, s.connections)
            if s.last_step < 0:
                continue
            step.add_metric(base_labels, s.last_step)
            seen.add_metric(base_labels, s.last_time)
            rate.add_metric(base_labels, s.steps_per_second)
            for key, value in s.latest.items():
                base, _, sub = key.partition("/")
                if base in RESERVED or base == "hist":  # histogram bins are not gauges
                    continue
                family = families.get(key if not sub else base + "/")
                if family is None:
                    labels = ["run", "rank"] + ([SUB_LABELS.get(base, "key")] if sub else [])
                    name = train_metric_name(base)
                    help_text = TRAIN_HELP.get(base, f"Value of '{base}' reported by the training hook.")
                    family = GaugeMetricFamily(name, help_text, labels=labels)
                    families[key if not sub else base + "/"] = family
                family.add_metric([*base_labels, sub] if sub else base_labels, value)
        yield step
        yield seen
        yield rate
        yield conns
        names: set[str] = set()
        for family in families.values():
            # "a" and "a/x" would give one name two label sets; keep the first seen.
            if family.name in names:
                continue
            names.add(family.name)
            yield family


class AlertCollector(Collector):
    """Series firing now, with the value and baseline that made them fire."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        labels = ["rule", "severity", "run", "rank", "metric"]
        firing = GaugeMetricFamily(
            "runwatch_alerts_firing", "1 for each rule series firing now.", labels=labels
        )
        value = GaugeMetricFamily(
            "runwatch_alert_value", "The value that made a firing series fire.", labels=labels
        )
        baseline = GaugeMetricFamily(
            "runwatch_alert_baseline", "The baseline a firing series was judged against.", labels=labels
        )
        for e in self.engine.active():
            key = [e.rule, e.severity, e.run, str(e.rank), e.metric]
            firing.add_metric(key, 1)
            value.add_metric(key, e.value)
            baseline.add_metric(key, e.baseline)
        yield firing
        yield value
        yield baseline


#: Stored GPU key -> (exported name, HELP, scale to the exported unit).
GPU_EXPORT = {
    "gpu_utilization": (
        "runwatch_gpu_utilization_ratio",
        "Fraction of time a kernel ran (NVML; 1 while hung in NCCL too).",
        0.01,
    ),
    "gpu_sm_active": (
        "runwatch_gpu_sm_active_ratio",
        "Fraction of SM cycles active (NVML GPM, Hopper and newer).",
        1.0,
    ),
    "gpu_memory_used_bytes": ("runwatch_gpu_memory_used_bytes", "GPU memory in use.", 1.0),
    "gpu_memory_total_bytes": ("runwatch_gpu_memory_total_bytes", "GPU memory in total.", 1.0),
    "gpu_power_watts": ("runwatch_gpu_power_watts", "Board power draw.", 1.0),
    "gpu_energy_joules": ("runwatch_gpu_energy_joules", "Energy used since the driver loaded.", 1.0),
    "gpu_temperature_celsius": ("runwatch_gpu_temperature_celsius", "GPU core temperature.", 1.0),
    "gpu_sm_clock_hertz": ("runwatch_gpu_sm_clock_hertz", "SM clock.", 1.0),
    "gpu_throttle_reasons": (
        "runwatch_gpu_clock_event_reasons",
        "NVML clock event (throttle) reason bitmask.",
        1.0,
    ),
    "gpu_ecc_errors": (
        "runwatch_gpu_ecc_uncorrected_errors",
        "Uncorrected ECC errors since the driver loaded.",
        1.0,
    ),
    "gpu_xid_errors": (
        "runwatch_gpu_xid_errors",
        "XID critical errors NVML reported since the daemon started.",
        1.0,
    ),
    "gpu_last_xid": ("runwatch_gpu_last_xid", "The code of the last XID critical error.", 1.0),
}


class NodeCollector(Collector):
    """The node sampler's last readings: ``runwatch_gpu_*{gpu,uuid,model}``, ``runwatch_host_*``,
    and GPU memory per training process mapped to its run and rank by pid."""

    def __init__(self, sampler: Sampler, live: LiveView) -> None:
        self.sampler = sampler
        self.live = live

    def collect(self) -> Iterator[Metric]:
        sample = self.sampler.latest
        visible = GaugeMetricFamily(
            "runwatch_gpus_visible", "GPUs the node sampler reads (0: none, see status)."
        )
        visible.add_metric([], len(sample.gpus) if sample else 0)
        yield visible
        if sample is None:
            return
        families = {
            k: GaugeMetricFamily(name, text, labels=["gpu", "uuid", "model"])
            for k, (name, text, _) in GPU_EXPORT.items()
        }
        by_pid = {st.info.pid: st.info for st in self.live.snapshot() if st.connections > 0}
        procs = GaugeMetricFamily(
            "runwatch_gpu_process_memory_bytes",
            "GPU memory of a training process.",
            labels=["gpu", "pid", "run", "rank"],
        )
        for g in sample.gpus:
            labels = [str(g.index), g.uuid, g.name]
            for key, value in g.values.items():
                if key in families and math.isfinite(value):
                    families[key].add_metric(labels, value * GPU_EXPORT[key][2])
            for pid, used in g.processes:
                info = by_pid.get(pid)
                procs.add_metric(
                    [str(g.index), str(pid), info.run if info else "", str(info.rank) if info else ""], used
                )
        yield from families.values()
        yield procs
        for key, value in sample.host.items():
            if math.isfinite(value):
                name = "runwatch_" + key.replace("_percent", "_ratio")
                yield GaugeMetricFamily(
                    name,
                    f"Node {key.replace('_', ' ')} (node sampler).",
                    value=value / 100.0 if key.endswith("_percent") else value,
                )


def serve(registry: CollectorRegistry, address: str, port: int) -> WSGIServer:
    """Start the /metrics HTTP server on a thread; the returned server knows its real port."""
    server, _thread = start_wsgi_server(port, address, registry)
    return server
