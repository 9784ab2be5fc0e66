"""A plain PyTorch loop with runwatch: one line to attach, one to close.

    runwatch daemon &            # or the systemd service
    python examples/plain_loop.py
    runwatch runs
"""

import torch

import runwatch.hooks
from runwatch.hooks.tinygpt import TinyGPT, batches

torch.manual_seed(0)
model = TinyGPT()
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)  # fused: the guard skips spikes
watch = runwatch.hooks.watch(model, optimizer, run="example-plain")

data = batches(seed=0)
for step in range(200):
    input_ids, labels = next(data)
    watch.batch(shard="synthetic-00000", offset=step * 8)  # optional: where the batch came from
    loss = model(input_ids, labels=labels).loss  # the hook reads `.loss` itself
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # its pre-clip norm is reused
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

watch.close()
print(f"trained {watch.step} steps as run {watch.run!r}")
