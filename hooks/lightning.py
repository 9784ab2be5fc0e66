"""PyTorch Lightning: ``Trainer(callbacks=[RunwatchLightningCallback(run="my-run")])``.

The loss comes from ``on_before_backward`` (what ``training_step`` returned), tokens from
the batch when it is a mapping with ``input_ids`` / ``attention_mask`` / ``labels``, and the
gradient norms and the guard run in ``on_before_optimizer_step``. Under Lightning's AMP
(``16-mixed``) its GradScaler sets ``found_inf`` after us, so the guard observes but cannot
skip there; ``skip_sync`` is refused. The callback sees the unwrapped module, so under DDP
``local_grad_norm`` is not reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from runwatch.hooks.watch import Watch, log


class RunwatchLightningCallback(pl.Callback):
    def __init__(self, run: str | None = None, **options: Any) -> None:
        self.run = run
        self.options = options
        self.watch: Watch | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.watch is None and trainer.optimizers:
            self.options.setdefault("rank", trainer.global_rank)
            self.options.setdefault("world_size", trainer.world_size)
            # Lightning runs forward and backward inside optimizer.step(closure): gradients are
            # ready at on_before_optimizer_step, not at the optimizer's pre-hook.
            self.options.setdefault("start_step", trainer.global_step)
            try:
                self.watch = Watch(pl_module, trainer.optimizers[0], self.run,
                                   inputs_from_forward=False, optimizer_pre_hook=False, **self.options)
            except Exception:  # monitoring must never stop training
                log.exception("runwatch: could not attach to Lightning; training goes on unwatched")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self.watch is not None and isinstance(batch, Mapping):
            self.watch.observe_inputs(**batch)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: torch.Tensor) -> None:
        if self.watch is not None:
            self.watch.record_loss(loss)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self.watch is not None:
            self.watch.before_optimizer_step()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None
