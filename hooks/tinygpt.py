"""A tiny GPT-style model and training loop on CPU, for the demo and the tests.

``python -m runwatch.hooks.tinygpt --run NAME --steps N [--record FILE]`` trains it with
the hook attached. ``--record`` writes, per step, the loss and gradient norm computed
independently of the hook (``clip_grad_norm_`` with no clipping), so a test can check
what the daemon stored against what really happened.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

import runwatch.hooks


@dataclass
class Output:
    loss: torch.Tensor | None
    logits: torch.Tensor


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32, layers: int = 2, heads: int = 2,
                 context: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(context, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        t = input_ids.shape[1]
        x = self.embed(input_ids) + self.pos[:t]
        mask = torch.triu(torch.full((t, t), float("-inf"), device=input_ids.device), diagonal=1)
        for block in self.blocks:
            x = block(x, mask)
        logits = self.head(self.ln(x))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return Output(loss, logits)


def batches(seed: int, vocab: int = 64, context: int = 32, batch: int = 8):
    """Endless batches of a learnable sequence task: each token is the previous plus a step."""
    g = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        stride = torch.randint(1, 4, (batch, 1), generator=g)
        seq = (start + stride * torch.arange(context + 1)) % vocab
        yield seq[:, :-1], seq[:, 1:]


def train(run: str, steps: int, *, seed: int = 0, lr: float = 3e-3, record: str | None = None,
          socket: str | None = None, sleep: float = 0.0, flush_every: int = 16,
          step_times: list[float] | None = None, slow_step_dump: str | None = None) -> None:
    torch.manual_seed(seed)
    model = TinyGPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / max(steps, 1)))
    )
    watch = runwatch.hooks.watch(model, optimizer, run=run, socket=socket, flush_every=flush_every)
    out = open(record, "w") if record else None  # noqa: SIM115
    data = batches(seed)
    dump = open(slow_step_dump, "w") if slow_step_dump else None  # noqa: SIM115
    for step in range(steps):
        if dump is not None:
            # Diagnostics for tests: the stacks of every thread if a step takes over 0.3 s.
            dump.write(f"--- step {step}\n")
            faulthandler.dump_traceback_later(0.3, file=dump)
        t0 = time.perf_counter()
        input_ids, labels = next(data)
        loss = model(input_ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if out is not None:
            # The test's reference values, read independently of the hook (syncs are fine here).
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            lr_now = optimizer.param_groups[0]["lr"]
        optimizer.step()
        schedule.step()
        if out is not None:
            out.write(json.dumps({"step": step, "loss": loss.item(), "grad_norm": norm.item(),
                                  "learning_rate": lr_now}) + "\n")
        if sleep:
            time.sleep(sleep)
        if step_times is not None:
            step_times.append(time.perf_counter() - t0)
        if dump is not None:
            faulthandler.cancel_dump_traceback_later()
    if out is not None:
        out.close()
    watch.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record")
    p.add_argument("--socket")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep after each step")
    p.add_argument("--flush-every", type=int, default=16)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: a tiny model, and less contention in tests)")
    p.add_argument("--step-times", help="write each step's wall time (JSON list) here")
    p.add_argument("--slow-step-dump", help="write all threads' stacks here when a step exceeds 0.3 s")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    times: list[float] = []
    train(a.run, a.steps, seed=a.seed, record=a.record, socket=a.socket, sleep=a.sleep,
          flush_every=a.flush_every, step_times=times, slow_step_dump=a.slow_step_dump)
    if a.step_times:
        with open(a.step_times, "w") as fh:
            json.dump(times, fh)


if __name__ == "__main__":
    main()
