"""The Grafana dashboards (dashboards/): the committed JSON is the generator's output; it keeps
Grafana's dashboard rules that can be checked offline; every query names metrics a live daemon
really exposes and runs on a real Prometheus scraping it; ``runwatch dashboards push`` talks to
a loopback server standing in for Grafana's HTTP API.

Grafana's dashboard schema rules we check offline (there is no maintained Python validator of
Grafana's dashboard schema; grafana-foundation-sdk builds dashboards, it does not validate JSON):

1. The document: ``title``; ``uid`` of at most 40 of ``[A-Za-z0-9_-]``; ``id`` null (Grafana
   assigns it); ``schemaVersion`` an integer >= 36 (datasource references are objects);
   ``time``, ``tags``, ``panels``, ``templating.list``, ``annotations.list`` present;
   ``graphTooltip`` 0-2.
2. Panels: ids unique positive integers (rows' nested panels included); a known core panel
   type; ``gridPos`` with integer x, y, w, h, x >= 0, w >= 1, x + w <= 24 columns, h >= 1;
   no two panels overlap; rows 24 wide and 1 high, an open row holding no nested panels.
3. Data sources: every panel, target, annotation and query variable references
   ``{"type": "prometheus", "uid": "${datasource}"}``; no other data source uid anywhere; no
   ``__inputs`` (nothing to bind at import).
4. Targets: at least one per data panel; ``refId`` unique in its panel, capital letters; a
   non-empty ``expr``; table panels ask for ``format: table``.
5. Templating: names unique identifiers; one ``datasource`` variable of type datasource over
   ``prometheus``; a query variable's ``definition`` equals its query; a custom variable's
   current value is one of its options; ``includeAll`` comes with ``allValue``; a variable
   uses only variables defined before it (Grafana resolves them in order).
6. Every ``$var``, ``${var}``, ``${var:format}`` and ``[[var]]`` in the document is a defined
   variable or one of Grafana's built-ins.
7. Field overrides: known matcher ids; ``byFrameRefID`` names a target of the panel;
   ``byName`` and ``custom.fillBelowTo`` name a series the panel's legends produce.
8. Annotations: unique names, a query, ``enable`` set.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from runwatch.daemon import cli
from runwatch.daemon import dashboards as push_mod
from tests.conftest import REPO, free_port
from tests.live_session import DDP_RUN, RUN, LiveSession
from tests.promql import metric_names

DASH = REPO / "dashboards"
FILES = ("runwatch-run.json", "runwatch-node.json")
DS_REF = {"type": "prometheus", "uid": "${datasource}"}
PANEL_TYPES = {"row", "timeseries", "stat", "table", "gauge", "bargauge", "text", "heatmap",
               "state-timeline", "status-history", "piechart", "barchart", "logs"}
BUILTINS = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms", "__all",
            "__value", "__url_time_range", "__data", "__field", "__series", "__from", "__to", "__dashboard",
            "__org", "__user", "__name", "timeFilter"}
VAR_REF = re.compile(r"\$\{([A-Za-z0-9_]+)[^}]*\}|\$([A-Za-z_][A-Za-z0-9_]*)"
                     r"|\[\[([A-Za-z0-9_]+)(?::[^\]]*)?\]\]")
MATCHERS = {"byName", "byFrameRefID", "byRegexp", "byType", "byValue"}


def load(name: str) -> dict[str, Any]:
    return json.loads((DASH / name).read_text())


def all_panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v)


def var_refs(text: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in VAR_REF.finditer(text)}


def variable_query(v: dict[str, Any]) -> str:
    q = v.get("query")
    return q.get("query", "") if isinstance(q, dict) else str(q or "")


def queries(d: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(where, expr, target-ish dict) for every PromQL in a dashboard."""
    out = [(f"panel {p['title']!r} {t['refId']}", t["expr"], t) for p in all_panels(d)
           for t in p.get("targets", [])]
    out += [(f"annotation {a['name']!r}", a["expr"], a) for a in d["annotations"]["list"]]
    out += [(f"variable {v['name']}", variable_query(v), v) for v in d["templating"]["list"]
            if v["type"] == "query"]
    return out


