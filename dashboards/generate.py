"""The Grafana dashboards as code: writes runwatch-run.json and runwatch-node.json beside this
file. The committed JSON is what users import or provision; tests/test_dashboards.py checks it
is exactly what this script writes, that every query names metrics a live daemon exposes, and
Grafana's dashboard rules that can be checked offline.

    python dashboards/generate.py            # rewrite the JSON after changing this file
    python dashboards/generate.py --check    # exit 1 when the JSON is not this script's output

Every query goes through the ``${datasource}`` variable (no datasource uid is written down),
and selects with the dashboard's variables. To add a panel when the exporter grows a metric
(issue 9's ``runwatch_drift_*`` monitors, say), add one
``timeseries(...)`` call in the row it belongs to, or a ``row(...)`` of its own; ids and grid
positions are assigned here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCHEMA_VERSION = 39  # Grafana 10.4 / 11
DS = {"type": "prometheus", "uid": "${datasource}"}
WIDTH = 24  # Grafana's grid has 24 columns

# Selectors. The run dashboard shows one run (exact match: run names may hold regex
# characters); node and rank are multi-value regexes ("All" is .*).
RUN_SEL = 'run="$run", rank=~"$rank", instance=~"$node"'
NODE_SEL = 'instance=~"$node"'
GPU = 'gpu=~"$gpu"'
THIS_RUN = 'run="$run"'
PAUSE = 'action="pause"'
DASHED = {"fill": "dash", "dash": [10, 10]}
# A run's GPUs: those its processes hold memory on (NVML process list, mapped by pid).


def r(metric: str) -> str:
    """``metric`` selected by the run dashboard's run, rank and node."""
    return f"{metric}{{{RUN_SEL}}}"


def n(metric: str, extra: str = "") -> str:
    """``metric`` selected by the node variable (and ``extra`` matchers)."""
    return f"{metric}{{{NODE_SEL}{', ' + extra if extra else ''}}}"


RUN_GPUS = f"and on (instance, gpu) {r('runwatch_gpu_process_memory_bytes')}"


