"""PyTorch Lightning: ``Trainer(callbacks=[RunwatchLightningCallback(run="my-run")])``.

The loss comes from ``on_before_backward`` (what ``training_step`` returned), tokens from
the batch when it is a mapping with ``input_ids`` / ``attention_mask`` / ``labels``, and the
gradient norms and the guard run in ``on_before_optimizer_step``. Under Lightning's AMP
(``16-mixed``) its GradScaler sets ``found_inf`` after us, so the guard observes but cannot
skip there; ``skip_sync`` is refused. The callback sees the unwrapped module, so under DDP
``local_grad_norm`` is not reported.

Commands from the daemon (pause, rewind, ...) are applied in ``on_train_batch_start``, before
the batch's ``training_step``.

Checkpoints and rewinds. The watch's scheduler is the first configured one
(``trainer.lr_scheduler_configs[0].scheduler``) and its ``checkpoint_dir`` the
``ModelCheckpoint``'s ``dirpath`` (options ``scheduler=`` / ``checkpoint_dir=`` override).
Lightning calls ``on_save_checkpoint`` before the file is written, so the callback wraps
``trainer.save_checkpoint`` for the length of ``fit`` and registers each ``.ckpt`` with the
daemon once that call has returned, on global rank zero (the one that writes); a file an
asynchronous checkpoint IO is still writing is registered at a later batch end, once it is a
whole archive. The watch remembers the learning-rate scale in force at registration, so a
rewind to a checkpoint saved after an earlier rewind does not scale twice; as the lasting record
of it (the memory ends with the process) each ``.ckpt`` also holds ``checkpoint["runwatch"]``:
the ``lr_scale`` and rewind count in force when it was saved.

A rewind is applied in this process: the ``.ckpt`` is read with ``weights_only=True``, then
the module's weights, the first optimizer's state and the first scheduler's state are
restored and the learning rate is scaled (the scheduler's ``base_lrs`` too). What does not go
back: ``trainer.global_step``, the epoch and batch counters and the checkpoint names keep
counting forward, as the watch's step numbers do (so ``max_steps`` counts steps taken and the
schedule restarts from the checkpoint's position); the data goes on forward and the rewind's
``--skip`` is not applied (Lightning draws batches itself); only the first optimizer and
scheduler are restored; the AMP GradScaler is not. A ``.ckpt`` that ``weights_only`` refuses
(hyper-parameters holding arbitrary objects: ``save_hyperparameters()`` of a Namespace or a
dataclass), or one saved with ``save_weights_only=True``, cannot be rewound to: the command
fails with that reason and the run goes on untouched.

Retention. The runwatch daemon's retention owns the ``ModelCheckpoint``'s folder; a
``save_top_k`` above 0 (the default is 1: only the latest file stays) makes Lightning delete
``.ckpt`` files itself, protected ones included, so the callback warns
(:class:`~runwatch.daemon.checkpoints.CompetingRetentionWarning`) when training starts, and the
daemon alerts when a checkpoint it protects disappears.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from runwatch.daemon.checkpoints import identify, warn_competing_retention
from runwatch.hooks.watch import Watch, log


class RunwatchLightningCallback(pl.Callback):
    def __init__(self, run: str | None = None, **options: Any) -> None:
        self.run = run
        self.options = options
        self.watch: Watch | None = None
        self._pending: list[Path] = []  # saved, not yet registered (async IO still writing)
        self._unwrap_save: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.watch is None and trainer.optimizers:
            # Per fit, not stored: a second fit() must not inherit the first one's objects.
            options: dict[str, Any] = {
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "start_step": trainer.global_step,
                **self.options,
            }
            if "scheduler" not in options and trainer.lr_scheduler_configs:
                options["scheduler"] = trainer.lr_scheduler_configs[0].scheduler
            if "checkpoint_dir" not in options:
                options["checkpoint_dir"] = _local_dirpath(trainer)
            try:
                # Lightning runs forward and backward inside optimizer.step(closure): gradients
                # are ready at on_before_optimizer_step, not at the optimizer's pre-hook.
                self.watch = Watch(pl_module, trainer.optimizers[0], self.run,
                                   inputs_from_forward=False, optimizer_pre_hook=False, **options)
            except Exception:  # monitoring must never stop training
                log.exception("runwatch: could not attach to Lightning; training goes on unwatched")
                return
            self._wrap_save_checkpoint(trainer)
            if trainer.is_global_zero and self.watch.checkpoint_dir is not None:
                _warn_competing_retention(trainer, self.watch.checkpoint_dir)

    def _wrap_save_checkpoint(self, trainer: pl.Trainer) -> None:
        """Call :meth:`_saved` after every ``trainer.save_checkpoint`` (ModelCheckpoint's and
        the user's): the one point where Lightning has finished writing a ``.ckpt``."""
        original = trainer.save_checkpoint

        @functools.wraps(original)
        def save_checkpoint(filepath: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(filepath, *args, **kwargs)
            if trainer.is_global_zero:
                self._saved(filepath)
            return result

        trainer.save_checkpoint = save_checkpoint  # type: ignore[method-assign]

        def unwrap() -> None:
            # Only if still ours: someone who wrapped it after us keeps their wrapper.
            if trainer.__dict__.get("save_checkpoint") is save_checkpoint:
                del trainer.save_checkpoint

        self._unwrap_save = unwrap

    def _saved(self, filepath: Any) -> None:
        if "://" in str(filepath):  # a remote (fsspec) path: nothing the daemon can read
            return
        self._pending.append(Path(filepath))
        self._register_pending()

    def _register_pending(self) -> None:
        watch = self.watch
        if watch is None or not watch.enabled or not self._pending:
            return
        waiting: list[Path] = []
        for path in self._pending:
            try:
                found = identify(path) if path.exists() else None
                if found is None:
                    continue  # removed already (save_top_k), or not a .ckpt runwatch knows
                if not found.complete:
                    waiting.append(path)
                    continue
                watch.register_checkpoint(path)
            except Exception:  # monitoring must never stop training
                log.exception("runwatch: could not register %s", path)
        self._pending = waiting

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Plain numbers only: the file must still load with weights_only=True.
        if self.watch is not None:
            checkpoint["runwatch"] = {"lr_scale": float(self.watch.lr_scale),
                                      "rewinds": int(self.watch.control.rewinds)}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        # Every batch goes through observe_inputs: that is where agreed commands are applied
        # (the model's forward is not hooked, since Lightning's module does not receive the batch).
        if self.watch is None:
            return
        if isinstance(batch, Mapping) and all(isinstance(k, str) for k in batch):
            self.watch.observe_inputs(**batch)
        else:
            self.watch.observe_inputs(batch)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: torch.Tensor) -> None:
        if self.watch is not None:
            self.watch.record_loss(loss)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self.watch is not None:
            self.watch.before_optimizer_step()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._register_pending()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._register_pending()
        self._detach()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._detach()  # a fit stopped by an exception never reaches on_train_end

    def _detach(self) -> None:
        if self._unwrap_save is not None:
            self._unwrap_save()
            self._unwrap_save = None
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        self._pending = []


def _warn_competing_retention(trainer: pl.Trainer, folder: Path) -> None:
    """Warn about each ModelCheckpoint that deletes ``.ckpt`` files in ``folder`` (runwatch's):
    any ``save_top_k`` above 0 keeps only its best K (the default, 1, keeps only the latest)."""
    for callback in trainer.checkpoint_callbacks:
        k = getattr(callback, "save_top_k", -1)
        dirpath = getattr(callback, "dirpath", None)
        if k > 0 and dirpath and "://" not in str(dirpath) and Path(dirpath).absolute() == folder:
            warn_competing_retention(f"ModelCheckpoint(save_top_k={k})",
                                     "Set save_top_k=-1 (every checkpoint saved)", folder)


def _local_dirpath(trainer: pl.Trainer) -> str | None:
    """The first ModelCheckpoint's folder (resolved by its ``setup``, before ``on_train_start``)
    when it is a local path; a rewind looks for checkpoints there."""
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    if not dirpath or "://" in str(dirpath):
        return None
    return str(dirpath)
