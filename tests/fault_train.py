"""A small real training run (TinyGPT on CPU, hook attached) with one injected fault.

    python tests/fault_train.py --run NAME --socket PATH --steps N [--seed S]
                                [--fault KIND --at STEP]

Healthy data: a learnable sequence task in batches of 8 whose rows are padded to 32 tokens
from a random length of 24-32 (labels -100 on the padding), so token efficiency is about
0.87 with ordinary batch-to-batch noise; a new data shard every 50 steps; LR warm-up then
cosine decay. Faults, from ``--at`` on:

=============  =====================================================================
bad_batch      one batch of random labels, its loss scaled 20x (a corrupted batch)
lr_blowup      the learning rate multiplied by 100 (a schedule gone wrong)
nan            the loss of one step is NaN
padding        shard 99 for 20 steps: rows of 6-10 real tokens (padding-heavy)
slow_loader    every batch takes 3x the usual step time to load (use with --step-seconds:
               tiny CPU steps of a few ms are at the mercy of host scheduling)
input_shift    inputs drawn from 4 of the 64 tokens (a shifted input distribution)
length_shift   rows of 12-20 real tokens from then on (a data source of shorter sequences:
               the seq_length drift monitor's case)
=============  =====================================================================
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import runwatch.hooks
from runwatch.hooks.tinygpt import TinyGPT

VOCAB, CONTEXT, BATCH, SHARD_STEPS = 64, 32, 8, 50
FAULTS = ("bad_batch", "lr_blowup", "nan", "padding", "slow_loader", "input_shift", "length_shift")


def make_batch(
    g: torch.Generator, min_len: int, max_len: int, vocab: int = VOCAB
) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.randint(0, vocab, (BATCH, 1), generator=g)
    stride = torch.randint(1, 4, (BATCH, 1), generator=g)
    seq = (start + stride * torch.arange(CONTEXT + 1)) % vocab
    inputs, labels = seq[:, :-1].clone(), seq[:, 1:].clone()
    lengths = torch.randint(min_len, max_len + 1, (BATCH, 1), generator=g)
    pad = torch.arange(CONTEXT) >= lengths
    inputs[pad] = 0
    labels[pad] = -100
    return inputs, labels


def train(
    run: str, socket: str | None, steps: int, seed: int, fault: str | None, at: int, step_seconds: float = 0.0
) -> None:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = TinyGPT(vocab=VOCAB, context=CONTEXT)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    warmup = 100
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))
    )
    watch = runwatch.hooks.watch(model, optimizer, run=run, socket=socket, flush_every=8)
    durations: list[float] = []
    for step in range(steps):
        t0 = time.perf_counter()
        faulty = fault is not None and step >= at
        shard = step // SHARD_STEPS
        if faulty and fault == "padding" and step < at + 20:
            shard = 99
            inputs, labels = make_batch(g, 6, 10)
        elif faulty and fault == "input_shift":
            inputs, labels = make_batch(g, 24, 32, vocab=4)
        elif faulty and fault == "length_shift":
            inputs, labels = make_batch(g, 12, 20)
        else:
            inputs, labels = make_batch(g, 24, 32)
        if faulty and fault == "slow_loader":
            time.sleep(3 * statistics.median(durations[-50:]))
        if faulty and fault == "bad_batch" and step == at:
            labels = torch.where(labels >= 0, torch.randint(0, VOCAB, labels.shape, generator=g), labels)
        if faulty and fault == "lr_blowup" and step == at:
            # From this step's update on: the schedule's base and the rate in force.
            schedule.base_lrs = [lr * 100 for lr in schedule.base_lrs]
            for group in optimizer.param_groups:
                group["lr"] *= 100
        watch.batch(shard=str(shard), offset=step * BATCH)
        loss = model(inputs, labels=labels).loss
        if faulty and fault == "bad_batch" and step == at:
            loss = loss * 20
        if faulty and fault == "nan" and step == at:
            loss = loss * float("nan")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step_seconds:
            # A GPU-bound step: the host waits for the device (inside the step) this long at least.
            time.sleep(max(0.0, step_seconds - (time.perf_counter() - t0)))
        optimizer.step()
        schedule.step()
        durations.append(time.perf_counter() - t0)
    watch.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run", required=True)
    p.add_argument("--socket")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fault", choices=FAULTS)
    p.add_argument("--at", type=int, default=300)
    p.add_argument("--step-seconds", type=float, default=0.0, help="make each step take at least this long")
    a = p.parse_args()
    torch.set_num_threads(1)
    train(a.run, a.socket, a.steps, a.seed, a.fault, a.at, a.step_seconds)


if __name__ == "__main__":
    main()
