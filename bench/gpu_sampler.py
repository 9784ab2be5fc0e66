"""Print what the node sampler reads on a real GPU, idle and under load.

Samples every GPU once a second for ``--seconds`` seconds; for the middle third a bf16 matmul
loop keeps GPU 0 busy, so utilization, SM activity (GPM, Hopper and newer), power, clocks and
temperature move. Prints one line per sample and a JSON summary (``--json FILE``).

    python bench/gpu_sampler.py [--seconds 12] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

from runwatch.daemon.sampler import Sampler

LOAD = """
import sys, time, torch
start, end = float(sys.argv[1]), float(sys.argv[2])
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
torch.cuda.synchronize()
while time.time() < start:
    time.sleep(0.01)
while time.time() < end:
    for _ in range(20):
        a = (a @ a).clamp_(-1, 1)
    torch.cuda.synchronize()
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=12)
    p.add_argument("--json")
    a = p.parse_args()
    sampler = Sampler.open()
    if sampler.gpus is None:
        print(f"no GPU: {sampler.no_gpu_reason}")
    t0 = time.time()
    third = a.seconds / 3
    # The load runs in its own process (CUDA set up before it starts), in the middle third.
    worker = subprocess.Popen([sys.executable, "-c", LOAD, str(t0 + third), str(t0 + 2 * third)])
    rows = []
    cost = []
    for _ in range(a.seconds):
        started = time.perf_counter()
        s = sampler.sample()
        cost.append(time.perf_counter() - started)
        phase = "load" if third + 0.5 <= s.time - t0 <= 2 * third - 0.5 else "idle"
        for g in s.gpus:
            v = g.values
            line = {
                "t": round(s.time - t0, 1),
                "phase": phase,
                "gpu": g.index,
                "name": g.name,
                **{k: (None if math.isnan(x) else round(x, 4)) for k, x in v.items()},
                "processes": len(g.processes),
            }
            rows.append(line)
            print(json.dumps(line))
        time.sleep(max(0.0, 1.0 - (time.perf_counter() - started)))
    worker.wait()
    sampler.close()
    summary = {
        "gpu": rows[0]["name"] if rows else None,
        "sample_ms_median": round(1000 * sorted(cost)[len(cost) // 2], 2),
        "idle_util_max": max(
            (r["gpu_utilization"] or 0) for r in rows if r["phase"] == "idle" and r["gpu"] == 0
        )
        if rows
        else None,
        "load_util_min": min(
            (r["gpu_utilization"] or 0) for r in rows if r["phase"] == "load" and r["gpu"] == 0
        )
        if rows
        else None,
        "load_sm_active_max": max(
            ((r["gpu_sm_active"] or 0) for r in rows if r["phase"] == "load"), default=None
        ),
        "fields_missing": sorted({k for r in rows for k, x in r.items() if x is None}),
    }
    print("summary", json.dumps(summary))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"summary": summary, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
