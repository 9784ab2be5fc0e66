"""Hugging Face ``Trainer``: ``Trainer(..., callbacks=[RunwatchCallback(run="my-run")])``.

Model, optimizer, loss (the model output's ``.loss``) and tokens (``labels`` /
``attention_mask`` in the batch) are picked up from the trainer; nothing else changes.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from runwatch.hooks.watch import Watch


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
            self.watch = Watch(model, optimizer, self.run or args.run_name, **self.options)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None
