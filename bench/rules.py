"""What the default rule pack costs ingest: points/s with the pack on against rules off.

Both sides are ``bench/ingest.py``'s ingest measurement: the real daemon pinned to one CPU,
``--ranks`` clients on another sending hook-like frames (200 metrics x 10 steps, including
every key the default pack judges: loss, grad_norm, micro-batch norms, token efficiency,
tokens/s and 24 layers of activation norms) as fast as the daemon acknowledges. Trials
alternate rules off / rules on (``--trials`` pairs, a fresh daemon and store each) so drift
of the machine hits both sides alike; medians are compared.

Target (from the issue): rules cost at most 30% of ingest throughput, i.e. on/off >= 0.70.

    .venv/bin/python bench/rules.py [--trials 3] [--duration 8] [--dir /dev/shm] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from ingest import (
    BenchError,
    Config,
    machine,
    metric_names,
    run_ingest,
    step_values,
)

TARGET_KEPT = 0.70


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=3, help="pairs of off/on trials (default 3)")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per trial (default 8)")
    p.add_argument("--metrics", type=int, default=200)
    p.add_argument("--steps-per-frame", type=int, default=10)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--dir", type=Path, default=None, help="where the temporary stores go")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.trials < 1 or a.duration <= 0:
        p.error("--trials >= 1 and --duration > 0")
    cfg = Config(a.metrics, a.steps_per_frame, a.ranks, a.duration, 2.0, 32, 0, 1, None, 0, 1,
                 a.dir, 0, a.json)
    names = metric_names(cfg.metrics)
    values = step_values(names, cfg.steps_per_frame, cfg.seed)
    rates: dict[str, list[float]] = {"off": [], "on": []}
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for trial in range(a.trials):
            for side in ("off", "on"):
                with tempfile.TemporaryDirectory(prefix="runwatch-bench-rules-", dir=a.dir) as tmp:
                    r = run_ingest(cfg, names, values, Path(tmp), rules=side == "on")
                if r.points_stored != r.points_acked_total:
                    raise BenchError(f"trial {trial} rules {side}: {r.points_stored:,} stored,"
                                     f" {r.points_acked_total:,} acknowledged")
                rates[side].append(r.points_per_second)
                cpu[side].append(r.points_per_daemon_cpu_second)
                if not a.json:
                    print(f"trial {trial + 1} rules {side:3}: {r.points_per_second:>12,.0f} points/s"
                          f"  ({r.points_per_daemon_cpu_second:,.0f} per daemon CPU-s)", flush=True)
    except BenchError as exc:
        print(f"bench/rules.py: {exc}", file=sys.stderr)
        return 1
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    kept = on / off
    ns_per_point = 1e9 * (1 / statistics.median(cpu["on"]) - 1 / statistics.median(cpu["off"]))
    result = {
        "machine": machine(),
        "config": {"trials": a.trials, "duration": a.duration, "metrics": a.metrics,
                   "steps_per_frame": a.steps_per_frame, "ranks": a.ranks},
        "points_per_second": rates,
        "median_off": off,
        "median_on": on,
        "kept": kept,
        "cost": 1 - kept,
        "rules_cpu_ns_per_point": ns_per_point,
        "meets_target": kept >= TARGET_KEPT,
    }
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"\nmedian rules off {off:,.0f} points/s, rules on {on:,.0f} points/s")
        print(f"rules cost {100 * (1 - kept):.1f}% of ingest throughput (target <= 30%):"
              f" {'MET' if result['meets_target'] else 'NOT MET'}")
        print(f"rule evaluation: {ns_per_point:.0f} ns of daemon CPU per point")
    return 0


if __name__ == "__main__":
    sys.exit(main())
