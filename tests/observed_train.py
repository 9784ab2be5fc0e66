"""A short real CPU training (TinyGPT) that produces every signal the Grafana dashboards and
the Prometheus alert rules read; used by tests/live_session.py.

    python tests/observed_train.py --name NAME --socket PATH --ckpt-dir DIR
        [--steps N] [--accum K] [--bad I] [--padded-from I] [--ckpt-every K] [--step-seconds S]

Alone with ``--accum 2`` a step has two forwards (``microbatch_grad_norm``/``_std``); under
torchrun (``WORLD_SIZE`` > 1) it trains DDP (``local_grad_norm``). Every batch names its data
shard (``data_shard``, ``data_offset``; ``runwatch skip-shard`` drops one: ``skipped_*``);
checkpoints go to ``--ckpt-dir`` (retention); data index ``--bad`` is corrupted (random
labels, loss x20) so the default pack fires and the playbook pauses, dumps and rewinds the
run (``rewinds``, ``lr_scale``); from data index ``--padded-from`` on, half of each sequence
is padding, so token_efficiency_drop fires and stays firing (``runwatch_alerts_firing``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import intervene_train

import runwatch.hooks


def shard_of(index: int) -> str:
    return f"shard-{index // 40:03d}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--name", required=True, help="run name (not --run: torchrun would take it)")
    p.add_argument("--socket", required=True)
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--bad", type=int, default=-1, help="data index of a corrupted batch (-1: none)")
    p.add_argument("--padded-from", type=int, default=-1,
                   help="from this data index on, half of every sequence is padding (-1: never)")
    p.add_argument("--ckpt-every", type=int, default=20)
    p.add_argument("--step-seconds", type=float, default=0.0)
    a = p.parse_args()
    torch.set_num_threads(1)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    model, optimizer, schedule = intervene_train.make(a.steps)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    watch = runwatch.hooks.watch(model, optimizer, run=a.name, socket=a.socket, flush_every=1,
                                 checkpoint_dir=a.ckpt_dir, scheduler=schedule, control_every=2)
    batches = watch.data(itertools.count(), shard=shard_of)
    for _step, index in zip(range(a.steps), batches, strict=False):
        t0 = time.perf_counter()
        watch.batch(shard=shard_of(index), offset=index % 40)
        x, y = intervene_train.batch_at(index, rank)
        scale = 1.0
        if index == a.bad:
            y, scale = intervene_train.corrupt(y, index), 20.0
        if 0 <= a.padded_from <= index:
            y = y.clone()
            y[:, y.shape[1] // 2:] = -100  # ignored by the loss: token efficiency 0.5
        optimizer.zero_grad(set_to_none=True)
        for xs, ys in zip(x.chunk(a.accum), y.chunk(a.accum), strict=True):
            loss = model(xs, labels=ys).loss * scale / a.accum
            loss.backward()
        optimizer.step()
        schedule.step()
        if a.ckpt_every and watch.step % a.ckpt_every == 0:
            watch.checkpoint()
        if a.step_seconds:
            time.sleep(max(0.0, a.step_seconds - (time.perf_counter() - t0)))
    watch.close()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
