"""One rank of a gloo DDP CPU training (TinyGPT, the real hook) for tests/test_faults.py.

    torchrun --nproc-per-node=N tests/kill_ranks_train.py --name RUN --socket PATH --out PREFIX
        --stop-file FILE [--step-seconds S] [--max-steps N]

Trains until ``--stop-file`` exists (the ranks agree on the step to stop at with one all-reduce
per step), then closes the watch and writes ``PREFIX.rank<R>.json``:

- ``points``: every (step, metric) the hook handed to its sender, read off the sender itself
  (a recording subclass), so the test compares the store with what really left the training;
- ``loss``: each step's loss, read independently of the hook;
- ``step_seconds``: each step's wall time, the hook's work and the DDP all-reduce included;
- ``dropped``: points the sender dropped (its queue full).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import runwatch.hooks
from runwatch.hooks.sender import Batch, Sender
from runwatch.hooks.tinygpt import TinyGPT, batches

# The module, not the function runwatch.hooks re-exports under the same name.
watch_mod = importlib.import_module("runwatch.hooks.watch")

produced: dict[int, list[str]] = {}


class RecordingSender(Sender):
    """The real sender; it also notes each (step, metric) it is given, on the training thread."""

    def put(self, batch: Batch) -> None:
        for i, step in enumerate(batch.steps.tolist()):
            names = [n for j, n in enumerate(batch.names) if batch.present is None or batch.present[i, j]]
            produced.setdefault(int(step), []).extend(names)
        super().put(batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--name", required=True)
    p.add_argument("--socket", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--stop-file", required=True)
    p.add_argument("--step-seconds", type=float, default=0.02)
    p.add_argument("--max-steps", type=int, default=5000)
    a = p.parse_args()
    torch.set_num_threads(1)
    watch_mod.Sender = RecordingSender  # type: ignore[misc]  # the watch builds its sender by this name
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(TinyGPT())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    watch = runwatch.hooks.watch(model, opt, run=a.name, socket=a.socket, flush_every=4)
    data = batches(seed=100 + rank)
    stop = Path(a.stop_file)
    losses: list[float] = []
    step_seconds: list[float] = []
    for _ in range(a.max_steps):
        t0 = time.perf_counter()
        x, y = next(data)
        loss = model(x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        # Every rank stops after the same step: rank 0 reads the stop file, the others hear it.
        flag = torch.tensor([1 if (rank == 0 and stop.exists()) else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        step_seconds.append(time.perf_counter() - t0)
        if flag.item():
            break
        time.sleep(a.step_seconds)
    watch.close()
    out: dict[str, Any] = {"rank": rank, "loss": losses, "step_seconds": step_seconds,
                           "points": {str(s): names for s, names in produced.items()},
                           "dropped": watch.sender.dropped_points}
    Path(f"{a.out}.rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
