"""Drift monitors' cost: the daemon per monitor per window, memory vs window size, and the
hook's added per-step time for three histograms.

    python bench/drift.py [--device cuda] [--steps 200]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
import torch

from runwatch.daemon.drift import DriftConfig, DriftMonitor, fine_counts


def daemon_cost(windows: int = 2000) -> float:
    """µs per completed window: DriftMonitor.add of one step that completes it (coarse binning,
    PSI, JS, thresholds, debounce)."""
    cfg = DriftConfig(lo=-4, hi=4, warmup_steps=0, reference_steps=1, min_reference_values=1,
                      window_values=1024)
    m = DriftMonitor("bench", cfg)
    rng = np.random.default_rng(0)
    m.add(0, fine_counts(rng.normal(size=100_000), -4, 4, 128))
    steps = [fine_counts(rng.normal(size=1024), -4, 4, 128) for _ in range(64)]
    t = time.perf_counter()
    for i in range(windows):
        assert m.add(i + 1, steps[i % 64])
    return (time.perf_counter() - t) / windows * 1e6


def memory(window_values: int, steps: int = 50) -> int:
    """Peak bytes allocated by a monitor fed windows of ``window_values`` values (as counts)."""
    rng = np.random.default_rng(0)
    per_step = fine_counts(rng.normal(size=10_000), -4, 4, 128) * (window_values // 10_000 or 1)
    cfg = DriftConfig(lo=-4, hi=4, warmup_steps=0, reference_steps=1, min_reference_values=1,
                      window_values=window_values)
    tracemalloc.start()
    m = DriftMonitor("bench", cfg)
    for i in range(steps):
        m.add(i, per_step)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def hook_step_ms(device: str, steps: int, histograms: bool) -> float:
    from runwatch.hooks.tinygpt import TinyGPT
    from runwatch.hooks.watch import Watch

    class Null:
        dropped_points = 0
        early_commands: list[object] = []  # noqa: RUF012
        on_command = None

        def put(self, batch: object) -> None: ...
        def put_event(self, event: object) -> None: ...
        def flush(self, timeout: float = 0) -> bool: return True
        def close(self, timeout: float = 0) -> None: ...

    torch.manual_seed(0)
    big = device == "cuda"
    model = TinyGPT(vocab=512 if big else 64, dim=128 if big else 32, layers=4 if big else 2,
                    heads=4 if big else 2, context=128 if big else 32).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # Three histograms: seq_length, output_entropy and the activations of one layer.
    w = Watch(model, opt, run="bench", sender=Null(), guard="off", layers=["blocks.0"],  # type: ignore[arg-type]
              histogram_every=16 if histograms else 0)
    ids = torch.randint(0, 64, (16, 128 if big else 32), device=device)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(20):
        step()
    if big:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if big:
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - t) / steps * 1e3
    w.close()
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=200)
    a = p.parse_args()
    print(f"daemon: {daemon_cost():.1f} µs per monitor per completed window (128 fine bins -> 10 coarse)")
    for n in (1_000, 1_000_000):
        print(f"daemon: window of {n:>9,} values: peak {memory(n) / 1024:.1f} KiB allocated by the monitor")
    # Interleave to share the machine's noise; report the medians.
    off, on = [], []
    for _ in range(3):
        off.append(hook_step_ms(a.device, a.steps, False))
        on.append(hook_step_ms(a.device, a.steps, True))
    o, h = float(np.median(off)), float(np.median(on))
    print(f"hook on {a.device}: {o:.3f} ms/step without histograms, {h:.3f} ms/step with three "
          f"(+{h - o:.3f} ms, {100 * (h - o) / o:+.1f}%)")


if __name__ == "__main__":
    main()
