"""Hugging Face ``Trainer``: ``Trainer(..., callbacks=[RunwatchCallback(run="my-run")])``.

Model, optimizer, loss (the model output's ``.loss``) and tokens (``labels`` /
``attention_mask`` in the batch) are picked up from the trainer; nothing else changes.
The callback sees the unwrapped model, so under DDP ``local_grad_norm`` is not reported.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from runwatch.hooks.watch import Watch, log, safe_run_name


class RunwatchCallback(TrainerCallback):  # type: ignore[misc]
    def __init__(self, run: str | None = None, **options: Any) -> None:
        self.run = run
        self.options = options
        self.watch: Watch | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if self.watch is None and model is not None and optimizer is not None:
            self.options.setdefault("rank", args.process_index)
            self.options.setdefault("world_size", args.world_size)
            self.options.setdefault("start_step", state.global_step)  # resume_from_checkpoint
            run = self.run or safe_run_name(args.run_name)
            try:
                self.watch = Watch(model, optimizer, run, **self.options)
            except Exception:  # monitoring must never stop training
                log.exception("runwatch: could not attach to the Trainer; training goes on unwatched")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None
