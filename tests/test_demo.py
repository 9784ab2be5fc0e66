"""``runwatch demo`` (what ``make demo`` runs), as a user runs it: every stage happens, in order,
within the two minutes the README promises on a 2-core machine."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

# What the output must show, in this order (each the first line that matches after the one before).
STAGES = [
    ("daemon", r"1\. start the node daemon"),
    ("daemon up", r"daemon pid \d+ on "),
    ("training", r"2\. train a tiny GPT on the CPU"),
    ("guard armed", r"guard mode skip"),
    ("signals", r"^\s+10\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+\s+\S+e-0\d"),
    ("checkpoint", r"checkpoint of step 100 saved"),
    ("bad batch", r"3\. a bad batch at step 130"),
    ("spike", r"^spike\s+step 130: .*gradient norm of [\d.]+, \d+x the median"),
    ("guard skip", r"^guard\s+the spike guard refused step 130's update"),
    ("fired", r"^fired\s+grad_norm_divergence fired on rank 0 at step 130"),
    ("paused", r"^paused\s+paused before step 1[3-9]\d on every rank"),
    ("dumped", r"^dumped\s+dumped 4 batches to \S+incident-1/rank0"),
    ("dumped batch", r"batch-\d-step130\.pt: step 130, args\[0\] int64 \[8, 32\].*the step the rule"),
    ("rewound", r"^rewound\s+to the checkpoint of step 100; learning rate now x0\.1 of the original"),
    ("resumed", r"5\. training resumes from the clean checkpoint, learning rate x0\.1"),
    ("resumed signals", r"^\s+1[3-9]\d\s+\d+\.\d+\s+\d+\.\d+"),
    ("resolved", r"^resolved\s+incident 1: healthy for 50 steps"),
    ("tiers", r"6\. checkpoint tiers"),
    ("every nth", r"every Nth checkpoint: kept for good"),
    ("stopped", r"daemon exited with code 0"),
    ("report", r"8\. the incident report"),
    ("rewind target", r"rewind target: the checkpoint of step 100"),
    ("report path", r"^report: (\S+report\.html)"),
    ("wall time", r"demo finished in ([\d.]+)s \(wall time\)"),
]


def test_the_demo_shows_every_stage_in_order_in_under_two_minutes() -> None:
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "runwatch.daemon", "demo"], capture_output=True, text=True,
                       timeout=180)
    took = time.monotonic() - started
    out = r.stdout
    tmp = re.search(r"everything the demo wrote is in (\S+)", out)
    try:
        assert r.returncode == 0, (out[-6000:], r.stderr[-4000:])
        lines = out.splitlines()
        at, found = 0, {}
        for name, pattern in STAGES:
            hit = next((i for i in range(at, len(lines)) if re.search(pattern, lines[i])), None)
            assert hit is not None, f"stage {name!r} ({pattern}) missing after line {at}:\n" + "\n".join(
                lines[max(0, at - 5):at + 40])
            found[name], at = (hit, re.search(pattern, lines[hit])), hit + 1
        # The console receiver delivered the firing, after the timeline showed it.
        receiver = next(i for i, line in enumerate(lines)
                        if "console receiver ▸ [FIRING:critical] grad_norm_divergence on demo-gpt" in line)
        assert receiver > found["fired"][0]
        assert "Traceback" not in out + r.stderr
        report = Path(found["report path"][1].group(1))
        page = report.read_text()
        for png in ("incident.png", "run.png"):
            assert f"<img src='{png}'" in page
            with Image.open(report.parent / png) as img:
                assert img.size[0] > 800
        wall = float(found["wall time"][1].group(1))
        print(f"\nrunwatch demo: {wall:.1f}s wall time by its own clock, {took:.1f}s for the whole process")
        assert wall < 120 and took < 120
    finally:
        if tmp:
            shutil.rmtree(tmp.group(1), ignore_errors=True)
