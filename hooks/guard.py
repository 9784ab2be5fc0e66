"""The spike guard: decide on the device whether this step's update is applied.

The baseline is the last ``window`` *accepted* gradient norms, kept in a device ring
buffer (default 128, active after 64, as OLMo-core's ``SkipStepOptimizer``). A step is a
spike when its norm exceeds ``mean + sigma * std`` of the baseline or, when ``ratio`` is
given instead, ``ratio * median``; a NaN or Inf in the gradient norm or the loss is always a spike.
Spikes never enter the baseline.

How a skip is applied, per optimizer:

* Fused Adam/AdamW/SGD (``fused=True``): the decision is handed to the optimizer as
  ``optimizer.found_inf``, exactly as ``GradScaler`` does. The fused kernel then leaves
  parameters and moments untouched and takes the step counter back. **No host sync.**
* Any other optimizer: the kernel cannot be told, so skipping means reading the decision
  on the host (``skip.item()``): **one host-device sync per step**, which on an H100 with a
  ~30 ms step costs on the order of 10% (DESIGN.md). That is mode ``skip_sync``; the default
  there is ``observe``: spikes are detected and reported, the daemon pauses the run.

Where a sync would creep in: ``bool(skip)``, ``if skip:``, ``skip.item()`` or indexing the
ring with a Python value read from ``pos``. Everything below stays a tensor.
"""

from __future__ import annotations

from typing import Literal

import torch

GuardMode = Literal["off", "observe", "skip", "skip_sync", "auto"]


def optimizer_is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(optimizer.param_groups) and all(g.get("fused") for g in optimizer.param_groups)


def resolve_mode(mode: GuardMode, optimizer: torch.optim.Optimizer) -> GuardMode:
    """``auto`` → ``skip`` where it costs no sync (fused optimizers), else ``observe``."""
    fused = optimizer_is_fused(optimizer)
    if mode == "auto":
        return "skip" if fused else "observe"
    if mode == "skip" and not fused:
        raise ValueError(
            "guard='skip' needs a fused optimizer (fused=True) to skip without a host sync; "
            "use guard='skip_sync' to pay one sync per step, or guard='observe'"
        )
    return mode


class SpikeGuard:
    def __init__(self, device: torch.device, *, window: int = 128, warmup: int = 64,
                 sigma: float = 6.0, ratio: float | None = None) -> None:
        if warmup > window:
            raise ValueError("guard warmup cannot exceed its window")
        self.window, self.warmup, self.sigma, self.ratio = window, warmup, sigma, ratio
        self.ring = torch.zeros(window, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.pos = torch.zeros(1, dtype=torch.int64, device=device)
        self._slots = torch.arange(window, device=device)

    def check(self, grad_norm: torch.Tensor, loss: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (skip, threshold) as device tensors and folds an accepted norm in."""
        norm = grad_norm.detach().to(torch.float64).reshape(())
        finite = torch.isfinite(norm)
        if loss is not None:
            finite = finite & torch.isfinite(loss.detach().to(torch.float64).reshape(()))
        valid = self._slots < self.count
        n = self.count.clamp(min=1).to(torch.float64)
        mean = torch.where(valid, self.ring, 0.0).sum() / n
        var = torch.where(valid, (self.ring - mean) ** 2, 0.0).sum() / n
        if self.ratio is None:
            threshold = mean + self.sigma * var.sqrt()
        else:
            threshold = self.ratio * torch.where(valid, self.ring, float("nan")).nanmedian()
        armed = self.count >= self.warmup
        skip = (armed & (norm > threshold)) | ~finite
        accept = ~skip
        current = self.ring.index_select(0, self.pos).reshape(())
        self.ring.index_copy_(0, self.pos, torch.where(accept, norm, current).reshape(1))
        self.pos.copy_((self.pos + accept.to(torch.int64)) % self.window)
        self.count.copy_((self.count + accept.to(torch.int64)).clamp(max=self.window))
        return skip, torch.where(armed, threshold, float("inf"))
