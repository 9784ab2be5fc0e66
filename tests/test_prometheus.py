"""A real Prometheus scrapes a live daemon; promtool lints what it exposes."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import DaemonProcess

pytestmark = pytest.mark.prometheus

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def _require(binary: str | None, name: str) -> str:
    if binary is None:
        pytest.fail(f"{name} is not installed: the test command installs Debian's 'prometheus'")
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train(daemon: DaemonProcess, run: str, steps: int) -> None:
    r = subprocess.run([sys.executable, "-m", "runwatch.hooks.tinygpt", "--run", run, "--steps",
                        str(steps), "--socket", str(daemon.socket)], capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_check_metrics_is_clean(daemon: DaemonProcess) -> None:
    pytest.importorskip("torch")
    _train(daemon, "lint", 20)
    text = daemon.metrics_text()
    assert "runwatch_train_learning_rate{" in text
    r = subprocess.run([_require(PROMTOOL, "promtool"), "check", "metrics"], input=text,
                       capture_output=True, text=True)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr


def test_real_prometheus_scrapes_the_daemon(daemon: DaemonProcess, rootdir: Path) -> None:
    pytest.importorskip("torch")
    assert daemon.exporter_url
    target = urllib.parse.urlparse(daemon.exporter_url).netloc
    port = _free_port()
    config = rootdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: runwatch\n    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    prom = subprocess.Popen(
        [_require(PROMETHEUS, "prometheus"), f"--config.file={config}",
         f"--storage.tsdb.path={rootdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(rootdir / "prometheus.log").open("wb"),
    )
    try:
        _train(daemon, "scraped", 30)
        last_step = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            query = urllib.parse.urlencode({"query": 'runwatch_train_step{run="scraped"}'})
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?{query}", timeout=5) as r:
                    result = json.load(r)["data"]["result"]
            except OSError:
                result = []
            if result:
                last_step = float(result[0]["value"][1])
                labels = result[0]["metric"]
                break
            time.sleep(0.5)
        assert last_step == 29.0, (rootdir / "prometheus.log").read_text()[-2000:]
        assert labels["rank"] == "0" and labels["job"] == "runwatch"
    finally:
        prom.terminate()
        prom.wait(timeout=30)
