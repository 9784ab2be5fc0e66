"""The distribution: a built wheel in a clean venv without torch, and the editable install."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import runwatch.daemon
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_editable_install_maps_the_top_level_folders() -> None:
    hooks = importlib.import_module("runwatch.hooks")
    assert Path(runwatch.daemon.__file__).resolve() == REPO / "daemon" / "__init__.py"
    assert Path(hooks.__file__).resolve() == REPO / "hooks" / "__init__.py"


def test_wheel_installs_into_a_clean_venv_and_the_daemon_runs_without_torch(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)],
                   check=True, capture_output=True)
    wheel = next(dist.glob("runwatch-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "runwatch/daemon/service.py" in names and "runwatch/hooks/watch.py" in names
    # The Grafana dashboards and the Prometheus rules ship too (runwatch dashboards push / path).
    assert "runwatch/dashboards/runwatch-run.json" in names
    assert "runwatch/rules/prometheus/runwatch.rules.yml" in names
    # Every subpackage of the source tree is in the wheel (a new folder must be listed in pyproject).
    for folder in ("daemon", "hooks"):
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.relative_to(REPO / folder).as_posix()
            assert f"runwatch/{folder}/{rel}" in names, f"{folder}/{rel} is missing from the wheel"
    assert not [n for n in names if n.startswith(("daemon/", "hooks/", "tests/"))]
    # The systemd unit and its companions ship too (runwatch install-systemd copies them).
    assert "runwatch/systemd/runwatch.service" in names and "runwatch/systemd/runwatch.sysusers.conf" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([str(py), "-m", "pip", "list"], capture_output=True, text=True)
    assert "torch" not in r.stdout.lower(), "installing runwatch must never pull torch"

    check = ("import sys, runwatch.daemon.service, runwatch.daemon.cli; "
             "assert 'torch' not in sys.modules; print(runwatch.daemon.__file__)")
    r = subprocess.run([str(py), "-c", check], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "site-packages/runwatch/daemon" in r.stdout, r.stderr
    r = subprocess.run([str(py), "-c", "import runwatch.hooks"], capture_output=True, text=True, cwd=tmp_path)
    assert "No module named 'torch'" in r.stderr

    sock = Path("/tmp") / f"rw-wheel-{time.time_ns()}.sock"
    daemon = subprocess.Popen([str(venv / "bin" / "runwatch"), "daemon", "--socket", str(sock),
                               "--state-dir", str(tmp_path / "state"), "--exporter-port", "0"],
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline:
            r = subprocess.run([str(venv / "bin" / "runwatch"), "status", "--json", "--socket", str(sock)],
                               capture_output=True, text=True, cwd=tmp_path)
            if r.returncode == 0:
                status = r.stdout
                break
            time.sleep(0.2)
        assert status and '"reachable": true' in status
        # The default rule pack ships inside the wheel, with its tests, and is what runs.
        assert json.loads(status)["rules"]["loaded"] >= 8
        r = subprocess.run([str(venv / "bin" / "runwatch"), "rules", "test",
                            str(venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
                                / "site-packages" / "runwatch" / "rules" / "tests")],
                           capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0 and " 0 failed" in r.stdout, r.stdout + r.stderr
        r = subprocess.run([str(venv / "bin" / "runwatch"), "install-systemd", "--root",
                            str(tmp_path / "root"), "--json"], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        unit = (tmp_path / "root" / "etc/systemd/system/runwatch.service").read_text()
        assert f"ExecStart={(venv / 'bin' / 'runwatch').absolute()} daemon\n" in unit
    finally:
        daemon.terminate()
        assert daemon.wait(timeout=30) == 0, daemon.stderr.read() if daemon.stderr else ""
