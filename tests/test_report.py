"""``runwatch report``: the incident report from a store a real intervention produced.

One real run (``tests/intervene_train.py``: TinyGPT on CPU with the hook, a corrupted batch at
data index 110, checkpoints every 20 steps) against a real daemon with the default rule pack;
the daemon is stopped before any report is written, so the report reads the store on its own.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, DaemonProcess, RawClient, short_tmpdir
from PIL import Image

from runwatch.daemon import protocol
from runwatch.daemon.cli import EXIT_CONFIG, EXIT_USAGE, main
from runwatch.daemon.protocol import Kind

CONFIG = "[playbook]\nwatch_steps = 30\n[retention]\nconfirm_steps = 5\n"
BAD = 110


class Ran:
    def __init__(self, root: Path, state_dir: Path) -> None:
        self.root, self.state_dir = root, state_dir


@pytest.fixture(scope="module")
def ran() -> Iterator[Ran]:
    root = short_tmpdir()
    (root / "runwatch.toml").write_text(CONFIG)
    d = DaemonProcess(root, extra_args=["--config", str(root / "runwatch.toml")]).start()
    try:
        train = subprocess.run(
            [sys.executable, str(REPO / "tests" / "intervene_train.py"), "--name", "spike",
             "--socket", str(d.socket), "--ckpt-dir", str(root / "ckpt"), "--out", str(root / "out"),
             "--steps", "170", "--bad", str(BAD), "--step-seconds", "0.03"],
            capture_output=True, text=True, timeout=180)
        assert train.returncode == 0, train.stderr[-4000:]
        # A second run with no incident: a handful of healthy steps sent byte by byte.
        raw = RawClient(d.socket)
        raw.hello(run="healthy")
        names = ("loss", "grad_norm")
        for step in range(60):
            raw.send(protocol.samples_frame(step + 1, [protocol.encode_block(
                names, [step], [time.time()], [[2.0 - step / 60, 0.5 + 0.01 * (step % 5)]])]))
            assert raw.read()[0] == Kind.ACK
        raw.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "incident 1: resolved" not in d.log():
            time.sleep(0.1)
    finally:
        assert d.terminate() == 0  # everything below reads the store with no daemon running
    yield Ran(root, d.state_dir)
    shutil.rmtree(root, ignore_errors=True)


def report(ran: Ran, *args: str) -> dict[str, Any]:
    """``runwatch report ARGS --json`` as a user runs it (a separate process)."""
    r = subprocess.run([sys.executable, "-m", "runwatch.daemon", "report", *args, "--state-dir",
                        str(ran.state_dir), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return json.loads(r.stdout)


def check_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        w, h = img.size
        assert 800 <= w <= 3000 and 500 <= h <= 3000, img.size
        colors = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is not None and len(colors) > 50  # drawn on, not a blank canvas


def test_the_incident_report_shows_fire_pause_rewind_and_resume_from_the_store_alone(ran: Ran) -> None:
    out = ran.root / "report"
    s = report(ran, "spike", "--out", str(out))
    inc = s["incident"]
    assert inc["id"] == 1 and inc["rule"] == "grad_norm_divergence" and inc["first_step"] == BAD
    assert inc["state"] == "resolved"

    # The HTML references the PNGs, and they are real images of a sane size.
    page = Path(s["html"]).read_text()
    assert Path(s["html"]) == out / "report.html"
    assert [Path(p).name for p in s["plots"]] == ["incident.png", "run.png"]
    for p in s["plots"]:
        assert f"<img src='{Path(p).name}'" in page
        check_png(Path(p))

    # The timeline: fired, paused, rewound and resumed, in that order, in the JSON and the page.
    events = [r["event"] for r in s["timeline"]]
    order = [events.index(e) for e in ("fired", "paused", "dumped", "rewound", "resumed", "resolved")]
    assert order == sorted(order), events
    fired = s["timeline"][events.index("fired")]
    rewound = s["timeline"][events.index("rewound")]
    assert fired["step"] == BAD and rewound["step"] > BAD
    shown = re.findall(r"<span class='ev-[^']*'>([^<]*)</span>", page)
    assert [e for e in shown if e in ("fired", "paused", "rewound", "resumed")] == [
        "fired", "paused", "rewound", "resumed"]

    # The rewind target is the clean checkpoint: the newest one saved before the spike with
    # confirm_steps (5) healthy steps after it, here step 100 (checkpoints every 20).
    [rw] = s["rewinds"]
    before = [c["step"] for c in s["checkpoints"] if c["step"] < BAD]
    assert rw["target_step"] == max(before) == 100
    assert rw["checkpoint"].endswith("step-000000100") and rw["lr_scale"] == pytest.approx(0.1)
    assert rw["at_step"] == rewound["step"] and rw["resumed"]
    assert "100 <b>(rewind target)</b>" in page

    # The band is the rule's own baseline: replayed from the stored series it gives, at the
    # firing step, the baseline the rule stored when it fired.
    band = s["band"]
    assert band["rule"] == "grad_norm_divergence"
    assert "5x the median of the last 128 steps" in band["describe"]
    assert band["at_firing"]["recomputed"] == pytest.approx(band["at_firing"]["stored"], rel=1e-9)

    # The dumped batches, the corrupted one first; what was skipped.
    dumped = {d["step"]: d for d in s["dumped"]}
    assert set(dumped) == {BAD, BAD + 1}
    assert dumped[BAD]["tensors"]["labels"]["shape"] == [8, 32]
    assert dumped[BAD]["tensors"]["labels"]["values"].startswith("min 0, max 63")
    assert dumped[BAD]["loss"] > 3 * dumped[BAD + 1]["loss"]
    assert "the step the rule fired on" in page
    assert s["skipped"]["rewound_steps"] == [{"from_step": 100, "to_step": rw["at_step"] - 1,
                                              "steps": rw["at_step"] - 100, "extra_batches_skipped": 0}]
    assert BAD in s["skipped"]["guard_skipped_steps"]
    assert "What was skipped" in page and "optimizer steps undone by the rewind" in page


def test_without_incident_it_reports_the_newest_one_or_the_plain_run(
        ran: Ran, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--state-dir", str(ran.state_dir), "--json"]
    assert main(["report", "spike", "--incident", "1", "--out", str(tmp_path / "a"), *common]) == 0
    chosen = json.loads(capsys.readouterr().out)
    assert chosen["incident"]["id"] == 1

    assert main(["report", "healthy", "--out", str(tmp_path / "b"), *common]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["incident"] is None and plain["timeline"] == [] and plain["rewinds"] == []
    assert [Path(p).name for p in plain["plots"]] == ["run.png"]
    check_png(tmp_path / "b" / "run.png")
    page = (tmp_path / "b" / "report.html").read_text()
    assert "No incident recorded for this run" in page and "<img src='run.png'" in page


@pytest.mark.parametrize(("args", "code", "message"), [
    (["nope"], EXIT_USAGE, "no run named 'nope'"),
    (["spike", "--incident", "99"], EXIT_USAGE, "no incident 99"),
    (["healthy", "--incident", "1"], EXIT_USAGE, "incident 1 belongs to run 'spike', not 'healthy'"),
])
def test_a_wrong_run_or_incident_is_refused_with_the_reason(
        ran: Ran, tmp_path: Path, args: list[str], code: int, message: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", *args, "--state-dir", str(ran.state_dir), "--out", str(tmp_path / "r")]) == code
    err = capsys.readouterr().err
    assert err.startswith("runwatch report: ") and message in err, err
    assert not (tmp_path / "r").exists()  # nothing written


def test_no_store_where_the_settings_say_is_refused(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "spike", "--state-dir", str(tmp_path / "empty")]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"no runwatch store at {tmp_path / 'empty' / 'runwatch.db'}" in err and "--state-dir" in err


class NotATensor:
    pass


def test_dumped_batches_are_read_without_torch_and_nothing_else_is_unpickled(tmp_path: Path) -> None:
    import numpy as np
    import torch

    from runwatch.daemon.report import load_dumped

    batch = {"step": 3, "shard": "s", "offset": 7, "args": (torch.randn(4, 5).t(),),  # strided
             "kwargs": {"b": torch.randn(3).to(torch.bfloat16), "i": torch.arange(10)[2:9:3],
                        "m": torch.tensor([True, False]), "h": torch.randn(2, 2).half()}}
    torch.save(batch, tmp_path / "b.pt")
    got = load_dumped(tmp_path / "b.pt")
    assert (got["step"], got["shard"], got["offset"]) == (3, "s", 7)
    assert np.array_equal(got["args"][0], batch["args"][0].numpy())
    assert np.array_equal(got["kwargs"]["b"], batch["kwargs"]["b"].float().numpy())
    for key in ("i", "m", "h"):
        assert np.array_equal(got["kwargs"][key], batch["kwargs"][key].numpy())
    torch.save({"args": (NotATensor(),)}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="is not a tensor"):
        load_dumped(tmp_path / "evil.pt")
