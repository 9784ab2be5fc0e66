"""What the training hook costs on a GPU: a GPT-style model of ~124M parameters.

Three loops on one model and one optimizer, in one process, interleaved in rounds so
clocks, thermals and allocator state affect them alike:

  bare     the training step alone;
  hooked   the same step with ``runwatch.hooks.watch`` attached (every default signal,
           guard in ``skip`` mode through the fused AdamW's ``found_inf``);
  naive    the step plus ``loss.item()`` and a grad-norm ``.item()`` every step, as a loop
           that logs without care does.

Step time is measured with CUDA events around each step (read after the round, so the
measurement itself adds no sync). The report gives medians, ratios to bare, the GPU and
host memory the hook adds, and the machine. No daemon is needed: without one the hook
spools to disk, which does the same encoding work as sending.

    python bench/hook_overhead.py [--rounds 12] [--steps 25] [--batch 8] [--seq 1024]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import runwatch.hooks


@dataclass
class GPTConfig:
    vocab: int = 50304
    context: int = 1024
    layers: int = 12
    heads: int = 12
    dim: int = 768


class Block(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(c.dim), nn.LayerNorm(c.dim)
        self.qkv, self.proj = nn.Linear(c.dim, 3 * c.dim), nn.Linear(c.dim, c.dim)
        self.fc, self.out = nn.Linear(c.dim, 4 * c.dim), nn.Linear(4 * c.dim, c.dim)
        self.heads = c.heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


@dataclass
class Output:
    loss: torch.Tensor
    logits: torch.Tensor  # as Hugging Face models return it: the hook's entropy histogram reads it


class GPT(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(c.vocab, c.dim), nn.Embedding(c.context, c.dim)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln = nn.LayerNorm(c.dim)
        self.lm_head = nn.Linear(c.dim, c.vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> Output:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln(x))
        return Output(F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()), logits)


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_block(model: nn.Module, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor],
              steps: int, naive: bool) -> list[float]:
    x, y = batch
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    sink = 0.0
    for i in range(steps):
        starts[i].record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, labels=y).loss
        loss.backward()
        if naive:
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            sink += loss.item() + norm.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1000 for s, e in zip(starts, ends, strict=True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=25, help="steps per variant per round")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--lean", action="store_true",
                   help="also time the hook with the guard, layer and group norms off")
    p.add_argument("--ablate", action="store_true",
                   help="also time the hook with each of those off, one at a time")
    a = p.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA device"
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = GPTConfig(context=a.seq)
    model = GPT(cfg).cuda()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    batch = (torch.randint(0, cfg.vocab, (a.batch, a.seq), device="cuda", generator=g),
             torch.randint(0, cfg.vocab, (a.batch, a.seq), device="cuda", generator=g))
    spool = tempfile.mkdtemp(prefix="runwatch-bench-")
    socket = os.path.join(spool, "no-daemon.sock")

    run_block(model, opt, batch, 10, naive=False)  # warm-up: kernels, allocator, optimizer state
    torch.cuda.synchronize()
    mem_bare = torch.cuda.memory_allocated()
    rss_start = rss_bytes()
    watch = runwatch.hooks.watch(model, opt, run="bench", socket=socket, spool_dir=spool)
    run_block(model, opt, batch, 40, naive=False)  # first use: CUDA loads the hook's kernels
    mem_hooked = torch.cuda.memory_allocated()
    rss_warm = rss_bytes()
    run_block(model, opt, batch, 200, naive=False)  # steady state: does anything keep growing?
    rss_steady = rss_bytes()
    guard_mode = watch.guard_mode
    watch.close(timeout=1)

    variants: dict[str, dict[str, object] | None] = {"bare": None, "hooked": {}, "naive": None}
    if a.lean:
        variants["hooked_lean"] = {"guard": "off", "layers": [], "group_norms": False}
        variants["no_histograms"] = {"histogram_every": 0}
    if a.ablate:
        variants["no_guard"] = {"guard": "off"}
        variants["no_layers"] = {"layers": []}
        variants["no_group_norms"] = {"group_norms": False}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(a.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for variant in order:
            options = variants[variant]
            w = None
            if options is not None:
                w = runwatch.hooks.watch(model, opt, run="bench", socket=socket, spool_dir=spool,
                                         **options)
                run_block(model, opt, batch, 3, naive=False)  # first steps allocate columns
            times[variant] += run_block(model, opt, batch, a.steps, naive=variant == "naive")
            if w is not None:
                w.close(timeout=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "params_millions": round(n_params / 1e6, 1),
        "batch": f"{a.batch}x{a.seq}",
        "steps_per_variant": len(times["bare"]),
        "guard_mode": guard_mode,
        "median_step_ms": {k: round(v * 1000, 3) for k, v in med.items()},
        "overhead_vs_bare_percent": {
            k: round((med[k] / med["bare"] - 1) * 100, 2) for k in times if k != "bare"},
        "p90_step_ms": {k: round(sorted(v)[math.ceil(0.9 * len(v)) - 1] * 1000, 3) for k, v in times.items()},
        "gpu_memory_added_bytes": mem_hooked - mem_bare,
        "host_rss_first_use_bytes": rss_warm - rss_start,
        "host_rss_steady_growth_bytes_per_200_steps": rss_steady - rss_warm,
    }
    print(json.dumps(result, indent=2))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
