"""Drift monitors' cost: the daemon per monitor per window (and per data-shard window), memory vs
window size, and the hook's added per-step time: the three built-in histograms (seq_length,
output_entropy, one layer's activation_values), then with the per-token loss histogram
(``token_loss="aligned"``) and per-shard seq_length slots (``watch.batch(shard=...)``) on top.

    python bench/drift.py [--device cuda] [--steps 200] [--repeats 3] [--threads N]

On ``cuda`` the timed steps of the full configuration also run under
``torch.cuda.set_sync_debug_mode("error")``: a host-device sync added by a histogram raises.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from typing import Any

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
    assert m.add(1, steps[0])  # untimed: the first window imports scipy.stats (lazily, ~1 s)
    t = time.perf_counter()
    for i in range(windows):
        assert m.add(i + 2, steps[i % 64])
    return (time.perf_counter() - t) / windows * 1e6


def shard_cost(rows: int = 2000, shards: int = 4) -> float:
    """µs per histogram row carrying ``shards`` shard slots: each slot's add_shard (a shard
    window closes every other row) plus the worst-shard scan over the followed shards."""
    cfg = DriftConfig(lo=-4, hi=4, warmup_steps=0, reference_steps=1, min_reference_values=1,
                      window_values=1024, shard_window_values=256)
    rng = np.random.default_rng(0)
    m = DriftMonitor("bench", cfg, fine_counts(rng.normal(size=100_000), -4, 4, 128))
    steps = [fine_counts(rng.normal(size=128), -4, 4, 128) for _ in range(64)]
    t = time.perf_counter()
    for i in range(rows):
        for j in range(shards):
            m.add_shard((i * shards + j) % 64, i, steps[(i + j) % 64])
        m.worst_shard(i)
    return (time.perf_counter() - t) / rows * 1e6


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


def hook_step_ms(device: str, steps: int, mode: str) -> float:
    """ms per training step with ``mode``: ``off`` (no histograms), ``builtin`` (the three
    built-in ones) or ``all`` (built-in, token_loss and 4 shards' seq_length slots)."""
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
    # Built-in: seq_length, output_entropy and the activations of one layer.
    w = Watch(model, opt, run="bench", sender=Null(), guard="off", layers=["blocks.0"],  # type: ignore[arg-type]
              histogram_every=0 if mode == "off" else 16, token_loss="aligned" if mode == "all" else None)
    ids = torch.randint(0, 64, (16, 128 if big else 32), device=device)
    labels = ids.clone()
    labels[:, -8:] = -100  # some padding, so useful lengths and skipped positions are real work

    def step(i: int) -> None:
        if mode == "all":
            w.batch(shard=i // 2 % 4)  # 4 shards a flush: every slot in use
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(20):
        step(i)
    if big:
        torch.cuda.synchronize()
    check = big and mode == "all"
    if check:
        torch.cuda.set_sync_debug_mode("error")
    try:
        t = time.perf_counter()
        for i in range(steps):
            step(i)
        if big:
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
        elapsed = (time.perf_counter() - t) / steps * 1e3
    finally:
        if check:
            torch.cuda.set_sync_debug_mode("default")
    if not w.enabled:  # a hook that failed (a sync under the debug mode, say) switches itself off
        raise SystemExit(f"monitoring switched itself off during the timed steps of mode {mode!r} "
                         "(the log above says why); these timings are not valid")
    w.close()
    return elapsed


def new_histograms_us(device: str, reps: int = 300) -> tuple[float, float]:
    """µs per sampled step of (token_loss at 256 sampled positions of [16, T, V] logits into its
    histogram, one shard slot's seq_length add of 16 lengths): the new histograms alone, timed in
    a loop (synchronized around it on a GPU), which a noisy machine blurs less than whole steps."""
    from runwatch.hooks.histograms import DeviceHistogram, Sampler, token_loss_sample

    big = device == "cuda"
    dev = torch.device(device)
    seq, vocab = (128, 512) if big else (32, 64)
    logits = torch.randn(16, seq, vocab, device=dev)
    labels = torch.randint(0, vocab, (16, seq), device=dev)
    lengths = (labels != -100).sum(1)
    loss_h = DeviceHistogram("token_loss", 0.0, 16.0, 128, dev)
    slot_h = DeviceHistogram("seq_length@shard0", 0.0, seq + 1.0, min(128, seq + 1), dev)
    sampler = Sampler(dev)

    def timed(fn: Any) -> float:
        for _ in range(20):
            fn()
        if big:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        if big:
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / reps * 1e6

    loss = timed(lambda: loss_h.add(token_loss_sample(logits, labels, sampler, shift=False,
                                                      ignore_index=-100)))
    slot = timed(lambda: slot_h.add(lengths))
    return loss, slot


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    p.add_argument("--repeats", type=int, default=3, help="interleaved measurements per mode (median)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (a shared CPU box: 1 is steadier)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    print(f"daemon: {daemon_cost():.1f} µs per monitor per completed window (128 fine bins -> 10 coarse)")
    print(f"daemon: {shard_cost():.1f} µs per histogram row with 4 shard slots (add_shard x4 + worst shard)")
    for n in (1_000, 1_000_000):
        print(f"daemon: window of {n:>9,} values: peak {memory(n) / 1024:.1f} KiB allocated by the monitor")
    loss_us, slot_us = new_histograms_us(a.device)
    print(f"hook on {a.device}: token_loss {loss_us:.1f} µs and a shard slot {slot_us:.1f} µs per sampled "
          f"step (filled one step in 4: {(loss_us + 4 * slot_us) / 4:.1f} µs a step amortised, "
          "4 slots in use)")
    # Interleave to share the machine's noise; report the medians.
    times: dict[str, list[float]] = {"off": [], "builtin": [], "all": []}
    for _ in range(a.repeats):
        for mode in times:
            times[mode].append(hook_step_ms(a.device, a.steps, mode))
    o, b, f = (float(np.median(times[m])) for m in ("off", "builtin", "all"))
    name = torch.cuda.get_device_name() if a.device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"hook on {a.device} ({name}), median of {a.repeats} x {a.steps} steps:")
    print(f"  no histograms:                          {o:8.3f} ms/step")
    print(f"  3 built-in histograms:                  {b:8.3f} ms/step  (+{b - o:.3f} ms, "
          f"{100 * (b - o) / o:+.2f}%)")
    print(f"  + token_loss + 4 shard slots:           {f:8.3f} ms/step  ({f - b:+.3f} ms over built-in, "
          f"{100 * (f - o) / o:+.2f}% over none)")
    if a.device == "cuda":
        print("  the full configuration ran under torch.cuda.set_sync_debug_mode('error'): "
              "no host-device sync")


if __name__ == "__main__":
    main()