def test_the_committed_json_is_the_generators_output() -> None:
    spec = importlib.util.spec_from_file_location("runwatch_dashboards_generate", DASH / "generate.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert sorted(gen.DASHBOARDS) == sorted(FILES)
    assert gen.main(["--check"]) == 0, "run: python dashboards/generate.py"


def test_metric_names_come_out_of_promql() -> None:
    cases = {
        'rate(a_total{instance=~"$node"}[$__rate_interval])': {"a_total"},
        'histogram_quantile(0.99, sum by (instance, le) (rate(h_bucket{x="y"}[5m]))) > 1': {"h_bucket"},
        "g / (quantile_over_time(0.5, g[10m]) > 0) >= 3 and count_over_time(g[10m]) >= 8": {"g"},
        "time() - b offset 1m > 1e3 or c * 0 + 60": {"b", "c"},
        'label_values(runwatch_train_step{run="$run"}, instance)': {"runwatch_train_step"},
        "label_values(instance)": set(),
        "x != x or abs(x) == Inf": {"x"},
        'foo and on (instance, gpu) bar{run="$run"}': {"foo", "bar"},
        '{__name__="up", job="x"}': {"up"},
        "sum by (run) (y) unless ignoring(rank) z": {"y", "z"},
        "max_over_time(w[$__rate_interval]) > 0 or vector(0)": {"w"},
        "v[5m:1m]": {"v"},
    }
    for expr, want in cases.items():
        assert metric_names(expr) == want, expr


@pytest.mark.parametrize("name", FILES)
def test_grafana_schema_rules_offline(name: str) -> None:
    d = load(name)
    # 1. the document
    assert d["title"] and re.fullmatch(r"[A-Za-z0-9_-]{1,40}", d["uid"])
    assert d["id"] is None and isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert d["time"]["from"] and d["time"]["to"] and "runwatch" in d["tags"]
    assert d["graphTooltip"] in (0, 1, 2)
    assert "__inputs" not in d
    # 2. panels and the grid
    panels = all_panels(d)
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) and i > 0 for i in ids) and len(ids) == len(set(ids))
    boxes = []
    for p in panels:
        assert p["type"] in PANEL_TYPES and isinstance(p.get("title"), str), p
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "xywh"), p["title"]
        assert g["x"] >= 0 and g["y"] >= 0 and g["w"] >= 1 and g["h"] >= 1, p["title"]
        assert g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            assert g["w"] == 24 and g["h"] == 1 and (p["collapsed"] or p["panels"] == []), p["title"]
        boxes.append((p["title"], g))
    for i, (ta, a) in enumerate(boxes):
        for tb, b in boxes[i + 1:]:
            overlap = (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
                       and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])
            assert not overlap, f"{ta!r} overlaps {tb!r}"
    # 3. data sources: only the variable, everywhere
    def refs(obj: Any) -> Iterator[Any]:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k == "datasource":
                    yield v
                yield from refs(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from refs(v)
    assert all(r == DS_REF for r in refs(d["panels"])), "a panel or target names a data source uid"
    assert all(r == DS_REF for r in refs(d["annotations"]))
    assert all(v.get("datasource") == DS_REF for v in d["templating"]["list"] if v["type"] == "query")
    # 4. targets
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"] == DS_REF and p["targets"], p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)) and all(re.fullmatch(r"[A-Z]+", r) for r in ref_ids)
        for t in p["targets"]:
            assert t["datasource"] == DS_REF and t["expr"].strip(), (p["title"], t)
            if p["type"] == "table":
                assert t.get("format") == "table" and t["instant"], p["title"]
        # 7. overrides point at something
        legends = {t["legendFormat"] for t in p["targets"] if "{{" not in t["legendFormat"]}
        for o in p.get("fieldConfig", {}).get("overrides", []):
            m = o["matcher"]
            assert m["id"] in MATCHERS, (p["title"], m)
            if m["id"] == "byFrameRefID":
                assert m["options"] in ref_ids, (p["title"], m)
            if m["id"] == "byName" and p["type"] == "timeseries":
                assert m["options"] in legends, (p["title"], m)
            for prop in o["properties"]:
                if prop["id"] == "custom.fillBelowTo":
                    assert prop["value"] in legends, (p["title"], prop)
    # 5. templating
    variables = d["templating"]["list"]
    names = [v["name"] for v in variables]
    assert len(names) == len(set(names)) and all(re.fullmatch(r"[A-Za-z_]\w*", n) for n in names)
    ds = [v for v in variables if v["type"] == "datasource"]
    assert len(ds) == 1 and ds[0]["name"] == "datasource" and ds[0]["query"] == "prometheus"
    for i, v in enumerate(variables):
        if v["type"] == "query":
            assert v["definition"] == variable_query(v) and v["definition"].startswith("label_values(")
        if v["type"] == "custom":
            assert v["current"]["value"] in v["query"].split(","), v["name"]
        if v.get("includeAll"):
            assert v.get("allValue"), v["name"]
        assert var_refs(json.dumps(v)) - {v["name"]} <= set(names[:i]) | BUILTINS, v["name"]
    # 6. every variable reference resolves
    used = set().union(*(var_refs(s) for s in strings(d)))
    assert used <= set(names) | BUILTINS, sorted(used - set(names) - BUILTINS)
    # 8. annotations
    anns = d["annotations"]["list"]
    assert len({a["name"] for a in anns}) == len(anns)
    assert all(a["expr"] and a["enable"] is True for a in anns)


def test_the_run_dashboard_has_what_the_issue_asks_for() -> None:
    d = load("runwatch-run.json")
    text = json.dumps(d)
    for metric in ("runwatch_train_loss", "runwatch_train_grad_norm", "runwatch_train_guard_skipped",
                   "runwatch_train_guard_threshold", "runwatch_train_microbatch_grad_norm_std",
                   "runwatch_train_local_grad_norm", "runwatch_train_activation_norm",
                   "runwatch_train_token_efficiency", "runwatch_train_tokens_per_second",
                   "runwatch_gpu_utilization_ratio", "runwatch_gpu_sm_active_ratio",
                   "runwatch_gpu_power_watts", "runwatch_gpu_process_memory_bytes"):
        assert metric in text, metric
    band = next(p for p in d["panels"] if p["title"].startswith("Gradient norm, baseline band"))
    assert [t["expr"].startswith("max(quantile_over_time(0.5") or "* max(quantile_over_time(0.5" in t["expr"]
            for t in band["targets"]].count(True) == 3
    assert {v["name"] for v in d["templating"]["list"]} >= {"datasource", "run", "node", "rank"}
    assert {a["name"] for a in d["annotations"]["list"]} >= {"Alerts firing", "Rewinds", "Checkpoints",
                                                             "Pauses decided by rules (node-wide)"}
    node = json.dumps(load("runwatch-node.json"))
    for metric in ("runwatch_ingest_points_total", "runwatch_ingest_rejected_frames_total",
                   "runwatch_rules_evaluation_seconds_total", "runwatch_notify_outbox_pending_messages",
                   "runwatch_retention_checkpoints", "runwatch_retention_errors_total", "runwatch_host_"):
        assert metric in node, metric


def test_provisioning_yaml_for_file_based_provisioning() -> None:
    dash = yaml.safe_load((DASH / "provisioning" / "dashboards.yaml").read_text())
    assert dash["apiVersion"] == 1
    (provider,) = dash["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] and provider["folder"] == "runwatch"
    ds = yaml.safe_load((DASH / "provisioning" / "datasource.yaml").read_text())
    assert ds["apiVersion"] == 1 and ds["datasources"][0]["type"] == "prometheus"
    assert ds["datasources"][0]["url"].startswith("http")


# -- live: every query against a real daemon, then a real Prometheus ----------------------------

@pytest.fixture(scope="module")
def session() -> Iterator[LiveSession]:
    pytest.importorskip("torch")
    s = LiveSession(prometheus=True)
    try:
        yield s.start()
    finally:
        s.close()


@pytest.mark.slow
@pytest.mark.prometheus
def test_every_query_names_metrics_a_live_daemon_exposes(session: LiveSession) -> None:
    sampled, declared = session.names(), session.declared()
    used: dict[str, set[str]] = {}
    for name in FILES:
        for where, expr, _ in queries(load(name)):
            names = metric_names(expr)
            assert names or where.startswith("variable"), f"{name} {where}: no metric in {expr!r}"
            for m in names:
                used.setdefault(m, set()).add(f"{name} {where}")
    missing = {m: sorted(w) for m, w in used.items() if m not in sampled | declared}
    assert not missing, f"queries name metrics the daemon does not expose: {missing}"
    # Series that exist only once something reports them must have been seen as samples.
    declared_only = {m for m in used if m not in sampled}
    assert declared_only <= {"runwatch_retention_errors_total"}, sorted(declared_only)
    assert len(used) >= 60


#: Queries that may return nothing on the session's data, and why.
MAY_BE_EMPTY = {
    ("runwatch-run.json", "panel 'Gradient norm, baseline band and guard skips' F"):
        "the guard skips one step; a 1s scrape of the latest value rarely sees it",
    ("runwatch-run.json", "annotation 'Guard skipped an update'"): "the same",
    ("runwatch-node.json", "panel 'Store commit latency' C"): "no store error happens",
    ("runwatch-node.json", "panel 'Retention: failures' A"): "no retention failure happens (no series yet)",
}
SUBSTITUTE = {"$baseline_window": "10m", "$__rate_interval": "4s", "$node": ".*", "$rank": ".*", "$gpu": ".*"}


def _substitute(expr: str, run: str) -> str:
    for k, v in SUBSTITUTE.items():
        expr = expr.replace(k, v)
    return expr.replace("$run", run)


@pytest.mark.slow
@pytest.mark.prometheus
def test_every_query_runs_on_a_real_prometheus_and_fills_its_legend(session: LiveSession) -> None:
    start, end = session.started, session.finished + 2
    every = {(name, where) for name in FILES for where, _, _ in queries(load(name))}
    assert set(MAY_BE_EMPTY) <= every, sorted(set(MAY_BE_EMPTY) - every)
    empty: list[tuple[str, str]] = []
    for name in FILES:
        for where, expr, t in queries(load(name)):
            results = []
            for run in (RUN, DDP_RUN):
                q = _substitute(expr, run)
                if where.startswith("variable"):
                    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q)
                    assert m, q
                    q = f"group by ({m.group(2)}) ({m.group(1)})"
                if t.get("instant") or where.startswith("variable"):
                    results += session.query(q, at=end)
                else:
                    results += session.query_range(q, start, end)
            if not results:
                empty.append((name, where))
                continue
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat") or t.get("titleFormat", "")
                                    + t.get("textFormat", "")):
                assert all(label in r["metric"] for r in results), (name, where, label, results[0]["metric"])
    unexpected = [e for e in empty if e not in MAY_BE_EMPTY]
    assert not unexpected, unexpected


