"""A small, fast CPU training whose data source can switch distribution (the drift monitors' e2e).

    python tests/drift_train.py --run NAME --socket PATH --steps N [--shift-at STEP] [--seed S]
        [--start-step S] [--shards K --bad-shard J] [--token-loss]

Batches of 64 rows padded to 32 tokens from a random real length of 24-32 (labels -100 on the
padding); from ``--shift-at`` on, the data source sends rows of 12-20 real tokens. 64 rows a
step fill the seq_length monitor's 1024-value window every 16 steps (one histogram flush).
``--start-step``: the step numbers a resumed run continues from. ``--shards K``: batches come
from K shards in turn, 8 steps each, through ``watch.data(..., shard=...)``; shard
``--bad-shard`` (from its first turn after ``--shift-at``, or always) sends the short rows.
``--token-loss``: the hook fills the per-token loss histogram (``token_loss="aligned"``).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

import runwatch.hooks

VOCAB, CONTEXT, BATCH = 64, 32, 64


@dataclass
class Output:
    loss: torch.Tensor
    logits: torch.Tensor


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> Output:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = torch.relu(layer(x))
        logits = self.head(x)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return Output(loss, logits)


def batch(g: torch.Generator, min_len: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    seq = torch.randint(0, VOCAB, (BATCH, CONTEXT + 1), generator=g)
    inputs, labels = seq[:, :-1].clone(), seq[:, 1:].clone()
    pad = torch.arange(CONTEXT) >= torch.randint(min_len, max_len + 1, (BATCH, 1), generator=g)
    inputs[pad], labels[pad] = 0, -100
    return inputs, labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run", required=True)
    p.add_argument("--socket")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--shift-at", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-step", type=int, default=0)
    p.add_argument("--shards", type=int, default=0)
    p.add_argument("--bad-shard", type=int)
    p.add_argument("--token-loss", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    g = torch.Generator().manual_seed(a.seed)
    model = Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    watch = runwatch.hooks.watch(model, optimizer, run=a.run, socket=a.socket, guard="off",
                                 start_step=a.start_step, token_loss="aligned" if a.token_loss else None)

    def source() -> Iterator[tuple[int, int]]:
        for step in range(a.start_step, a.start_step + a.steps):
            yield step, (step // 8) % a.shards if a.shards else -1

    for step, shard in watch.data(source(), shard=(lambda b: b[1]) if a.shards else None):
        shifted = a.shift_at is not None and step >= a.shift_at
        if a.shards:
            shifted = shard == a.bad_shard and (a.shift_at is None or shifted)
        inputs, labels = batch(g, 12, 20) if shifted else batch(g, 24, 32)
        loss = model(inputs, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    watch.close()


if __name__ == "__main__":
    main()
