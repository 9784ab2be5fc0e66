"""What the straggler comparison costs the daemon: ``RankComparison.derive`` per step.

    python bench/ranks.py [--ranks 64] [--steps 2000] [--per-frame 1]

Feeds each rank's frames in turn (the way they arrive) with one slow rank, and prints the
cost per step per rank and the lag it derives for the slow rank and a typical one.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from runwatch.daemon.protocol import Block
from runwatch.daemon.ranks import RankComparison
from runwatch.daemon.store import StreamInfo

NAMES = ("loss", "data_wait_seconds", "forward_seconds", "step_duration_seconds")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ranks", type=int, default=64)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--per-frame", type=int, default=1, help="steps per frame (the hook's flush_every)")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    streams = [StreamInfo(r + 1, "bench", r, a.ranks, "h", 1, 0, "x") for r in range(a.ranks)]
    comparison = RankComparison()
    last: dict[int, float] = {}
    elapsed = 0.0
    for start in range(0, a.steps, a.per_frame):
        steps = np.arange(start, start + a.per_frame)
        for s in streams:
            own = 0.02 + (0.06 if s.rank == 1 else 0.0)
            n = len(steps)
            values = np.column_stack([rng.normal(2, 0.1, n), rng.normal(own / 2, 0.002, n),
                                      rng.normal(own / 2, 0.002, n), rng.normal(0.1, 0.003, n)])
            block = Block(NAMES, steps, steps.astype(float), values)
            t0 = time.perf_counter()
            out = comparison.derive(s, [block])
            elapsed += time.perf_counter() - t0
            if out and "rank_lag_fraction" in out[-1].names:
                last[s.rank] = float(out[-1].values[-1, -1])
    per = elapsed / (a.steps * a.ranks) * 1e6
    print(f"{a.ranks} ranks x {a.steps} steps, {a.per_frame} step(s) per frame: {per:.1f} us per step "
          f"per rank ({per * a.ranks * 10 / 1e4:.2f}% of one core at 10 steps/s)")
    slow, other = last.get(1, float("nan")), last.get(0, float("nan"))
    print(f"lag derived: slow rank 1 {slow:.2f} (true 0.60), rank 0 {other:.3f}")


if __name__ == "__main__":
    main()
