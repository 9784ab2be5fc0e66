"""``runwatch demo``: the quickstart, end to end on this machine.

Starts a daemon in the background on a temporary socket and store, trains a tiny GPT-style
model on the CPU with the hook attached, shows ``runwatch status``, ``runwatch runs`` and a
few exported series, and stops the daemon with SIGTERM.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from rich.console import Console

from runwatch.daemon.client import Client, DaemonUnreachable


def _wait_for_daemon(sock: Path, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with code {proc.returncode}")
        try:
            with Client(sock) as client:
                return client.query("status")
        except DaemonUnreachable:
            time.sleep(0.1)
    raise RuntimeError(f"daemon did not answer on {sock} within {timeout:g}s")


def run_demo(steps: int = 300) -> int:
    from runwatch.daemon.cli import main as cli

    console = Console()
    if importlib.util.find_spec("torch") is None:
        console.print("[red]the demo trains a model and needs torch:[/red] pip install torch")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="runwatch-demo-"))
    sock, state, log_path = tmp / "runwatch.sock", tmp / "state", tmp / "daemon.log"
    console.rule("[bold]1. start the node daemon")
    with open(log_path, "wb") as log_file:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "runwatch.daemon", "daemon", "--socket", str(sock),
             "--state-dir", str(state), "--exporter-port", "0"],
            stdout=log_file, stderr=subprocess.STDOUT,
        )
    try:
        status = _wait_for_daemon(sock, daemon)
        console.print(f"daemon pid {daemon.pid} on {sock}; log {log_path}")
        console.rule(f"[bold]2. train a tiny GPT on the CPU for {steps} steps, hook attached")
        started = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "runwatch.hooks.tinygpt", "--run", "demo-tinygpt",
             "--steps", str(steps), "--socket", str(sock)],
            check=True,
        )
        console.print(f"trained in {time.monotonic() - started:.1f}s")
        console.rule("[bold]3. runwatch status")
        cli(["status", "--socket", str(sock)])
        console.rule("[bold]4. runwatch runs --all")
        cli(["runs", "--all", "--socket", str(sock)])
        console.rule("[bold]5. what Prometheus scrapes")
        url = status["daemon"]["exporter"]
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = resp.read().decode()
        console.print(f"GET {url}")
        for line in body.splitlines():
            if line.startswith(("runwatch_train_", "runwatch_ingest_points_total")):
                console.print("  " + line, markup=False, highlight=False)
    finally:
        console.rule("[bold]6. stop the daemon (SIGTERM)")
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=30)
        console.print(f"daemon exited with code {code}")
    return 0 if code == 0 else 1
