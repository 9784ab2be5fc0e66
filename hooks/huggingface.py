"""Hugging Face ``Trainer``: ``Trainer(..., callbacks=[RunwatchCallback(run="my-run")])``.

Model, optimizer, loss (the model output's ``.loss``) and tokens (``labels`` /
``attention_mask`` in the batch) are picked up from the trainer; nothing else changes.
The callback sees the unwrapped model, so under DDP ``local_grad_norm`` is not reported.

Checkpoints and rewinds. The watch's ``checkpoint_dir`` is ``args.output_dir`` and its
scheduler the Trainer's ``lr_scheduler`` (unless given as options), and every
``checkpoint-N/`` the Trainer saves is registered with the daemon (``on_save`` runs after
``_save_checkpoint`` has written the weights, ``optimizer.pt``, ``scheduler.pt`` and, last,
``trainer_state.json``). A ``runwatch rewind`` is applied in this process, in the model's
forward pre-hook at the next step: the weights, the optimizer state (into the optimizer
inside accelerate's ``AcceleratedOptimizer``, the object the Trainer steps), the
scheduler's counters and the RNG states come back from ``checkpoint-N/``, and the learning
rate is scaled (the scheduler's ``base_lrs`` too, so the schedule keeps the scale).

What does not go back:

* ``state.global_step`` keeps counting forward, as the watch's step numbers do, so the
  Trainer's ``max_steps``, logging, evaluation and later ``checkpoint-M`` names follow
  optimizer steps taken, while the learning-rate schedule restarts from the checkpoint's
  position (a run stopped by ``max_steps`` therefore ends before its schedule does).
* The data goes on forward: the Trainer's own dataloader is not rewound, and the rewind's
  ``--skip`` is not applied (the Trainer draws batches itself, not through ``watch.data``).
* DeepSpeed and FSDP checkpoints keep the optimizer elsewhere than ``optimizer.pt``; a
  rewind there, or to a ``save_only_model`` checkpoint, fails with the reason and the run
  goes on untouched.

Retention. The runwatch daemon's retention owns ``output_dir``; ``save_total_limit`` makes the
Trainer delete old ``checkpoint-N/`` folders itself, protected ones included, so the callback
warns (:class:`~runwatch.daemon.checkpoints.CompetingRetentionWarning`) when training starts with
it set, and the daemon alerts when a checkpoint it protects disappears.

A checkpoint saved after a rewind already holds the scaled rates; the watch remembers the
scale in force when each one was registered, so a later rewind to it does not scale twice. That
memory ends with the process, so each registered ``checkpoint-N/`` also gets ``runwatch.json``
(``lr_scale``, ``rewinds``, the watch's ``step``) as the lasting record of it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from runwatch.daemon.checkpoints import warn_competing_retention
from runwatch.hooks.watch import Watch, log, safe_run_name

SIDECAR = "runwatch.json"


def _unwrap_scheduler(scheduler: Any) -> Any:
    """The scheduler whose ``state_dict`` the Trainer writes to ``scheduler.pt``: accelerate's
    ``AcceleratedScheduler`` delegates ``state_dict`` to ``.scheduler`` but keeps no
    ``base_lrs`` of its own, so scaling the wrapper would change nothing."""
    try:
        from accelerate.scheduler import AcceleratedScheduler
    except ImportError:
        return scheduler
    return scheduler.scheduler if isinstance(scheduler, AcceleratedScheduler) else scheduler


class RunwatchCallback(TrainerCallback):  # type: ignore[misc]
    def __init__(self, run: str | None = None, **options: Any) -> None:
        self.run = run
        self.options = options
        self.watch: Watch | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if self.watch is None and model is not None and optimizer is not None:
            # Per call, not stored: a second train() must not inherit the first one's objects.
            options: dict[str, Any] = {
                "rank": args.process_index,
                "world_size": args.world_size,
                "start_step": state.global_step,  # resume_from_checkpoint
                "checkpoint_dir": args.output_dir,
                "scheduler": _unwrap_scheduler(kwargs.get("lr_scheduler")),
                **self.options,
            }
            run = self.run or safe_run_name(args.run_name)
            try:
                self.watch = Watch(model, optimizer, run, **options)
            except Exception:  # monitoring must never stop training
                log.exception("runwatch: could not attach to the Trainer; training goes on unwatched")
                return
            limit = getattr(args, "save_total_limit", None)
            strategy = getattr(args.save_strategy, "value", args.save_strategy)
            if limit and str(strategy) != "no" and args.process_index == 0 and self.watch.checkpoint_dir:
                warn_competing_retention(f"TrainingArguments(save_total_limit={limit})",
                                         "Set save_total_limit=None", self.watch.checkpoint_dir)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Register ``checkpoint-<global_step>/``, which the Trainer has just finished writing.
        Only the world's process zero does: it is the one that writes ``trainer_state.json``."""
        watch = self.watch
        if watch is None or not watch.enabled or not state.is_world_process_zero:
            return
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        try:
            if path.is_dir():
                _write_sidecar(path, {"lr_scale": watch.lr_scale, "rewinds": watch.control.rewinds,
                                      "step": watch.step})
            watch.register_checkpoint(path)
        except Exception:  # monitoring must never stop training
            log.exception("runwatch: could not register %s", path)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None


def _write_sidecar(folder: Path, data: dict[str, Any]) -> None:
    """Write ``folder/runwatch.json`` whole or not at all (rename over a temporary file)."""
    tmp = folder / f".{SIDECAR}.{os.getpid()}"
    tmp.write_text(json.dumps(data, sort_keys=True) + "\n")
    os.replace(tmp, folder / SIDECAR)
