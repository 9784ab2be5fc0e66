"""The Prometheus alerting rules (rules/prometheus/): promtool checks and unit tests, the example
scrape configs, the default pack covered, and the rules run by a real Prometheus against a live
daemon whose metrics they name."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from tests.live_session import RUN, LiveSession
from tests.promql import metric_names

pytestmark = pytest.mark.prometheus

PROM_DIR = REPO / "rules" / "prometheus"
RULES = PROM_DIR / "runwatch.rules.yml"
CONFIGS = sorted(PROM_DIR.glob("prometheus*.yml"))
#: Series Prometheus makes itself rather than scrapes from the daemon.
PROMETHEUS_OWN = {"up"}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: make test installs Debian's 'prometheus'")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, cwd=PROM_DIR)


def _alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [dict(r, group=g["name"]) for g in groups for r in g["rules"]]


def test_promtool_check_rules_is_clean() -> None:
    r = _promtool("check", "rules", str(RULES))
    assert r.returncode == 0 and "SUCCESS" in r.stdout and "FAILED" not in r.stdout + r.stderr, \
        r.stdout + r.stderr


def test_promtool_unit_tests_pass() -> None:
    tests = sorted((PROM_DIR / "tests").glob("*.yml"))
    assert len(tests) >= 2
    r = _promtool("test", "rules", *map(str, tests))
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "FAILED" not in out and out.count("SUCCESS") == len(tests), out


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_promtool_check_config_passes_on_the_examples(config: Path) -> None:
    r = _promtool("check", "config", str(config))
    assert r.returncode == 0 and "FAILED" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_the_examples_are_single_node_multi_node_and_federation() -> None:
    assert {p.name for p in CONFIGS} == {"prometheus.yml", "prometheus-cluster.yml",
                                         "prometheus-federation.yml"}
    cluster = yaml.safe_load((PROM_DIR / "prometheus-cluster.yml").read_text())
    job = cluster["scrape_configs"][0]
    assert job["job_name"] == "runwatch" and job["static_configs"] and job["file_sd_configs"]
    assert cluster["rule_files"] == ["runwatch.rules.yml"]
    fed = yaml.safe_load((PROM_DIR / "prometheus-federation.yml").read_text())["scrape_configs"][0]
    assert fed["metrics_path"] == "/federate" and fed["honor_labels"] is True
    assert '{job="runwatch"}' in fed["params"]["match[]"]


def test_every_alert_has_severity_summary_and_description_naming_run_and_rank() -> None:
    alerts = _alerts()
    assert len(alerts) >= 20
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names))
    for a in alerts:
        severity = a["labels"]["severity"]
        assert severity in ("warning", "critical") or (a["alert"] == "RunwatchRuleFiring"
                                                       and severity == "{{ $labels.severity }}"), a["alert"]
        assert a["annotations"]["summary"] and a["annotations"]["description"], a["alert"]
        assert re.fullmatch(r"Runwatch[A-Z][A-Za-z]+", a["alert"])
        if a["group"] in ("runwatch-training", "runwatch-daemon-verdicts") and "gpu" not in a["expr"]:
            text = a["annotations"]["summary"] + a["annotations"]["description"]
            assert "$labels.run" in text and "$labels.rank" in text, a["alert"]


def test_every_rule_of_the_default_pack_has_a_promql_version() -> None:
    pack = {r["name"] for f in sorted((REPO / "rules").glob("*.yaml"))
            for r in (yaml.safe_load(f.read_text()) or {}).get("rules", [])}
    assert len(pack) >= 10
    covered = {a["labels"].get("rule") for a in _alerts() if a["group"] == "runwatch-training"}
    # A new rule in rules/*.yaml needs a PromQL version here, or a line in the rules file saying
    # why it has none (then list it in this set); RunwatchRuleFiring forwards them all.
    # Drift (issue 9): the daemon's drift_state is already debounced, so RunwatchRuleFiring is
    # exact; a PromQL version on runwatch_train_drift_state waits until the live session below
    # trains past a drift reference (300+ steps by default) and can check the series exists.
    forwarded_only = {"drift_warning", "drift_critical", "drift_shard_critical"}
    assert pack - forwarded_only <= covered, sorted(pack - forwarded_only - covered)
    assert covered <= pack, sorted(covered - pack)


# -- live: a real daemon, real training, a real Prometheus evaluating the rules ------------------

@pytest.fixture(scope="module")
def session() -> Iterator[LiveSession]:
    pytest.importorskip("torch")
    s = LiveSession(prometheus=True, rule_files=(RULES,))
    try:
        yield s.start()
    finally:
        s.close()


@pytest.mark.slow
def test_every_metric_the_alerts_name_is_exposed_by_a_live_daemon(session: LiveSession) -> None:
    used: dict[str, set[str]] = {}
    for a in _alerts():
        for name in metric_names(a["expr"]):
            used.setdefault(name, set()).add(a["alert"])
        for text in a["annotations"].values():  # {{ query "..." }} in templates
            for q in re.findall(r'printf "([^"]*\{[^"]*)"', text):
                for name in metric_names(re.sub(r"%q", '"x"', q)):
                    used.setdefault(name, set()).add(a["alert"])
    sampled, declared = session.names(), session.declared()
    missing = {n: sorted(a) for n, a in used.items() if n not in sampled | declared | PROMETHEUS_OWN}
    assert not missing, f"metrics the alerts name that the daemon does not expose: {missing}"
    # Training, GPU and alert series exist only once something reports them: they must have been
    # seen as samples, not merely declared.
    unseen = sorted(n for n in used if n.startswith(("runwatch_train_", "runwatch_gpu_", "runwatch_alert"))
                    and n not in sampled)
    assert not unseen, unseen
    assert "runwatch_train_grad_norm" in used and "runwatch_notify_outbox_pending_messages" in sampled


def _prom(session: LiveSession, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{session.prom_port}/api/v1/{path}", timeout=10) as r:
        return json.load(r)["data"]


@pytest.mark.slow
def test_a_real_prometheus_evaluates_every_rule_on_live_data(session: LiveSession) -> None:
    rules = [r for g in _prom(session, "rules")["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} == {a["alert"] for a in _alerts()}
    broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not broken, broken
    alerts = _prom(session, "alerts")["alerts"]
    seen = {(a["labels"]["alertname"], a["labels"].get("rule"), a["labels"].get("run"), a["state"])
            for a in alerts}
    # The daemon's verdict on the padded shard is forwarded with its severity...
    forwarded = [a for a in alerts if a["labels"]["alertname"] == "RunwatchRuleFiring"
                 and a["labels"]["rule"] == "token_efficiency_drop"]
    assert forwarded, seen
    assert forwarded[0]["labels"]["run"] == RUN and forwarded[0]["labels"]["severity"] == "warning"
    assert forwarded[0]["state"] == "firing", seen
    assert "value 0.5, baseline 1" in forwarded[0]["annotations"]["description"]
    # ...and the frame of another protocol version is noticed.
    assert any(a["labels"]["alertname"] == "RunwatchIngestRejectingFrames"
               and a["labels"]["reason"] == "bad_version" for a in alerts), seen