# -- runwatch dashboards push, against a loopback stand-in for Grafana --------------------------

Handler = Callable[[str, str, Any], tuple[int, Any]]


class FakeGrafana:
    """A real HTTP server on loopback answering Grafana's folder and dashboard API."""

    def __init__(self, answer: Handler | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        self.folders: list[dict[str, Any]] = []
        self.answer = answer or self.grafana
        fake = self

        class H(BaseHTTPRequestHandler):
            def _do(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw) if raw else None
                fake.requests.append({"method": self.command, "path": self.path,
                                      "headers": dict(self.headers), "body": body})
                status, reply = fake.answer(self.command, self.path, body)
                out = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = _do

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def grafana(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        path = path.removeprefix("/grafana")
        if (method, path) == ("GET", "/api/folders"):
            return 200, self.folders
        if (method, path) == ("POST", "/api/folders"):
            folder = {"id": 7, "uid": "f-runwatch", "title": body["title"]}
            self.folders.append(folder)
            return 200, folder
        if (method, path) == ("POST", "/api/dashboards/db"):
            uid = body["dashboard"]["uid"]
            return 200, {"id": 1, "uid": uid, "url": f"/d/{uid}/{uid}", "status": "success", "version": 3,
                         "slug": uid}
        return 404, {"message": "Not found"}

    def posts(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"].endswith("/api/dashboards/db")]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    g = FakeGrafana()
    yield g
    g.close()


TOKEN = "glsa_not-a-real-token_0123456789abcdef"


def _push(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["dashboards", "push", *args])
    out, err = capsys.readouterr()
    assert TOKEN not in out + err, "the token was printed"
    return code, out, err


def test_push_creates_the_folder_and_posts_every_dashboard_with_overwrite(
        grafana: FakeGrafana, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAFANA_TOKEN", TOKEN)
    code, out, _ = _push(capsys, "--url", grafana.url, "--folder", "runwatch", "--json")
    assert code == 0
    assert [(r["method"], r["path"]) for r in grafana.requests] == [
        ("GET", "/api/folders"), ("POST", "/api/folders"),
        ("POST", "/api/dashboards/db"), ("POST", "/api/dashboards/db")]
    assert grafana.requests[1]["body"] == {"title": "runwatch"}
    for r in grafana.requests:
        assert r["headers"]["Authorization"] == f"Bearer {TOKEN}"
    shipped = {n: load(n) for n in FILES}
    for r in grafana.posts():
        body = r["body"]
        assert body["overwrite"] is True and body["folderUid"] == "f-runwatch"
        assert "runwatch dashboards push" in body["message"]
        assert r["headers"]["Content-Type"].startswith("application/json")
        (file,) = [n for n, d in shipped.items() if d["uid"] == body["dashboard"]["uid"]]
        assert body["dashboard"] == {**shipped[file], "id": None}
    result = json.loads(out)
    assert result["ok"] and result["folder"] == {"title": "runwatch", "uid": "f-runwatch", "created": True}
    assert sorted(d["url"] for d in result["dashboards"]) == [
        f"{grafana.url}/d/runwatch-node/runwatch-node", f"{grafana.url}/d/runwatch-run/runwatch-run"]
    assert {d["version"] for d in result["dashboards"]} == {3}


def test_push_reuses_an_existing_folder_and_the_token_flag_wins(
        grafana: FakeGrafana, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAFANA_TOKEN", "from-the-environment")
    grafana.folders.append({"id": 3, "uid": "existing", "title": "ML"})
    code, out, _ = _push(capsys, "--url", grafana.url + "/", "--token", TOKEN, "--folder", "ML")
    assert code == 0 and "pushed runwatch-run.json into folder 'ML'" in out
    assert [r["method"] for r in grafana.requests] == ["GET", "POST", "POST"]
    assert all(r["body"]["folderUid"] == "existing" for r in grafana.posts())
    assert all(r["headers"]["Authorization"] == f"Bearer {TOKEN}" for r in grafana.requests)


def test_push_without_a_folder_and_under_a_sub_path(
        grafana: FakeGrafana, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAFANA_TOKEN", TOKEN)
    code, _, _ = _push(capsys, "--url", grafana.url + "/grafana")
    assert code == 0
    assert [r["path"] for r in grafana.requests] == ["/grafana/api/dashboards/db"] * 2
    assert all("folderUid" not in r["body"] for r in grafana.posts())


@pytest.mark.parametrize(("status", "reply", "expect"), [
    (401, {"message": "invalid API key"}, "refused the credentials while pushing runwatch-node.json (401"),
    (403, {"message": "Permissions needed: dashboards:write"},
     "HTTP 403 while pushing runwatch-node.json: Permissions needed: dashboards:write (the token's role"),
    (500, {"message": "database is locked"}, "HTTP 500 while pushing runwatch-node.json: database is locked"),
])
def test_push_says_clearly_when_grafana_refuses_or_fails(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, status: int, reply: Any,
        expect: str) -> None:
    monkeypatch.setenv("GRAFANA_TOKEN", TOKEN)
    g = FakeGrafana(lambda method, path, body: (status, reply))
    try:
        code, out, err = _push(capsys, "--url", g.url, "--json")
    finally:
        g.close()
    assert code == push_mod.EXIT_FAILED == 7
    assert expect in err, err
    assert json.loads(out) == {"ok": False, "error": err.strip().removeprefix("runwatch dashboards push: ")}
    assert len(g.requests) == 1  # stops at the first failure


def test_push_to_an_unreachable_grafana_fails_with_exit_1(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAFANA_TOKEN", TOKEN)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code, _, err = _push(capsys, "--url", url, "--timeout", "5")
    assert code == push_mod.EXIT_UNREACHABLE == 1
    assert f"cannot reach Grafana at {url} while pushing runwatch-node.json" in err


def test_push_needs_a_token_and_a_url(capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRAFANA_TOKEN", raising=False)
    code, _, err = _push(capsys, "--url", "http://127.0.0.1:3000")
    assert code == push_mod.EXIT_USAGE and "no Grafana token: give --token or set $GRAFANA_TOKEN" in err
    code, _, err = _push(capsys, "--url", "grafana.example.com", "--token", TOKEN)
    assert code == push_mod.EXIT_USAGE and "give Grafana's address" in err


def test_push_through_the_installed_command(grafana: FakeGrafana, tmp_path: Path) -> None:
    """The real entry point in a child process, the token only in its environment."""
    import os
    import subprocess

    r = subprocess.run([sys.executable, "-m", "runwatch.daemon", "dashboards", "push", "--url", grafana.url],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "GRAFANA_TOKEN": TOKEN}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("pushed ") == 2 and TOKEN not in r.stdout + r.stderr
    assert len(grafana.posts()) == 2


def test_dashboards_path_finds_the_shipped_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["dashboards", "path", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert Path(shown["path"]) == DASH and shown["dashboards"] == sorted(FILES)
