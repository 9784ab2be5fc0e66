"""One rank of the DDP test (started by torchrun from tests/test_ddp.py)."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

import runwatch.hooks
from runwatch.hooks.tinygpt import TinyGPT, batches


def main(socket: str, out: str, steps: int, poison_step: int) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # same initial weights on every rank
    torch.set_num_threads(1)
    model = torch.nn.parallel.DistributedDataParallel(TinyGPT())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    watch = runwatch.hooks.watch(model, opt, run="ddp", socket=socket, flush_every=4)
    data = batches(seed=100 + rank)  # every rank sees different data
    local_reference = []
    for step in range(steps):
        x, y = next(data)
        scale = 20.0 if (step == poison_step and rank == 1) else 1.0
        with model.no_sync():  # the reference: this rank's gradient, never all-reduced
            (model(x, labels=y).loss * scale).backward()
        local_reference.append(torch.nn.utils.get_total_norm(
            [p.grad for p in model.parameters()]).item())
        opt.zero_grad()
        (model(x, labels=y).loss * scale).backward()  # the real step, all-reduced
        opt.step()
        opt.zero_grad()
    watch.close()
    with open(out, "w") as fh:
        json.dump({"rank": rank, "local": local_reference}, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] % int(os.environ["RANK"]) if "%" in sys.argv[2] else sys.argv[2],
         int(sys.argv[3]), int(sys.argv[4]))
