"""A rank of a real FSDP2 training on CPU (gloo), checkpointed with ``watch.checkpoint()``
through torch.distributed.checkpoint and rewound by the daemon; run under torchrun.

    python -m torch.distributed.run --nproc-per-node=2 tests/dcp_train.py --name NAME \\
        --socket PATH --ckpt-dir DIR --out DIR [--ckpt-at 3,6] [--max-steps N] [--after K]

Every parameter is a DTensor sharded over the ranks (``fully_shard`` on the first layer and on
the root, so the root's own group holds the last layer). Each rank trains on one fixed batch of
its own, so a step's loss depends on the parameters alone: the first loss after a rewind to
step S must equal the loss of the step that followed the save at S.

Writes into ``--out``: ``saved-<S>.rank<R>.pt`` (this rank's shards of the parameters, its
optimizer state, the LRs and the torch RNG state right after the checkpoint at step S),
``rewound.rank<R>.pt`` (the same, right after the rewind took effect, before its step's
backward), and ``result.rank<R>.json`` (losses per step, where the rewind took effect, and
what the collective loads of a torn checkpoint raised).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import runwatch.hooks
from runwatch.hooks import checkpoint as ckpt_io

WIDTH = 32


def make(mesh: object) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(WIDTH, 4 * WIDTH), torch.nn.GELU(),
                                torch.nn.Linear(4 * WIDTH, WIDTH))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + 0.1 * s))
    return model, optimizer, schedule


def snapshot(names: dict[Any, str], optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """This rank's shards of everything a rewind restores (copies). Read through the optimizer's
    parameters, the sharded DTensors: during a forward, FSDP2 shows the gathered copies of the
    root's parameters as the module's."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()

    out = {}
    for p in (p for group in optimizer.param_groups for p in group["params"]):
        name = names[p]
        out[f"param/{name}"] = local(p)
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                out[f"optim/{name}/{key}"] = local(value)
    out["lr"] = torch.tensor([g["lr"] for g in optimizer.param_groups], dtype=torch.float64)
    out["rng"] = torch.get_rng_state()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--name", required=True)
    p.add_argument("--socket", required=True)
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt-at", default="3,6")
    p.add_argument("--max-steps", type=int, default=1500)
    p.add_argument("--after", type=int, default=3, help="steps to train after the rewind")
    p.add_argument("--step-seconds", type=float, default=0.05)
    a = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, optimizer, schedule = make(init_device_mesh("cpu", (world,)))
    names = {p: name for name, p in model.named_parameters()}
    # Every default signal on: gradient norms of DTensor gradients are this rank's shard's.
    watch = runwatch.hooks.watch(model, optimizer, run=a.name, socket=a.socket, flush_every=1,
                                 checkpoint_dir=a.ckpt_dir, scheduler=schedule, control_every=1)
    out = Path(a.out)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(16, WIDTH, generator=g)
    ckpt_at = {int(s) for s in a.ckpt_at.split(",")}
    losses: list[float] = []
    saved: dict[int, str] = {}
    rewound: dict[str, object] | None = None
    for _ in range(a.max_steps):
        t0 = time.perf_counter()
        rewinds = watch.control.rewinds
        y = model(x)  # a rewind agreed on takes effect in the hook before this forward
        if watch.control.rewinds != rewinds:
            torch.save(snapshot(names, optimizer), out / f"rewound.rank{rank}.pt")
            rewound = {"at": len(losses), "step": watch.step, "lr_scale": watch.lr_scale}
        loss = (y - x).pow(2).mean()
        losses.append(loss.item())  # CPU: no device sync to avoid
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if watch.step in ckpt_at:
            saved[watch.step] = str(watch.checkpoint().path)  # every rank gets it back
            torch.save(snapshot(names, optimizer), out / f"saved-{watch.step}.rank{rank}.pt")
        if rewound is not None and len(losses) - int(rewound["at"]) >= a.after:  # type: ignore[call-overload]
            break
        if watch.step > max(ckpt_at):
            time.sleep(max(0.0, a.step_seconds - (time.perf_counter() - t0)))
    watch.close()

    # Collective loads that must be refused on every rank, none left waiting: a torn checkpoint
    # (the test removed a shard), and ranks asking for different checkpoints.
    refusals: dict[str, str] = {}
    before = snapshot(names, optimizer)
    newest = saved[max(saved)]
    for case, path in (("torn", newest), ("disagree", saved[min(saved)] if rank == 0 else newest)):
        try:
            ckpt_io.load(path, model=model, optimizer=optimizer, scheduler=schedule)
            refusals[case] = "loaded"
        except ckpt_io.CheckpointError as exc:
            refusals[case] = str(exc)
    after = snapshot(names, optimizer)
    unchanged = all(torch.equal(before[k], after[k]) for k in before)
    with open(out / f"result.rank{rank}.json", "w") as fh:
        json.dump({"rank": rank, "losses": losses, "rewound": rewound, "saved": saved,
                   "final_step": watch.step, "lr_scale": watch.lr_scale, "refusals": refusals,
                   "unchanged_by_refusals": unchanged, "pid": os.getpid()}, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
