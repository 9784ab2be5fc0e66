"""``watch(model, optimizer, run=...)``: the one line a plain PyTorch loop needs.

It attaches through ``Optimizer.register_step_pre_hook`` / ``register_step_post_hook`` and
a forward hook on the model, so the loop does not change. Per step it records the total
gradient norm, the loss (``output.loss`` of the model, or :meth:`Watch.log`), the learning
rate of every parameter group and the host wall time between steps.

Where a host sync would creep in, and how this avoids it:

* Device values (grad norm, loss, tensor learning rates) are written with ``copy_`` into
  a device buffer row, never read with ``.item()``, ``float()``, ``.cpu()`` or ``.tolist()``.
* Every ``flush_every`` steps the buffer goes to pinned host memory with one
  ``non_blocking`` copy and a CUDA event is recorded; the host reads that memory only
  after ``event.query()`` says the copy has landed, polled at later steps. Nothing waits.
* Python-side values (a float learning rate, step times, step numbers) never touch the
  device at all.
* ``close()`` is the one place that waits for the device (``event.synchronize()``).

Anything that goes wrong inside the hook is logged once and switches the hook off;
training carries on.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import socket as socket_mod
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from runwatch.daemon import paths, protocol
from runwatch.hooks import __version__
from runwatch.hooks.sender import Batch, Sender

log = logging.getLogger("runwatch.hooks")
F = TypeVar("F", bound=Callable[..., Any])


def _guarded(fn: F) -> F:
    """Run a hook body; on any error log it once, switch monitoring off, never raise."""

    @functools.wraps(fn)
    def wrapper(self: Watch, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return None
        try:
            return fn(self, *args, **kwargs)
        except Exception:
            log.exception("runwatch: monitoring failed in %s and is now off; training continues",
                          fn.__name__)
            self._disable()
            return None

    return wrapper  # type: ignore[return-value]


@dataclass
class _InFlight:
    """A window copied towards the host, waiting for its event."""

    host: torch.Tensor
    event: Any  # torch.cuda.Event | None (CPU: already complete)
    rows: int
    names: tuple[str, ...]
    device_cols: int
    steps: np.ndarray
    times: np.ndarray
    host_values: np.ndarray
    present: np.ndarray
    loss_counts: np.ndarray
    loss_col: int | None


def _detect_rank() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _default_run(world_size: int) -> str:
    run = os.environ.get("RUNWATCH_RUN") or os.environ.get("TORCHELASTIC_RUN_ID")
    if run and run != "none":
        return run
    stem = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "python"
    stem = "".join(c if c.isalnum() or c in "_.-" else "-" for c in stem).strip("-.") or "run"
    # Ranks of one job must agree on the name, so only a single process adds a timestamp.
    return stem if world_size > 1 else f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _spool_dir() -> Path:
    env = os.environ.get("RUNWATCH_SPOOL_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache) if cache else Path.home() / ".cache") / "runwatch" / "spool"


class Watch:
    """Collects per-step signals on the device and streams them to the node daemon."""

    def __init__(
        self,
        model: torch.nn.Module | None,
        optimizer: torch.optim.Optimizer,
        run: str | None = None,
        *,
        socket: str | os.PathLike[str] | None = None,
        flush_every: int = 16,
        rank: int | None = None,
        world_size: int | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        spool_max_bytes: int = 64 << 20,
        sender: Sender | None = None,
    ) -> None:
        if flush_every < 1:
            raise ValueError("flush_every must be at least 1")
        detected_rank, detected_world = _detect_rank()
        self.rank = detected_rank if rank is None else rank
        self.world_size = detected_world if world_size is None else world_size
        self.run = run or _default_run(self.world_size)
        if not protocol.RUN_NAME.fullmatch(self.run):
            raise ValueError(f"run name {self.run!r}: use letters, digits and _ . : @ + -")
        self.model = model
        self.optimizer = optimizer
        self.flush_every = flush_every
        self.enabled = True
        self.step = 0
        self.socket_path = paths.client_socket_path(socket)
        self.device = self._find_device(model, optimizer)
        self._cuda = self.device.type == "cuda"

        # Column layout: device columns first, then host columns, in the order first seen.
        self._device_cols: dict[str, int] = {}
        self._host_cols: dict[str, int] = {}
        self._dev = torch.zeros(flush_every, 8, device=self.device, dtype=torch.float32)
        self._host = np.zeros((flush_every, 8))
        self._present_dev = np.zeros((flush_every, 8), dtype=bool)
        self._present_host = np.zeros((flush_every, 8), dtype=bool)
        self._steps = np.zeros(flush_every, dtype=np.int64)
        self._times = np.zeros(flush_every)
        self._loss_counts = np.zeros(flush_every)
        self._row = 0
        self._inflight: deque[_InFlight] = deque()
        self._pinned_pool: list[torch.Tensor] = []
        self._last_step_end: float | None = None
        self._user_loss = False

        hello = {
            "protocol": protocol.PROTOCOL_VERSION,
            "role": "hook",
            "run": self.run,
            "rank": self.rank,
            "world_size": self.world_size,
            "host": socket_mod.gethostname(),
            "pid": os.getpid(),
            "hook_version": __version__,
        }
        spool = Path(spool_dir) if spool_dir else _spool_dir()
        self.sender = sender or Sender(
            self.socket_path, hello, spool / f"{self.run}.rank{self.rank}.spool",
            spool_max_bytes=spool_max_bytes,
        )
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]
        if model is not None:
            self._handles.append(model.register_forward_hook(self._after_forward))
        atexit.register(self.close)

    @staticmethod
    def _find_device(model: torch.nn.Module | None, optimizer: torch.optim.Optimizer) -> torch.device:
        for group in optimizer.param_groups:
            for p in group["params"]:
                return p.device
        if model is not None:
            for p in model.parameters():
                return p.device
        return torch.device("cpu")

    # -- public API --------------------------------------------------------------------

    @_guarded
    def log(self, **metrics: torch.Tensor | float | int) -> None:
        """Record values for the current step; the last value logged in a step wins.

        Tensors stay on the device (no sync); Python numbers are stored as they are.
        Logging ``loss`` here stops the hook from reading ``output.loss`` itself.
        """
        for key, value in metrics.items():
            if key == "loss":
                self._user_loss = True
            if isinstance(value, torch.Tensor):
                col = self._device_col(key)
                self._dev[self._row, col].copy_(value.detach().reshape(()), non_blocking=True)
                self._present_dev[self._row, col] = True
                if key == "loss":
                    self._loss_counts[self._row] = 1
            else:
                col = self._host_col(key)
                self._host[self._row, col] = float(value)
                self._present_host[self._row, col] = True

    def flush(self, timeout: float = 10.0) -> bool:
        """Send what has been recorded so far and wait up to ``timeout`` for the daemon's ack.

        Waits for the device once; meant for the end of a run or a test, not the step path.
        """
        if self.enabled:
            self._flush_window()
            self._drain_inflight(wait=True)
        return self.sender.flush(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Flush, detach the hooks and stop the sender. Safe to call twice."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            if self.enabled:
                self._flush_window()
                self._drain_inflight(wait=True)
        except Exception:
            log.exception("runwatch: final flush failed")
        for h in self._handles:
            h.remove()
        self._handles = []
        self.enabled = False
        self.sender.close(timeout)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- hooks -------------------------------------------------------------------------

    @_guarded
    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"]
                 if p.grad is not None and not p.grad.is_sparse]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False)
            col = self._device_col("grad_norm")
            self._dev[self._row, col].copy_(norm.to(self.device, torch.float32))
            self._present_dev[self._row, col] = True

    @_guarded
    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        now = time.perf_counter()
        row = self._row
        for i, group in enumerate(optimizer.param_groups):
            lr = group.get("lr")
            if isinstance(lr, torch.Tensor):
                col = self._device_col(f"learning_rate/{i}")
                self._dev[row, col].copy_(lr.detach().reshape(()), non_blocking=True)
                self._present_dev[row, col] = True
            elif lr is not None:
                col = self._host_col(f"learning_rate/{i}")
                self._host[row, col] = lr
                self._present_host[row, col] = True
        if self._last_step_end is not None:
            col = self._host_col("step_duration_seconds")
            self._host[row, col] = now - self._last_step_end
            self._present_host[row, col] = True
        if self.sender.dropped_points:
            col = self._host_col("hook_dropped_points")
            self._host[row, col] = self.sender.dropped_points
            self._present_host[row, col] = True
        self._last_step_end = now
        self._steps[row] = self.step
        self._times[row] = time.time()
        self.step += 1
        self._row += 1
        if self._row == self.flush_every:
            self._flush_window()
        self._drain_inflight(wait=False)

    @_guarded
    def _after_forward(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if self._user_loss or not module.training or not torch.is_grad_enabled():
            return
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            col = self._device_col("loss")
            # Summed over micro-batches here, divided by their count on the host later.
            self._dev[self._row, col].add_(loss.detach().reshape(()).to(torch.float32))
            self._present_dev[self._row, col] = True
            self._loss_counts[self._row] += 1

    # -- buffers -----------------------------------------------------------------------

    def _device_col(self, key: str) -> int:
        col = self._device_cols.get(key)
        if col is None:
            col = len(self._device_cols)
            if col >= self._dev.shape[1]:
                grown = torch.zeros(self.flush_every, col * 2, device=self.device, dtype=torch.float32)
                grown[:, :col].copy_(self._dev)
                self._dev = grown
                self._present_dev = _grow(self._present_dev, col * 2)
            self._device_cols[key] = col
        return col

    def _host_col(self, key: str) -> int:
        col = self._host_cols.get(key)
        if col is None:
            col = len(self._host_cols)
            if col >= self._host.shape[1]:
                self._host = _grow(self._host, col * 2)
                self._present_host = _grow(self._present_host, col * 2)
            self._host_cols[key] = col
        return col

    def _flush_window(self) -> None:
        rows = self._row
        if rows == 0:
            return
        n_dev = len(self._device_cols)
        event = None
        if n_dev == 0:
            host = torch.empty(rows, 0)
        elif self._cuda:
            host = self._pinned(n_dev)
            host[:rows, :n_dev].copy_(self._dev[:rows, :n_dev], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = self._dev[:rows, :n_dev].clone()
        self._dev.zero_()
        names = tuple(self._device_cols) + tuple(self._host_cols)
        n_host = len(self._host_cols)
        self._inflight.append(_InFlight(
            host=host,
            event=event,
            rows=rows,
            names=names,
            device_cols=n_dev,
            steps=self._steps[:rows].copy(),
            times=self._times[:rows].copy(),
            host_values=self._host[:rows, :n_host].copy(),
            present=np.concatenate(
                [self._present_dev[:rows, :n_dev], self._present_host[:rows, :n_host]], axis=1
            ),
            loss_counts=self._loss_counts[:rows].copy(),
            loss_col=self._device_cols.get("loss"),
        ))
        self._present_dev[:] = False
        self._present_host[:] = False
        self._loss_counts[:] = 0
        self._row = 0

    def _pinned(self, n_dev: int) -> torch.Tensor:
        for i, t in enumerate(self._pinned_pool):
            if t.shape[1] >= n_dev:
                return self._pinned_pool.pop(i)
        return torch.empty(self.flush_every, max(n_dev, 8), dtype=torch.float32, pin_memory=True)

    def _drain_inflight(self, wait: bool) -> None:
        while self._inflight:
            item = self._inflight[0]
            if item.event is not None:
                if wait:
                    item.event.synchronize()
                elif not item.event.query():
                    return
            self._inflight.popleft()
            device_values = item.host.numpy()[: item.rows, : item.device_cols].astype(np.float64)
            if item.loss_col is not None:
                counts = np.where(item.loss_counts > 0, item.loss_counts, 1.0)
                device_values[:, item.loss_col] /= counts
            values = np.concatenate([device_values, item.host_values], axis=1)
            present = item.present
            self.sender.put(Batch(item.names, item.steps, item.times, values,
                                  None if present.all() else present))
            if item.event is not None:
                self._pinned_pool.append(item.host)

    def _disable(self) -> None:
        self.enabled = False
        for h in self._handles:
            h.remove()
        self._handles = []


def _grow(a: np.ndarray, cols: int) -> np.ndarray:
    grown = np.zeros((a.shape[0], cols), dtype=a.dtype)
    grown[:, : a.shape[1]] = a
    return grown


def watch(
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    run: str | None = None,
    **options: Any,
) -> Watch:
    """Watch a training loop: ``watch = runwatch.hooks.watch(model, optimizer, run="my-run")``.

    Options: ``socket`` (default ``$RUNWATCH_SOCKET`` or the node daemon's), ``flush_every``
    (steps per device-to-host copy, default 16), ``rank``/``world_size`` (default from
    ``torch.distributed`` or ``RANK``/``WORLD_SIZE``), ``spool_dir``, ``spool_max_bytes``.
    """
    return Watch(model, optimizer, run, **options)
