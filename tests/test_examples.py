"""The examples in examples/ run as written and reach a live daemon."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, DaemonProcess

pytest.importorskip("torch")


@pytest.mark.slow
@pytest.mark.parametrize(("script", "run", "steps"), [
    ("plain_loop.py", "example-plain", 200),
    ("hf_trainer.py", "example-hf", 20),
    ("lightning_train.py", "example-lightning", 20),
])
def test_example_runs_and_reports(daemon: DaemonProcess, script: str, run: str, steps: int) -> None:
    env = {**os.environ, "RUNWATCH_SOCKET": str(daemon.socket)}
    r = subprocess.run([sys.executable, str(REPO / "examples" / script)], capture_output=True,
                       text=True, timeout=300, env=env, cwd=daemon.root)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    runs = {x["run"]: x for x in daemon.query("runs", all=True)["runs"]}
    assert runs[run]["last_step"] == steps - 1
    assert runs[run]["latest"]["grad_norm"] > 0
