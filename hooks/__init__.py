"""runwatch training hooks: stream health signals from a training loop to the node daemon.

    import runwatch.hooks
    watch = runwatch.hooks.watch(model, optimizer, run="my-run")

Hugging Face ``Trainer``: ``callbacks=[runwatch.hooks.RunwatchCallback(run=...)]``;
Lightning: ``callbacks=[runwatch.hooks.RunwatchLightningCallback(run=...)]``. Those two
import transformers / lightning only when first used.
"""

from typing import Any

__version__ = "0.1.0"

from runwatch.hooks.watch import Watch, watch

__all__ = ["RunwatchCallback", "RunwatchLightningCallback", "Watch", "__version__", "watch"]


def __getattr__(name: str) -> Any:
    if name == "RunwatchCallback":
        from runwatch.hooks.huggingface import RunwatchCallback

        return RunwatchCallback
    if name == "RunwatchLightningCallback":
        from runwatch.hooks.lightning import RunwatchLightningCallback

        return RunwatchLightningCallback
    raise AttributeError(name)
