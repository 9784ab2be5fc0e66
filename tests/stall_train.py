"""A real CPU training (TinyGPT, gloo DDP under torchrun) that hangs, straggles or evaluates.

    torchrun --nproc-per-node=2 tests/stall_train.py --name NAME --socket PATH --steps N
        --incident-dir DIR
        [--step-seconds S]                  each step takes at least S (waiting inside the step)
        [--hang-rank R --hang-at STEP]      after STEP, rank R enters a collective no one joins
        [--slow-rank R --slow-seconds S]    rank R's forward takes S longer (a slow host)
        [--eval-every K --eval-seconds S]   rank 0 "evaluates" for S every K steps, in a phase

A hung rank waits inside ``all_reduce`` on a group the other rank never uses; the other rank
goes on to the next step and waits inside DDP's gradient all-reduce for it: both are stuck
inside collectives, one of them a step ahead.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import intervene_train

import runwatch.hooks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--name", required=True)
    p.add_argument("--socket", required=True)
    p.add_argument("--incident-dir", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--step-seconds", type=float, default=0.0)
    p.add_argument("--hang-rank", type=int, default=-1)
    p.add_argument("--hang-at", type=int, default=-1)
    p.add_argument("--slow-rank", type=int, default=-1)
    p.add_argument("--slow-seconds", type=float, default=0.0)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--eval-seconds", type=float, default=0.0)
    a = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    rank = dist.get_rank()
    side = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=600))
    model, optimizer, schedule = intervene_train.make(a.steps)
    if rank == a.slow_rank:  # slow compute: inside the model's forward
        next(model.children()).register_forward_pre_hook(lambda *_: time.sleep(a.slow_seconds))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    watch = runwatch.hooks.watch(ddp, optimizer, run=a.name, socket=a.socket, flush_every=1,
                                 incident_dir=a.incident_dir)
    for step in range(a.steps):
        t0 = time.perf_counter()
        x, y = intervene_train.batch_at(step, rank)
        loss = ddp(x, labels=y).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        time.sleep(max(0.0, a.step_seconds - (time.perf_counter() - t0)))
        optimizer.step()
        schedule.step()
        if a.eval_every and (step + 1) % a.eval_every == 0:
            with watch.phase("eval"):
                if rank == 0:
                    time.sleep(a.eval_seconds)
                dist.barrier()
        if rank == a.hang_rank and step == a.hang_at:
            print(f"rank {rank} hangs after step {step}", flush=True)
            dist.all_reduce(torch.zeros(1), group=side)  # no other rank joins: waits here
    watch.close()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
