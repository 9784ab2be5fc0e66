"""A real CPU training (TinyGPT) that the daemon can pause and rewind; one process or a rank
of torchrun (gloo DDP).

    python tests/intervene_train.py --name NAME --socket PATH --ckpt-dir DIR --out PREFIX
        [--steps N] [--bad I,J,...] [--ckpt-every K] [--step-seconds S --slow-from STEP]
        [--local-ckpt-rank R]

``--socket`` may list several daemons' sockets (``A,B``): the ranks split between them in
contiguous blocks, as ranks split between nodes, each node with its own daemon.
``--local-ckpt-rank R`` gives rank R a checkpoint folder of its own (``DIR-rank<R>``, empty:
rank 0 saves into DIR), as if DIR were a node-local disk on rank 0's node: R cannot load
what rank 0 saved.

Batches come from ``batch_at(index)``, a pure function of the data index (and rank), read
through ``watch.data`` so a rewind's skips are honoured. Data index ``I`` in ``--bad`` is a
corrupted batch (random labels, loss x20). Writes ``PREFIX.rank<R>.json`` (the data index
trained at each step, where rewinds took effect) and ``PREFIX.rank<R>.pt`` (final weights).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

import runwatch.hooks
from runwatch.hooks.tinygpt import TinyGPT

VOCAB, CONTEXT, BATCH, WARMUP = 64, 32, 8, 50


def batch_at(index: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1_000_003 * rank + index)
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
    stride = torch.randint(1, 4, (BATCH, 1), generator=g)
    seq = (start + stride * torch.arange(CONTEXT + 1)) % VOCAB
    return seq[:, :-1].clone(), seq[:, 1:].clone()


def corrupt(labels: torch.Tensor, index: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7 + index)
    return torch.randint(0, VOCAB, labels.shape, generator=g)


def make(steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = TinyGPT(vocab=VOCAB, context=CONTEXT)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, foreach=False)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / WARMUP) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))
    return model, optimizer, schedule


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: object, index: int,
               rank: int, bad: set[int]) -> None:
    x, y = batch_at(index, rank)
    scale = 1.0
    if index in bad:
        y, scale = corrupt(y, index), 20.0
    loss = model(x, labels=y).loss * scale
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()  # type: ignore[attr-defined]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--name", required=True, help="run name (not --run: torchrun would take it)")
    p.add_argument("--socket", required=True)
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=170)
    p.add_argument("--bad", default="")
    p.add_argument("--ckpt-every", type=int, default=20)
    p.add_argument("--step-seconds", type=float, default=0.0)
    p.add_argument("--slow-from", type=int, default=0)
    p.add_argument("--control-every", type=int, default=4)
    p.add_argument("--local-ckpt-rank", type=int, default=-1)
    a = p.parse_args()
    torch.set_num_threads(1)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    bad = {int(i) for i in a.bad.split(",") if i}
    model, optimizer, schedule = make(a.steps)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    sockets = a.socket.split(",")
    world = dist.get_world_size() if distributed else 1
    ckpt_dir = f"{a.ckpt_dir}-rank{rank}" if rank == a.local_ckpt_rank else a.ckpt_dir
    watch = runwatch.hooks.watch(model, optimizer, run=a.name, socket=sockets[rank * len(sockets) // world],
                                 flush_every=1, checkpoint_dir=ckpt_dir, scheduler=schedule,
                                 control_every=a.control_every)

    def source() -> Iterator[int]:
        yield from itertools.count()

    trained: list[int] = []
    rewinds: list[dict[str, object]] = []
    for step, index in zip(range(a.steps), watch.data(source()), strict=False):
        t0 = time.perf_counter()
        before = watch.control.rewinds
        train_step(model, optimizer, schedule, index, rank, bad)
        if watch.control.rewinds != before:  # the rewind took effect before this step's forward
            rewinds.append({"at": len(trained), "step": step, "lr_scale": watch.lr_scale})
        trained.append(index)
        if a.ckpt_every and watch.step % a.ckpt_every == 0:
            watch.checkpoint()
        if a.step_seconds and step >= a.slow_from:
            time.sleep(max(0.0, a.step_seconds - (time.perf_counter() - t0)))
    watch.close()
    inner = getattr(model, "module", model)
    torch.save(inner.state_dict(), f"{a.out}.rank{rank}.pt")
    with open(f"{a.out}.rank{rank}.json", "w") as fh:
        json.dump({"rank": rank, "trained": trained, "rewinds": rewinds, "final_step": watch.step,
                   "lr_scale": watch.lr_scale, "skipped": vars(watch.control.skipped)}, fh)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