def target(expr: str, legend: str = "", *, ref: str = "", instant: bool = False,
           table: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {"refId": ref, "datasource": DS, "editorMode": "code", "expr": expr,
                         "legendFormat": legend or "__auto", "range": not instant, "instant": instant}
    if table:
        t["format"] = "table"
    return t


class Board:
    """Panels laid out left to right, top to bottom, on the 24-column grid."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = self.y = 0
        self.row_h = 0

    def _place(self, w: int, h: int) -> dict[str, int]:
        if self.x + w > WIDTH:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def add(self, panel: dict[str, Any], w: int, h: int) -> dict[str, Any]:
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = self._place(w, h)
        for i, t in enumerate(panel.get("targets", [])):
            t["refId"] = t["refId"] or chr(ord("A") + i)
        self.panels.append(panel)
        return panel

    def row(self, title: str) -> None:
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        self.add({"type": "row", "title": title, "collapsed": False, "panels": []}, WIDTH, 1)
        self.x, self.y, self.row_h = 0, self.y + 1, 0

    def timeseries(self, title: str, targets: list[dict[str, Any]], *, unit: str = "short",
                   description: str = "", w: int = 12, h: int = 8, min_: float | None = None,
                   max_: float | None = None, overrides: list[dict[str, Any]] | None = None,
                   threshold: float | None = None, stack: bool = False) -> dict[str, Any]:
        defaults: dict[str, Any] = {
            "unit": unit,
            "color": {"mode": "palette-classic"},
            "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if stack else 0,
                       "showPoints": "never", "spanNulls": False, "axisSoftMin": 0 if min_ == 0 else None,
                       "stacking": {"mode": "normal" if stack else "none", "group": "A"}},
        }
        defaults["custom"] = {k: v for k, v in defaults["custom"].items() if v is not None}
        if min_ is not None:
            defaults["min"] = min_
        if max_ is not None:
            defaults["max"] = max_
        if threshold is not None:
            defaults["thresholds"] = {"mode": "absolute", "steps": [
                {"color": "green", "value": None}, {"color": "red", "value": threshold}]}
            defaults["custom"]["thresholdsStyle"] = {"mode": "line+area"}
        return self.add({
            "type": "timeseries", "title": title, "description": description, "datasource": DS,
            "targets": targets,
            "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
        }, w, h)

    def stat(self, title: str, expr: str, *, unit: str = "short", description: str = "", w: int = 4,
             h: int = 4, legend: str = "", decimals: int | None = None, text_mode: str = "auto",
             thresholds: list[tuple[str, float | None]] | None = None) -> dict[str, Any]:
        defaults: dict[str, Any] = {"unit": unit, "color": {"mode": "thresholds"}, "thresholds": {
            "mode": "absolute",
            "steps": [{"color": c, "value": v} for c, v in (thresholds or [("green", None)])]}}
        if decimals is not None:
            defaults["decimals"] = decimals
        return self.add({
            "type": "stat", "title": title, "description": description, "datasource": DS,
            "targets": [target(expr, legend, instant=True)],
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "none", "textMode": text_mode,
                        "justifyMode": "auto", "orientation": "auto"},
        }, w, h)

    def table(self, title: str, targets: list[dict[str, Any]], *, description: str = "", w: int = 24,
              h: int = 7, hide: tuple[str, ...] = ("Time",), rename: dict[str, str] | None = None,
              overrides: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return self.add({
            "type": "table", "title": title, "description": description, "datasource": DS,
            "targets": targets,
            "transformations": [
                {"id": "merge", "options": {}},
                {"id": "organize", "options": {"excludeByName": {k: True for k in hide},
                                               "renameByName": rename or {}}},
            ],
            "fieldConfig": {"defaults": {"custom": {"align": "auto"}}, "overrides": overrides or []},
            "options": {"showHeader": True, "cellHeight": "sm"},
        }, w, h)


def datasource_var() -> dict[str, Any]:
    return {"type": "datasource", "name": "datasource", "label": "Prometheus", "query": "prometheus",
            "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": [], "includeAll": False,
            "multi": False}


def query_var(name: str, label: str, query: str, *, multi: bool = True, sort: int = 1) -> dict[str, Any]:
    v: dict[str, Any] = {
        "type": "query", "name": name, "label": label, "datasource": DS,
        "query": {"query": query, "refId": f"{name}-values"}, "definition": query,
        "refresh": 2, "sort": sort, "regex": "", "hide": 0, "current": {}, "options": [],
        "multi": multi, "includeAll": multi,
    }
    if multi:
        v["allValue"] = ".*"
    return v


def custom_var(name: str, label: str, values: list[str], default: str) -> dict[str, Any]:
    return {"type": "custom", "name": name, "label": label, "query": ",".join(values), "hide": 0,
            "current": {"selected": True, "text": default, "value": default},
            "options": [{"selected": v == default, "text": v, "value": v} for v in values],
            "multi": False, "includeAll": False}


def annotation(name: str, expr: str, title: str, text: str, color: str, tags: str = "") -> dict[str, Any]:
    return {"name": name, "datasource": DS, "enable": True, "hide": False, "iconColor": color,
            "expr": expr, "step": "15s", "titleFormat": title, "textFormat": text, "tagKeys": tags,
            "useValueForTime": False}


def dashboard(uid: str, title: str, description: str, board: Board, variables: list[dict[str, Any]],
              annotations: list[dict[str, Any]], links: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": None, "uid": uid, "title": title, "description": description, "tags": ["runwatch"],
        "timezone": "browser", "editable": True, "graphTooltip": 1, "liveNow": False,
        "refresh": "30s", "time": {"from": "now-6h", "to": "now"},
        "timepicker": {"refresh_intervals": ["10s", "30s", "1m", "5m", "15m"]},
        "fiscalYearStartMonth": 0, "weekStart": "",
        "schemaVersion": SCHEMA_VERSION, "version": 1,
        "annotations": {"list": annotations}, "templating": {"list": variables},
        "links": links, "panels": board.panels,
    }


def by_name(name: str, props: dict[str, Any]) -> dict[str, Any]:
    return {"matcher": {"id": "byName", "options": name},
            "properties": [{"id": k, "value": v} for k, v in props.items()]}


def by_ref(ref: str, props: dict[str, Any]) -> dict[str, Any]:
    return {"matcher": {"id": "byFrameRefID", "options": ref},
            "properties": [{"id": k, "value": v} for k, v in props.items()]}


def baseline(metric: str, window: str, factor: float = 1.0) -> str:
    """The run's rolling median (the daemon's and the alert rules' baseline), times ``factor``;
    the highest over the selected ranks, so a band is one line whatever the rank selection."""
    med = f"max(quantile_over_time(0.5, {r(metric)}[{window}]))"
    return med if factor == 1.0 else f"{factor:g} * {med}"


# -- the run dashboard ----------------------------------------------------------------------

def run_dashboard() -> dict[str, Any]:
    b = Board()
    b.row("Run")
    b.stat("Last step", f"max({r('runwatch_train_step')})", decimals=0)
    b.stat("Since the last step", f"time() - max({r('runwatch_train_last_sample_timestamp_seconds')})",
           unit="s", description="Seconds since the newest step any selected rank reported (stall: "
           "RunwatchTrainingStalled).", thresholds=[("green", None), ("orange", 60), ("red", 300)])
    b.stat("Steps/s", f"avg({r('runwatch_train_steps_per_second')})", decimals=2)
    b.stat("Tokens/s (all ranks)", f"sum({r('runwatch_train_tokens_per_second')})")
    b.stat("Ranks connected", f"sum({r('runwatch_train_hook_connections')} > bool 0)", decimals=0,
           description="Ranks whose hook is connected to its node's daemon now.")
    b.stat("Alerts firing", f"count({r('runwatch_alerts_firing')}) or vector(0)", decimals=0,
           description="Rule series the daemons judge firing for this run now.",
           thresholds=[("green", None), ("red", 1)])

    b.row("Loss and gradients")
    b.timeseries("Loss", [target(r("runwatch_train_loss"), "rank {{rank}}")],
                 description="Training loss of each step (mean over micro-batches), as last scraped.")
    b.timeseries(
        "Gradient norm, baseline band and guard skips",
        [target(r("runwatch_train_grad_norm"), "rank {{rank}}"),
         target(baseline("runwatch_train_grad_norm", "$baseline_window"), "baseline median"),
         target(baseline("runwatch_train_grad_norm", "$baseline_window", 3), "spike: 3x baseline"),
         target(baseline("runwatch_train_grad_norm", "$baseline_window", 5), "divergence: 5x baseline"),
         target(r("runwatch_train_guard_threshold"), "guard threshold rank {{rank}}"),
         target(f"max_over_time({r('runwatch_train_guard_skipped')}[$__rate_interval]) > 0",
                "guard skipped rank {{rank}}")],
        description="Total gradient norm per rank against its rolling median over the baseline window "
        "(the band up to 3x is where the default pack stays quiet; 5x pauses the run), the spike "
        "guard's own threshold (mean + 6 sigma of its last 128 norms), and steps whose update the "
        "guard skipped (points; a scrape sees one step in many: the daemon counts them all).",
        overrides=[
            by_name("baseline median", {"custom.lineStyle": DASHED,
                                        "color": {"mode": "fixed", "fixedColor": "green"}}),
            by_name("spike: 3x baseline", {"custom.fillBelowTo": "baseline median", "custom.fillOpacity": 12,
                                           "color": {"mode": "fixed", "fixedColor": "green"},
                                           "custom.lineWidth": 0}),
            by_name("divergence: 5x baseline", {"custom.lineStyle": {"fill": "dash", "dash": [4, 4]},
                                                "color": {"mode": "fixed", "fixedColor": "red"}}),
            by_ref("E", {"custom.lineStyle": {"fill": "dot", "dash": [2, 6]},
                         "color": {"mode": "fixed", "fixedColor": "orange"}}),
            by_ref("F", {"custom.drawStyle": "points", "custom.pointSize": 9,
                         "custom.axisPlacement": "hidden",
                         "min": 0, "max": 1, "color": {"mode": "fixed", "fixedColor": "red"}}),
        ])
    b.timeseries(
        "Gradient-norm variance",
        [target(r("runwatch_train_microbatch_grad_norm_std"), "micro-batch spread rank {{rank}}"),
         target(r("runwatch_train_microbatch_grad_norm"), "micro-batch mean rank {{rank}}"),
         target('stddev by (run) (runwatch_train_local_grad_norm{run="$run", instance=~"$node"})',
                "spread across ranks (DDP)"),
         target('avg by (run) (runwatch_train_local_grad_norm{run="$run", instance=~"$node"})',
                "mean across ranks (DDP)")],
        description="With gradient accumulation: the spread of each micro-batch's gradient norm and "
        "their mean (grad_variance_rising fires when the spread triples while the mean holds). Under "
        "DDP: the spread of the ranks' gradient norms before the all-reduce (a few poisoned examples "
        "on one rank).",
        overrides=[by_name("spread across ranks (DDP)", {"custom.lineWidth": 2})])
    b.timeseries("Gradient norm by layer group",
                 [target(r("runwatch_train_group_grad_norm"), "{{group}} rank {{rank}}")],
                 description="L2 norm of each repeated block's, the embeddings' and the head's gradients, "
                 "as the optimizer applies them (after clipping).")
    b.timeseries("Learning rate and rewind scale",
                 [target(r("runwatch_train_learning_rate"), "group {{param_group}} rank {{rank}}"),
                  target(r("runwatch_train_lr_scale"), "LR scale after rewinds rank {{rank}}")],
                 unit="none", description="Learning rate per optimizer parameter group; after a rewind the "
                 "factor the playbook put in force (right axis).",
                 overrides=[by_ref("B", {"custom.axisPlacement": "right", "unit": "none",
                                         "custom.lineStyle": DASHED})])

    b.row("Activations")
    b.timeseries("Activation RMS per watched layer",
                 [target(r("runwatch_train_activation_norm"), "{{layer}} rank {{rank}}")],
                 description="RMS of each watched layer's output (each repeated block by default).")
    act = r("runwatch_train_activation_norm")
    med = f"quantile_over_time(0.5, {act}[15m])"
    iqr_sigma = f"(quantile_over_time(0.75, {act}[15m]) - quantile_over_time(0.25, {act}[15m])) / 1.349"
    b.timeseries("Activation drift (robust z-score)",
                 [target(f"abs({act} - {med})"
                         f" / ((({iqr_sigma} > 0.01 * abs({med})) or 0.01 * abs({med})) > 0)",
                         "{{layer}} rank {{rank}}")],
                 description="Distance of each layer's RMS from its 15m median in robust sigmas, as "
                 "RunwatchActivationDrift computes it (alert above 8).", threshold=8, min_=0)

    b.row("Data and throughput")
    b.timeseries("Token efficiency",
                 [target(r("runwatch_train_token_efficiency"), "rank {{rank}}"),
                  target(baseline("runwatch_train_token_efficiency", "30m", 0.8),
                         "alert below (0.8x median)")],
                 unit="percentunit", min_=0, max_=1,
                 description="Useful / total tokens of each step (labels not ignored, else the attention "
                 "mask). A drop means padding-heavy or truncated data: the alert names the shard.",
                 overrides=[by_ref("B", {"custom.lineStyle": DASHED,
                                         "color": {"mode": "fixed", "fixedColor": "red"}})])
    b.timeseries("Tokens/s",
                 [target(r("runwatch_train_tokens_per_second"), "rank {{rank}}"),
                  target(baseline("runwatch_train_tokens_per_second", "20m", 0.4),
                         "alert below (0.4x median)")],
                 min_=0, description="Tokens per second of each rank over the host wall time between steps.",
                 overrides=[by_ref("B", {"custom.lineStyle": DASHED,
                                         "color": {"mode": "fixed", "fixedColor": "red"}})])
    b.timeseries("Step time breakdown",
                 [target(r("runwatch_train_step_duration_seconds"), "step rank {{rank}}"),
                  target(r("runwatch_train_data_wait_seconds"), "waiting for data rank {{rank}}"),
                  target(r("runwatch_train_forward_seconds"), "forward rank {{rank}}"),
                  target(r("runwatch_train_hook_seconds"), "inside the hook rank {{rank}}")],
                 unit="s", min_=0, w=8,
                 description="Host wall time between optimizer steps; within it, the wait for the next "
                 "batch, the forward calls (on a GPU: the time to queue their kernels) and runwatch's "
                 "own hooks.")
    b.timeseries("Stragglers: rank lag",
                 [target(r("runwatch_train_rank_lag_fraction"), "rank {{rank}} on {{instance}}")],
                 unit="percentunit", w=8, threshold=0.15,
                 description="The share of each step the other ranks wait for this rank (its data wait "
                 "and forward time against the median of the others'); negative: faster than the rest. "
                 "rank_straggler fires above 15% for 30 steps and a minute.")
    b.timeseries("Data skipped by commands",
                 [target(r("runwatch_train_skipped_batches"), "batches rank {{rank}}"),
                  target(r("runwatch_train_skipped_samples"), "samples rank {{rank}}"),
                  target(r("runwatch_train_skipped_tokens"), "tokens rank {{rank}}")],
                 min_=0, w=8, description="Batches (samples, tokens) watch.data dropped because a rewind "
                 "or runwatch skip-shard said so: counted, never dropped quietly.")

    b.row("Drift")
    b.timeseries("Drift: PSI against the reference",
                 [target(r("runwatch_train_drift_psi"), "{{monitor}} rank {{rank}}"),
                  target(r("runwatch_train_drift_warn_threshold"),
                         "warning level {{monitor}} rank {{rank}}")],
                 min_=0, w=8,
                 description="Population stability index of each completed window of a monitored "
                 "histogram against its frozen reference, beside the PSI at which that window would "
                 "warn (it depends on the window's size: chi-square 99% level, at least 0.1).")
    b.timeseries("Drift: Jensen-Shannon distance",
                 [target(r("runwatch_train_drift_js"), "{{monitor}} rank {{rank}}")],
                 min_=0, max_=1, w=8,
                 description="Jensen-Shannon distance (base 2, 0..1) of each window against the reference; "
                 "reported beside PSI, the tiers use PSI.")
    b.timeseries("Drift: tier", [target(r("runwatch_train_drift_state"), "{{monitor}} rank {{rank}}")],
                 min_=0, max_=2, w=8, threshold=1,
                 description="Debounced tier of each monitor: 0 ok, 1 warning, 2 critical (reached by 2 of "
                 "the last 3 windows). Rules in rules/drift.yaml alert on drift_state/<monitor>.")

    b.row("GPUs of this run")
    b.timeseries("GPU utilization and SM activity",
                 [target(f"{n('runwatch_gpu_utilization_ratio')} {RUN_GPUS}",
                         "busy {{instance}} GPU {{gpu}}"),
                  target(f"{n('runwatch_gpu_sm_active_ratio')} {RUN_GPUS}",
                         "SM active {{instance}} GPU {{gpu}}")],
                 unit="percentunit", min_=0, max_=1,
                 description="GPUs this run's processes hold memory on. NVML utilization only says a "
                 "kernel was running (it reads 100% while hung in NCCL); SM activity (GPM, Hopper and "
                 "newer) says how much of the GPU worked.",
                 overrides=[by_ref("B", {"custom.lineWidth": 2})])
    b.timeseries("GPU power", [target(f"{n('runwatch_gpu_power_watts')} {RUN_GPUS}",
                                      "{{instance}} GPU {{gpu}}")],
                 unit="watt", min_=0, w=6, description="Board power draw of the run's GPUs.")
    b.timeseries("GPU memory",
                 [target(r("runwatch_gpu_process_memory_bytes"), "rank {{rank}} (GPU {{gpu}})"),
                  target(f"{n('runwatch_gpu_memory_used_bytes')} {RUN_GPUS}",
                         "GPU {{gpu}} used, all processes"),
                  target(f"{n('runwatch_gpu_memory_total_bytes')} {RUN_GPUS}", "GPU {{gpu}} total")],
                 unit="bytes", min_=0, w=6,
                 description="GPU memory of each rank's process, and of its GPU in all.",
                 overrides=[by_ref("C", {"custom.lineStyle": DASHED})])

    b.row("Alerts")
    b.table("Firing now (the daemons' verdicts)",
            [target(r("runwatch_alert_value"), ref="A", instant=True, table=True),
             target(r("runwatch_alert_baseline"), ref="B", instant=True, table=True)],
            hide=("Time", "__name__", "job"),
            rename={"Value #A": "value", "Value #B": "baseline"},
            description="Every rule series firing for this run, with the value that made it fire and "
            "the baseline it was judged against. runwatch incidents --run on the node tells the rest.")

    variables = [
        datasource_var(),
        query_var("run", "Run", "label_values(runwatch_train_step, run)", multi=False),
        query_var("node", "Node", 'label_values(runwatch_train_step{run="$run"}, instance)'),
        query_var("rank", "Rank", 'label_values(runwatch_train_step{run="$run", instance=~"$node"}, rank)',
                  sort=3),
        custom_var("baseline_window", "Baseline window", ["5m", "10m", "20m", "30m", "1h"], "10m"),
    ]
    annotations = [
        annotation("Alerts firing", f"max by (rule, severity, rank, metric) ({r('runwatch_alerts_firing')})",
                   "{{rule}} ({{severity}})", "rank {{rank}}: {{metric}}", "red", "severity"),
        annotation("Guard skipped an update", f"{r('runwatch_train_guard_skipped')} > 0",
                   "guard skipped an update", "rank {{rank}}", "orange"),
        annotation("Rewinds",
                   f"({r('runwatch_train_rewinds')} unless {r('runwatch_train_rewinds')} offset 1m)"
                   f" or (changes({r('runwatch_train_rewinds')}[1m]) > 0)",
                   "rewind", "rank {{rank}} rewound to a clean checkpoint (LR scaled)", "purple"),
        annotation("Pauses decided by rules (node-wide)",
                   f"sum by (instance) (increase({n('runwatch_rule_decisions_total', PAUSE)}[1m]))"
                   " > 0",
                   "pause", "a rule paused a run on {{instance}} (the counter has no run label)", "yellow"),
        annotation("Checkpoints",
                   f"changes({n('runwatch_retention_kept_bytes', THIS_RUN)}[1m]) > 0",
                   "checkpoints changed", "a checkpoint was saved or deleted (retention)", "blue"),
    ]
    links = [{"type": "dashboards", "tags": ["runwatch"], "asDropdown": False, "includeVars": False,
              "keepTime": True, "title": "runwatch", "icon": "external link", "targetBlank": False,
              "tooltip": "", "url": ""}]
    return dashboard("runwatch-run", "runwatch: run",
                     "One training run: loss, gradients against their baselines, activations, data, "
                     "throughput, its GPUs, and what the daemon decided.", b, variables, annotations, links)


# -- the node dashboard ---------------------------------------------------------------------

def node_dashboard() -> dict[str, Any]:
    b = Board()
    b.row("Node")
    b.stat("Daemon version", n("runwatch_build_info"), legend="{{instance}}: {{version}}",
           text_mode="name",
           description="runwatch_build_info of each selected daemon.")
    b.stat("GPUs visible", f"sum({n('runwatch_gpus_visible')})", decimals=0,
           description="GPUs the node samplers read (0: no NVML; runwatch status says why).")
    b.stat("Runs training", f"count(count by (instance, run) ({n('runwatch_train_hook_connections')} > 0))"
           " or vector(0)", decimals=0, description="Runs with a rank connected now.")
    b.stat("Rules in force", f"sum({n('runwatch_rules_loaded')})", decimals=0)
    b.stat("Rule files refused", f"sum({n('runwatch_rules_file_errors')} > 0) or vector(0)",
           decimals=0, thresholds=[("green", None), ("red", 1)])
    b.stat("Alerts firing", f"count({n('runwatch_alerts_firing')}) or vector(0)", decimals=0,
           thresholds=[("green", None), ("red", 1)])

    b.row("Runs on the node")
    run_link = [{"title": "Open the run",
                 "url": "/d/runwatch-run/runwatch-run?var-datasource=${datasource}&var-run=${__value.raw}"
                        "&${__url_time_range}"}]
    b.table("Runs",
            [target(f"max by (instance, run) ({n('runwatch_train_step')})", ref="A", instant=True,
                    table=True),
             target(f"sum by (instance, run) ({n('runwatch_train_hook_connections')} > bool 0)", ref="B",
                    instant=True, table=True),
             target(f"avg by (instance, run) ({n('runwatch_train_steps_per_second')})", ref="C",
                    instant=True, table=True),
             target(f"time() - max by (instance, run) ({n('runwatch_train_last_sample_timestamp_seconds')})",
                    ref="D", instant=True, table=True)],
            hide=("Time",), w=12, h=8,
            rename={"Value #A": "last step", "Value #B": "ranks connected", "Value #C": "steps/s",
                    "Value #D": "seconds since last step"},
            overrides=[by_name("run", {"links": run_link})],
            description="Every run the selected daemons know, newest values (a finished run stays until "
            "the daemon restarts). Click a run for its dashboard.")
    b.timeseries("Tokens/s by run",
                 [target(f"sum by (instance, run) ({n('runwatch_train_tokens_per_second')})",
                         "{{run}} on {{instance}}")], min_=0, w=6, h=8)
    b.timeseries("GPU memory by run",
                 [target("label_replace(sum by (instance, run) "
                         f"({n('runwatch_gpu_process_memory_bytes')}),"
                         ' "run", "(no hook)", "run", "")',
                         "{{run}} on {{instance}}")], unit="bytes", min_=0, w=6, h=8,
                 description="GPU memory of the training processes, by the run their pid belongs to "
                 "((no hook): a process no runwatch hook announced).")

    b.row("GPUs")
    gl = "{{instance}} GPU {{gpu}}"
    b.timeseries("GPU utilization (NVML)", [target(n("runwatch_gpu_utilization_ratio", GPU), gl)],
                 unit="percentunit", min_=0, max_=1, w=8,
                 description="Fraction of time a kernel ran: 100% while hung in NCCL too.")
    b.timeseries("SM activity (GPM)", [target(n("runwatch_gpu_sm_active_ratio", GPU), gl)],
                 unit="percentunit", min_=0, max_=1, w=8,
                 description="Fraction of SM cycles active (Hopper and newer, where the driver allows).")
    b.timeseries("GPU memory",
                 [target(n("runwatch_gpu_memory_used_bytes", GPU), "used " + gl),
                  target(n("runwatch_gpu_memory_total_bytes", GPU), "total " + gl)],
                 unit="bytes", min_=0, w=8,
                 overrides=[by_ref("B", {"custom.lineStyle": DASHED})])
    b.timeseries("Power", [target(n("runwatch_gpu_power_watts", GPU), gl)], unit="watt", min_=0, w=8)
    b.timeseries("Temperature", [target(n("runwatch_gpu_temperature_celsius", GPU), gl)],
                 unit="celsius", w=8)
    b.timeseries("SM clock", [target(n("runwatch_gpu_sm_clock_hertz", GPU), gl)], unit="hertz", w=8)
    b.timeseries("Clock event (throttle) reasons",
                 [target(n("runwatch_gpu_clock_event_reasons", GPU), gl)], unit="none", w=12,
                 description="NVML clock event reason bitmask (0: none; 0x4 power cap, 0x20 SW thermal, "
                 "0x40 HW thermal, 0x80 HW power brake, ...).")
    b.timeseries("Uncorrected ECC errors", [target(n("runwatch_gpu_ecc_uncorrected_errors", GPU), gl)],
                 unit="none", min_=0, w=12, threshold=1)

    b.row("Host I/O")
    hl = "{{instance}}"
    b.timeseries("CPU", [target(n("runwatch_host_cpu_ratio"), hl)], unit="percentunit",
                 min_=0, max_=1, w=6)
    b.timeseries("Memory used", [target(n("runwatch_host_memory_used_bytes"), hl)],
                 unit="bytes", min_=0, w=6)
    b.timeseries("Disk",
                 [target(n("runwatch_host_disk_read_bytes_per_second"), "read {{instance}}"),
                  target(n("runwatch_host_disk_write_bytes_per_second"), "write {{instance}}"),
                  target(n("runwatch_host_disk_busy_ratio"), "busy {{instance}}")],
                 unit="Bps", min_=0, w=6,
                 overrides=[by_ref("C", {"unit": "percentunit", "custom.axisPlacement": "right", "max": 1})])
    b.timeseries("Network",
                 [target(n("runwatch_host_net_recv_bytes_per_second"), "received {{instance}}"),
                  target(n("runwatch_host_net_sent_bytes_per_second"), "sent {{instance}}")],
                 unit="Bps", min_=0, w=6)

    b.row("Daemon health")
    b.timeseries("Ingest rate",
                 [target(f"sum by (instance) (rate({n('runwatch_ingest_points_total')}[$__rate_interval]))",
                         "points/s {{instance}}"),
                  target(f"sum by (instance) (rate({n('runwatch_ingest_frames_total')}[$__rate_interval]))",
                         "frames/s {{instance}}")],
                 unit="short", min_=0, w=8,
                 overrides=[by_ref("B", {"custom.axisPlacement": "right"})])
    b.timeseries("Rejected frames",
                 [target(f"sum by (instance, reason) (increase({n('runwatch_ingest_rejected_frames_total')}"
                         "[$__rate_interval])) > 0", "{{reason}} {{instance}}")],
                 min_=0, w=8, description="Frames refused, by reason (the connection that sent one is "
                 "closed): bad_version, forbidden, malformed, store_unavailable, ...")
    b.timeseries("Hook and CLI connections",
                 [target(n("runwatch_ingest_connections"), "{{role}} {{instance}}")],
                 min_=0, w=8)
    b.timeseries("Rule evaluation time",
                 [target(f"rate({n('runwatch_rules_evaluation_seconds_total')}[$__rate_interval])",
                         "share of the writer thread {{instance}}"),
                  target(f"rate({n('runwatch_rules_evaluation_seconds_total')}[$__rate_interval])"
                         f" / rate({n('runwatch_ingest_frames_total')}[$__rate_interval])",
                         "per committed frame {{instance}}")],
                 unit="percentunit", min_=0, w=8,
                 overrides=[by_ref("B", {"unit": "s", "custom.axisPlacement": "right"})],
                 description="Writer-thread time spent judging committed steps against the rules: as a "
                 "share of wall time (RunwatchRuleEvaluationSlow above 50%) and per frame.")
    b.timeseries("Store commit latency",
                 [target("histogram_quantile(0.5, sum by (instance, le) (rate("
                         f"{n('runwatch_store_commit_duration_seconds_bucket')}[$__rate_interval])))",
                         "p50 {{instance}}"),
                  target("histogram_quantile(0.99, sum by (instance, le) (rate("
                         f"{n('runwatch_store_commit_duration_seconds_bucket')}[$__rate_interval])))",
                         "p99 {{instance}}"),
                  target(f"sum by (instance, kind) (increase({n('runwatch_store_errors_total')}"
                         "[$__rate_interval])) > 0", "errors: {{kind}} {{instance}}")],
                 unit="s", min_=0, w=8,
                 overrides=[by_ref("C", {"unit": "short", "custom.drawStyle": "bars",
                                         "custom.axisPlacement": "right"})])
    b.timeseries("Rules: errors and reloads",
                 [target(f"increase({n('runwatch_rules_evaluation_errors_total')}[$__rate_interval])",
                         "evaluation errors {{instance}}"),
                  target(f"increase({n('runwatch_rules_reloads_total')}[$__rate_interval]) > 0",
                         "reloads {{result}} {{instance}}"),
                  target(f"{n('runwatch_rules_file_errors')} > 0", "problems in {{file}}")],
                 min_=0, w=8)
    b.timeseries("Alerts and decisions",
                 [target(f"sum by (instance, severity) ({n('runwatch_alerts_firing')})",
                         "firing {{severity}} {{instance}}"),
                  target(f"sum by (instance, action) (increase({n('runwatch_rule_decisions_total')}"
                         "[$__rate_interval])) > 0", "decided {{action}} {{instance}}"),
                  target(f"sum by (instance) (increase({n('runwatch_control_refused_total')}"
                         "[$__rate_interval])) > 0", "control refused {{instance}}")],
                 min_=0, w=8, overrides=[by_ref("B", {"custom.drawStyle": "bars"}),
                                         by_ref("C", {"custom.drawStyle": "bars"})],
                 description="Rule series firing now, and the actions rule firings named (alert, pause, "
                 "dump_batch, skip_shard, escalate) and refused pause/resume/rewind requests.")
    b.timeseries("Notifications",
                 [target(n("runwatch_notify_outbox_pending_messages"),
                         "outbox backlog {{receiver}} {{instance}}"),
                  target(f"sum by (instance, receiver, result) (increase({n('runwatch_notifications_total')}"
                         "[$__rate_interval])) > 0", "{{result}} {{receiver}} {{instance}}"),
                  target(f"sum by (instance, reason) (increase({n('runwatch_notify_decisions_total')}"
                         "[$__rate_interval])) > 0", "decided: {{reason}} {{instance}}")],
                 min_=0, w=8, overrides=[by_ref("B", {"custom.drawStyle": "bars"}),
                                         by_ref("C", {"custom.drawStyle": "bars"})],
                 description="Messages waiting in the durable outbox per receiver (the backlog while it is "
                 "down), delivery attempts by result, and notifications decided by reason.")
    b.timeseries("Retention: checkpoints kept, by tier",
                 [target(f"sum by (instance, tier) ({n('runwatch_retention_checkpoints')}) > 0",
                         "{{tier}} {{instance}}")], min_=0, w=8, stack=True,
                 description="Checkpoints by the reason they are kept (the first that applies) or not_kept.")
    b.timeseries("Retention: bytes kept and freed",
                 [target(n("runwatch_retention_kept_bytes"), "kept {{run}} {{instance}}"),
                  target(f"increase({n('runwatch_retention_freed_bytes_total')}[$__rate_interval])",
                         "freed {{instance}}")],
                 unit="bytes", min_=0, w=8, overrides=[by_ref("B", {"custom.drawStyle": "bars"})])
    b.timeseries("Retention: failures",
                 [target(f"sum by (instance, kind) (increase({n('runwatch_retention_errors_total')}"
                         "[$__rate_interval]))", "{{kind}} {{instance}}")],
                 min_=0, w=8, description="Failed scans, deletes, purges and passes (retried; "
                 "RunwatchRetentionFailing).")

    variables = [
        datasource_var(),
        query_var("node", "Node", "label_values(runwatch_build_info, instance)"),
        query_var("gpu", "GPU", 'label_values(runwatch_gpu_utilization_ratio{instance=~"$node"}, gpu)',
                  sort=3),
    ]
    annotations = [
        annotation("Rule decisions",
                   f"sum by (instance, action) (increase({n('runwatch_rule_decisions_total')}[1m])) > 0",
                   "{{action}}", "decided on {{instance}}", "red", "action"),
        annotation("Rule reloads", f"sum by (instance, result) (increase({n('runwatch_rules_reloads_total')}"
                   "[1m])) > 0", "rules reloaded ({{result}})", "on {{instance}}", "blue", "result"),
    ]
    links = [{"type": "dashboards", "tags": ["runwatch"], "asDropdown": False, "includeVars": False,
              "keepTime": True, "title": "runwatch", "icon": "external link", "targetBlank": False,
              "tooltip": "", "url": ""}]
    return dashboard("runwatch-node", "runwatch: node",
                     "The nodes' GPUs and host I/O, the runs on them, and the health of each runwatch "
                     "daemon.", b, variables, annotations, links)


DASHBOARDS = {"runwatch-run.json": run_dashboard, "runwatch-node.json": node_dashboard}


def render(build: Any) -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is stale")
    args = p.parse_args(argv)
    stale = []
    for name, build in DASHBOARDS.items():
        text = render(build)
        path = HERE / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"stale: {', '.join(stale)}; run python dashboards/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
