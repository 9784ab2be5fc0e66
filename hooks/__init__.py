"""runwatch training hooks: stream health signals from a training loop to the node daemon.

    import runwatch.hooks
    watch = runwatch.hooks.watch(model, optimizer, run="my-run")
"""

__version__ = "0.1.0"

from runwatch.hooks.watch import Watch, watch

__all__ = ["Watch", "__version__", "watch"]
