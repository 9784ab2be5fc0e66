"""``watch(model, optimizer, run=...)``: the one line a plain PyTorch loop needs.

It attaches through ``Optimizer.register_step_pre_hook`` / ``register_step_post_hook``,
forward (pre-)hooks on the model and its watched layers, and, under DDP, a communication
hook, so the loop does not change. Per optimizer step it records (keys as sent):

=============================  ==========================================================
``grad_norm``                  total L2 norm of the gradients: what ``clip_grad_norm_``
                               returned (pre-clip) when the loop clips, else computed here
``group_grad_norm/<group>``    per layer group (each repeated block, ``embeddings``, ``head``,
                               ``other``), of the gradients as the optimizer applies them
``microbatch_grad_norm``       mean norm of one backward pass's gradient, and
``microbatch_grad_norm_std``   its spread across the step's micro-batches (no DDP; switched
                               on when a step has more than one forward, or always/never
                               with ``microbatch_norms=True/False``)
``local_grad_norm``            under DDP: this rank's gradient norm before the all-reduce
``activation_norm/<layer>``    RMS of each watched layer's output
``loss``                       ``output.loss`` / ``output["loss"]``, mean over micro-batches
``tokens``, ``useful_tokens``  from ``labels != ignore_index``, ``attention_mask`` or a pad id
``token_efficiency``           useful / total tokens
``tokens_per_second``          and ``samples_per_second``, over the host step time
``learning_rate/<group>``      per optimizer parameter group
``step_duration_seconds``      host wall time between optimizer steps (time paused or in a
                               ``phase`` not counted)
``data_wait_seconds``          host time from the optimizer step to the next step's first
                               forward: waiting for the data loader and the loop's own work
``forward_seconds``            host time inside the model's forward calls (on a GPU: the time
                               to queue the kernels, which grows when the host is the bottleneck)
``hook_seconds``               host time spent inside these hooks during the step
``batch_fingerprint``          hash of the last micro-batch's token ids (< 2**31)
``data_shard``, ``data_offset``  where the batch came from, when the loop calls ``batch()``
``guard_skipped``              1 when the spike guard refused the update, and
``guard_threshold``            the norm above which it would have
``lr_scale``, ``rewinds``      after a rewind: the learning-rate factor in force and how
                               many rewinds this process made
``skipped_batches``            batches (and their ``skipped_samples``/``skipped_tokens``)
                               ``watch.data`` dropped because a command said so
``hist/<name>/<i>``            every ``histogram_every`` steps: fixed-grid counts (see
                               :mod:`runwatch.hooks.histograms`) of ``seq_length`` (useful
                               tokens per sample), ``output_entropy`` (nats, sampled
                               positions), ``activation_values/<layer>`` (sampled, signed
                               log), ``token_loss`` (nats, sampled positions; only when told
                               how labels align: ``token_loss=`` or ``watch.token_loss``), filled
                               on one step in ``HISTOGRAM_STEP_SAMPLE``, and what
                               ``watch.histogram`` adds; the daemon's drift monitors read them
``hist/seq_length@shard<j>/*``  with ``batch(shard=...)``: the ``seq_length`` counts of up to
                               ``SHARD_SLOTS`` shards a flush, slot j's shard in ``.../id``
=============================  ==========================================================

Control (see :mod:`runwatch.hooks.control`): the daemon can pause the run before a step,
resume it, rewind it to a checkpoint in ``checkpoint_dir`` with a lower learning rate, dump
the last batches and skip a data shard. Step numbers keep counting forward through a
rewind (they count optimizer steps taken; the checkpoint restores the scheduler's own
counters), so every step the daemon stores stays unique.

Where a host sync would creep in, and how this avoids it: device values are written with
``copy_``/``add_`` into a device buffer (see :mod:`runwatch.hooks.buffer`), never read with
``.item()``, ``float()``, ``.cpu()`` or ``.tolist()``; the guard's decision is a tensor
handed to a fused optimizer (see :mod:`runwatch.hooks.guard`); host-known numbers
(shapes, Python learning rates, times) never touch the device. ``close()`` and ``flush()``
are the only places that wait for the device.

Anything that goes wrong inside a hook is logged once and switches monitoring off;
training carries on.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import math
import os
import re
import socket as socket_mod
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from runwatch.daemon import paths, protocol
from runwatch.daemon.checkpoints import Checkpoint, scan
from runwatch.daemon.protocol import shard_id
from runwatch.hooks import __version__
from runwatch.hooks import checkpoint as ckpt_io
from runwatch.hooks.buffer import StepBuffer
from runwatch.hooks.control import Control, default_incident_dir, launch_id
from runwatch.hooks.guard import GuardMode, SpikeGuard, resolve_mode
from runwatch.hooks.histograms import (
    ACTIVATION_RANGE,
    SHARD_SLOTS,
    TOKEN_LOSS_RANGE,
    DeviceHistogram,
    Sampler,
    activation_sample,
    check_token_loss,
    entropy_sample,
    logits_of,
    loss_values_sample,
    per_sample_tokens,
    token_loss_sample,
)
from runwatch.hooks.sender import Batch, Sender
from runwatch.hooks.signals import Fingerprint, GradNorms, activation_norm, repeated_blocks, token_counts

log = logging.getLogger("runwatch.hooks")
F = TypeVar("F", bound=Callable[..., Any])


class _SkipStep(BaseException):
    """Raised from the pre-step hook in ``skip_sync`` mode; caught by the step wrapper."""


#: The built-in histograms (sequence length, output entropy, activation values) are filled on
#: one step in this many: their kernels cost ~0.5 ms a step on a GPU, which a 30 ms step cannot
#: afford every step; the drift windows just take more steps to fill.
HISTOGRAM_STEP_SAMPLE = 4
#: Watched layers (evenly spaced) whose activation values get a histogram.
MAX_ACTIVATION_HISTOGRAMS = 4
#: Room histograms may take in a step's row (the rest is for the step's own signals).
MAX_HISTOGRAM_COLUMNS = protocol.MAX_METRICS_PER_BLOCK // 2


def _guarded(fn: F) -> F:
    """Run a hook body, timing it; on any error log once, switch monitoring off, never raise."""

    @functools.wraps(fn)
    def wrapper(self: Watch, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return None
        started = time.perf_counter()
        try:
            return fn(self, *args, **kwargs)
        except Exception:
            log.exception("runwatch: monitoring failed in %s and is now off; training continues",
                          fn.__name__)
            self._disable()
            return None
        finally:
            self._hook_seconds += time.perf_counter() - started

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class RecentBatch:
    """A batch kept by reference so a pause can dump it (issue: interventions)."""

    step: int
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    shard: str | None
    offset: int | None


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


def safe_run_name(name: str | None) -> str | None:
    """A run name the daemon accepts, made from a free-form one (HF ``run_name`` is often a
    path such as ``meta-llama/Llama-3-8B``): other characters become ``-``."""
    if not name:
        return None
    cleaned = re.sub(r"[^A-Za-z0-9_.:@+-]", "-", name).lstrip("_.:@+-")[:200]
    return cleaned or None


def _spool_dir() -> Path:
    env = os.environ.get("RUNWATCH_SPOOL_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache) if cache else Path.home() / ".cache") / "runwatch" / "spool"


def _unwrap(model: torch.nn.Module | None) -> torch.nn.Module | None:
    return getattr(model, "module", model) if model is not None else None


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
        guard: GuardMode = "auto",
        guard_window: int = 128,
        guard_warmup: int = 64,
        guard_sigma: float = 6.0,
        guard_ratio: float | None = None,
        layers: Sequence[str | torch.nn.Module] | None = None,
        group_norms: bool = True,
        microbatch_norms: bool | Literal["auto"] = "auto",
        ignore_index: int = -100,
        pad_id: int | None = None,
        keep_batches: int = 2,
        inputs_from_forward: bool = True,
        capture_clip: bool = True,
        optimizer_pre_hook: bool = True,
        start_step: int = 0,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        scheduler: Any = None,
        control_every: int = 8,
        incident_dir: str | os.PathLike[str] | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        histogram_every: int = 16,
        seq_len: int | None = None,
        token_loss: Literal["shifted", "aligned"] | None = None,
        sender: Sender | None = None,
    ) -> None:
        if flush_every < 1:
            raise ValueError("flush_every must be at least 1")
        if histogram_every < 0:
            raise ValueError("histogram_every must be >= 0 (0: no histograms)")
        if token_loss not in (None, "shifted", "aligned"):
            raise ValueError(f"token_loss={token_loss!r}: use 'shifted' (logits at t predict labels at t+1, "
                             "as causal LMs), 'aligned' (labels at the logits' positions) or None")
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate/Lightning wrappers
        detected_rank, detected_world = _detect_rank()
        self.rank = detected_rank if rank is None else rank
        self.world_size = detected_world if world_size is None else world_size
        self.run = run or _default_run(self.world_size)
        if not protocol.RUN_NAME.fullmatch(self.run):
            raise ValueError(f"run name {self.run!r}: use letters, digits and _ . : @ + -")
        self.model = model
        self.optimizer = optimizer
        self.enabled = True
        self.step = start_step  # a resumed run continues its numbering; the daemon ignores repeats
        self.skipped_steps_requested = 0
        self.checkpoint_dir = Path(checkpoint_dir).absolute() if checkpoint_dir else None
        self.incident_dir = Path(incident_dir).absolute() if incident_dir else \
            default_incident_dir(self.checkpoint_dir)
        self.scheduler = scheduler
        self.data_position = 0  # batches drawn through watch.data(), for checkpoints
        self.socket_path = paths.client_socket_path(socket)
        self.device = self._find_device(model, optimizer)
        self.guard_mode = resolve_mode(guard, optimizer)
        self._optimizer_pre_hook = optimizer_pre_hook
        if not optimizer_pre_hook and self.guard_mode == "skip_sync":
            raise ValueError("guard='skip_sync' needs the optimizer pre-hook; use 'observe' or a "
                             "fused optimizer with 'skip'")
        if not optimizer_pre_hook:
            capture_clip = False  # the loop clips after we read the gradients (Lightning)
        self.ignore_index, self.pad_id = ignore_index, pad_id
        self._hook_seconds = 0.0
        self._last_step_end: float | None = None
        self._user_loss = False
        self._user_grad_norm: torch.Tensor | None = None
        self._last_loss: torch.Tensor | None = None
        self._shard: str | None = None
        self._offset: int | None = None
        self._recent: deque[RecentBatch] = deque(maxlen=max(keep_batches, 1))
        self._keep_batches = keep_batches
        self._set_found_inf = False
        self._our_found_inf: torch.Tensor | None = None
        self._forwards_this_step = 0
        self._mb_partial_step = False
        self._microbatch_mode: bool | str = False
        self._step_began: float | None = None  # host time of this step's first forward
        self._forward_began: float | None = None
        self._forward_seconds = 0.0
        self._phase: str | None = None
        self._hist_every = histogram_every
        self._hists: dict[str, DeviceHistogram] = {}
        self._seq_len = seq_len  # the seq_length grid's top; else the first batch's length
        self._hist_sampler: Sampler | None = None
        self._hist_refused: set[str] = set()
        self._activation_hists: set[str] = set()  # activation_norm/<layer> keys that get one
        self._token_loss = token_loss  # how the model's labels align with its logits, if told
        self._fwd_labels: torch.Tensor | None = None  # this forward's labels, for token_loss
        self._shard_slots: dict[str, int] = {}  # shard -> slot of seq_length@shard<j>, this flush

        self.buffer = StepBuffer(flush_every, self.device, self._emit)
        inner = _unwrap(model)
        self._grad_norms = GradNorms(inner, optimizer, self.device)
        self._group_keys = tuple(f"group_grad_norm/{g}" for g in self._grad_norms.group_names) \
            if group_norms else ()
        if self._group_keys:
            self.buffer.reserve(self._group_keys)
        self._guard = None if self.guard_mode == "off" else SpikeGuard(
            self.device, window=guard_window, warmup=guard_warmup, sigma=guard_sigma, ratio=guard_ratio)
        self._fingerprint = Fingerprint(self.device)

        # Before the HELLO: the ranks agree on their launch id over the control group.
        self.control = self._make_control(control_every)
        self.launch = launch_id(self.control)
        hello = {
            "protocol": protocol.PROTOCOL_VERSION,
            "role": "hook",
            "run": self.run,
            "rank": self.rank,
            "world_size": self.world_size,
            "host": socket_mod.gethostname(),
            "pid": os.getpid(),
            "hook_version": __version__,
            "checkpoint_dir": str(self.checkpoint_dir) if self.checkpoint_dir else None,
            "data_dir": str(Path(data_dir).absolute()) if data_dir else None,
            "capabilities": list(protocol.CAPABILITIES),
            **({"launch": self.launch} if self.launch else {}),
        }
        spool = Path(spool_dir) if spool_dir else _spool_dir()
        self.sender = sender or Sender(
            self.socket_path, hello, spool / f"{self.run}.rank{self.rank}.spool",
            spool_max_bytes=spool_max_bytes,
        )
        self.sender.on_command = self.control.receive
        early = getattr(self.sender, "early_commands", [])  # a sender passed in may not keep any
        while early:
            self.control.receive(early.pop(0))
        self._apply_in_forward = model is not None
        self._handles: list[Any] = [optimizer.register_step_post_hook(self._after_step)]
        if optimizer_pre_hook:
            self._handles.append(optimizer.register_step_pre_hook(self._before_step))
        if model is not None:
            if inputs_from_forward:
                # First among the pre-hooks: FSDP2 prepends its own, which swaps the root's gathered
                # parameters in; a rewind loaded after it crashes this forward (plain and DTensor
                # parameters mixed) or computes with pre-rewind copies.
                self._handles.append(model.register_forward_pre_hook(self._before_forward,
                                                                     with_kwargs=True, prepend=True))
            self._handles.append(model.register_forward_hook(self._after_forward))
            # Timed on the inner module: DDP's forward may wait for the other ranks (buffer
            # broadcast), and that wait is not this rank's own work.
            self._handles.append(inner.register_forward_pre_hook(self._time_forward_begin))
            self._handles.append(inner.register_forward_hook(self._time_forward_end))
            self._attach_layers(inner, layers)
            self._attach_gradient_taps(model, microbatch_norms)
        if capture_clip:
            self._capture_clip_grad_norm()
        if self._microbatch_mode is True:
            self._install_microbatch_taps()
        if self.guard_mode == "skip_sync":
            self._wrap_step_for_sync_skip()
        atexit.register(self.close)

    def _make_control(self, every: int) -> Control:
        dist = torch.distributed
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            import datetime

            # A CPU-only group for agreeing on commands (no GPU sync), even when the default one
            # is gloo: its short timeout turns a rank that stopped agreeing (monitoring failed
            # there) into an error here, which switches monitoring off, instead of a long hang.
            try:
                group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=120))
            except Exception:  # e.g. a rank that never constructs its watch: never crash training
                log.exception("runwatch: no gloo group for agreeing on commands; this rank applies "
                              "commands on its own (ranks may not agree on the step)")
                return Control(self, every)
            return Control(self, every, group, distributed=True)
        return Control(self, every)

    @staticmethod
    def _find_device(model: torch.nn.Module | None, optimizer: torch.optim.Optimizer) -> torch.device:
        for group in optimizer.param_groups:
            for p in group["params"]:
                return p.device
        if model is not None:
            for p in model.parameters():
                return p.device
        return torch.device("cpu")

    def _attach_layers(self, model: torch.nn.Module | None,
                       layers: Sequence[str | torch.nn.Module] | None) -> None:
        if model is None:
            return
        if layers is None:
            chosen = repeated_blocks(model)
        else:
            by_name = dict(model.named_modules())
            names = {id(m): n for n, m in by_name.items()}
            chosen = []
            for layer in layers:
                if isinstance(layer, str):
                    if layer not in by_name:
                        raise ValueError(f"layers: no module named {layer!r} in the model")
                    chosen.append((layer, by_name[layer]))
                else:
                    chosen.append((names.get(id(layer), type(layer).__name__), layer))
        # Activation histograms for a few evenly spaced layers only: 130 columns each, and a
        # step's row must stay within the protocol's metrics per block.
        k = min(len(chosen), MAX_ACTIVATION_HISTOGRAMS)
        picks = {round(i * (len(chosen) - 1) / max(1, k - 1)) for i in range(k)}
        for i, (name, module) in enumerate(chosen):
            key = f"activation_norm/{name}"
            if i in picks:
                self._activation_hists.add(key)
            self._handles.append(module.register_forward_hook(
                lambda _m, _i, out, _key=key: self._on_activation(_key, out)))

    def _attach_gradient_taps(self, model: torch.nn.Module, microbatch_norms: bool) -> None:
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        if ddp:
            # The comm hook sees each bucket of this rank's gradients before the all-reduce.
            try:
                model.register_comm_hook((self, model.process_group), _local_norm_allreduce)
                self._local_sq = torch.zeros((), device=self.device, dtype=torch.float32)
            except RuntimeError as exc:
                log.warning("runwatch: local_grad_norm is off: DDP already has a comm hook (%s)", exc)
        else:
            self._microbatch_mode = microbatch_norms

    def _capture_clip_grad_norm(self) -> None:
        """Reuse the norm ``clip_grad_norm_`` already computed (the pre-clip total).

        ``torch.nn.utils.clip_grad_norm_`` is wrapped while the watch is attached (Trainer
        and accelerate call it through that attribute); the wrapper passes everything through
        and keeps the returned tensor when the parameters are this optimizer's. A script that
        did ``from torch.nn.utils import clip_grad_norm_`` before calls the original; then
        ``watch.log(grad_norm=...)`` does the same.
        """
        original = torch.nn.utils.clip_grad_norm_
        ours = {id(p) for p in self._grad_norms.params}
        me = weakref.ref(self)

        @functools.wraps(original)
        def clip_grad_norm_(parameters: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
            total = original(params, *args, **kwargs)
            watch = me()
            if watch is not None and watch.enabled and params and id(params[0]) in ours:
                watch._user_grad_norm = total
            return total

        torch.nn.utils.clip_grad_norm_ = clip_grad_norm_  # type: ignore[assignment]

        def restore() -> None:
            if torch.nn.utils.clip_grad_norm_ is clip_grad_norm_:
                torch.nn.utils.clip_grad_norm_ = original  # type: ignore[assignment]

        self._restore_clip = restore

    def _wrap_step_for_sync_skip(self) -> None:
        original = self.optimizer.step

        @functools.wraps(original)
        def step(*args: Any, **kwargs: Any) -> Any:
            try:
                return original(*args, **kwargs)
            except _SkipStep:
                self._after_step(self.optimizer, args, kwargs)
                return None

        self.optimizer.step = step  # type: ignore[method-assign]
        self._unwrap_step = lambda: setattr(self.optimizer, "step", original)

    # -- public API --------------------------------------------------------------------

    @_guarded
    def log(self, **metrics: torch.Tensor | float | int) -> None:
        """Record values for the current step; the last value logged in a step wins.

        Tensors stay on the device (no sync); Python numbers are stored as they are.
        Logging ``loss`` stops the hook from reading ``output.loss`` itself; logging
        ``grad_norm`` (e.g. what ``clip_grad_norm_`` returned) is used instead of computing it.
        """
        for key, value in metrics.items():
            if key == "loss":
                self._user_loss = True
            if isinstance(value, torch.Tensor):
                if key == "grad_norm":
                    self._user_grad_norm = value
                if key == "loss":
                    self._last_loss = value
                self.buffer.set(key, value)
            else:
                self.buffer.put(key, float(value))

    def histogram(self, name: str, values: torch.Tensor, lo: float, hi: float, fine: int = 128) -> None:
        """Add ``values`` (a tensor; stays on the device, no sync) to histogram ``name`` over the
        fixed grid of ``fine`` bins on ``[lo, hi)`` plus under- and overflow; the grid is fixed by
        the first call. Sent every ``histogram_every`` steps as ``hist/<name>/<i>``; the daemon
        runs a drift monitor on it (series ``drift_psi/<name>``, ``drift_state/<name>``, ...).
        Sample large tensors first: every value costs a little."""
        if self.enabled and self._hist_every:
            self._hist_add(self._histogram(name, lo, hi, fine), values)  # a wrong grid raises here

    @_guarded
    def _hist_add(self, h: DeviceHistogram, values: torch.Tensor) -> None:
        h.add(values)

    def token_loss(self, values: torch.Tensor, labels: torch.Tensor | None = None, *,
                   shift: bool | None = None, ignore_index: int | None = None,
                   mask: torch.Tensor | None = None) -> None:
        """Per-token loss histogram ``token_loss`` (nats, grid [0, 16)), sampled on the device at
        ``ENTROPY_POSITIONS`` positions of one step in ``HISTOGRAM_STEP_SAMPLE``; no sync.

        Either logits with their labels, saying how they align, since only the model knows:
        ``watch.token_loss(out.logits, labels, shift=True)`` when position t predicts label t+1
        (causal LMs that shift inside their loss, e.g. Hugging Face's ``*ForCausalLM``),
        ``shift=False`` when labels sit at the logits' positions; labels equal to
        ``ignore_index`` (default the watch's) are skipped. Or per-token losses you computed
        (``cross_entropy(..., reduction="none")``) with ``mask`` marking the real tokens (an
        ignored token's loss is 0, which would read as a perfect prediction). A call that cannot
        be right raises ValueError naming the argument, on every step."""
        check_token_loss(values, labels, shift, mask)
        if self.enabled and self._hist_every and self.step % HISTOGRAM_STEP_SAMPLE == 0:
            self._token_loss_add(values, labels, bool(shift), ignore_index, mask)

    @_guarded
    def _token_loss_add(self, values: torch.Tensor, labels: torch.Tensor | None, shift: bool,
                        ignore_index: int | None, mask: torch.Tensor | None) -> None:
        h = self._builtin_histogram("token_loss", 0.0, TOKEN_LOSS_RANGE, 128)
        if h is None:
            return
        if labels is None:
            h.add(loss_values_sample(values, mask, self._sampler()))
        else:
            h.add(token_loss_sample(values, labels, self._sampler(), shift=shift,
                                    ignore_index=self.ignore_index if ignore_index is None else ignore_index))

    @_guarded
    def batch(self, shard: str | int | None = None, offset: int | None = None) -> None:
        """Say where the coming batch comes from in the data (shard id and offset).

        The daemon names the shard in alerts by ``data_shard``: the shard itself when it is
        a number (``17``, ``"00017"``), else a stable 31-bit CRC of its name.
        """
        self._shard, self._offset = None if shard is None else str(shard), offset
        if shard is not None:
            self.buffer.put("data_shard", float(shard_id(shard)))
        if offset is not None:
            self.buffer.put("data_offset", float(offset))

    def checkpoint(self, **extra: Any) -> Checkpoint | None:
        """Save model, optimizer, scheduler, RNG states, step and data position into
        ``checkpoint_dir`` atomically and register it with the daemon. Under DDP rank 0
        writes and the others return None (all ranks load it on a rewind). A sharded model
        (DTensor parameters, e.g. FSDP2) is saved through torch.distributed.checkpoint by every
        rank, so every rank must call this at the same step (``checkpoint_dir`` shared by all);
        all return it, rank 0 registers it. Waits for the device (it copies the state): call it
        where you would save anyway."""
        if self.checkpoint_dir is None:
            raise ValueError("watch.checkpoint(): pass checkpoint_dir= to watch()")
        sharded = ckpt_io.is_sharded(self.model)
        if self.rank != 0 and not sharded:
            return None
        # save() unwraps DDP and torch.compile itself.
        with self.phase("checkpoint"):
            saved = ckpt_io.save(self.checkpoint_dir, self.step, model=self.model,
                                 optimizer=self.optimizer, scheduler=self.scheduler,
                                 data_position={"batches": self.data_position},
                                 extra={"lr_scale": self.control.lr_scale, "rewinds": self.control.rewinds,
                                        **extra})
        if self.rank == 0:  # one registration per checkpoint, however many ranks wrote it
            self._register(saved)
        return saved

    def register_checkpoint(self, path: str | os.PathLike[str]) -> Checkpoint | None:
        """Tell the daemon about a checkpoint the framework saved (HF ``checkpoint-N/``, a
        Lightning ``.ckpt``, a DCP folder); returns it, or None when it is not complete."""
        target = Path(path).absolute()
        found = [c for c in scan(target.parent) if c.path.absolute() == target and c.complete]
        if not found:
            log.warning("runwatch: %s is not a complete checkpoint runwatch recognises", target)
            return None
        self.control.scale_at_save[str(found[0].path)] = self.control.lr_scale
        self._register(found[0])
        return found[0]

    def _register(self, c: Checkpoint) -> None:
        self.sender.put_event({"type": "checkpoint", "step": c.step, "path": str(c.path), "format": c.format,
                               "size_bytes": c.size_bytes, "saved_at": c.saved_at})

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Mark time the run spends on something other than steps (evaluation, saving a
        checkpoint): the daemon does not read the gap in steps as a stall (any rank's phase
        holds the whole run, since the others wait for it), and the time is left out of the
        next step's duration and data wait."""
        if self._phase is not None:  # nested (a checkpoint saved during evaluation): the outer one counts
            yield
            return
        began = time.perf_counter()
        self._phase_event(name, "begin")
        self._phase = name
        try:
            yield
        finally:
            self._phase = None
            self._phase_event(name, "end")
            if self._last_step_end is not None:
                self._last_step_end += time.perf_counter() - began

    def _phase_event(self, name: str, state: str) -> None:
        if self.enabled:
            self.sender.put_event({"type": "phase", "phase": str(name)[:64], "state": state,
                                   "step": self.step})

    def progress(self) -> dict[str, Any]:
        """Where the training thread is, read from another thread (a stall dump): the last
        step it finished, whether it has begun the next one, and for how long it has been."""
        now = time.perf_counter()
        last = self._last_step_end
        return {"last_step": self.step - 1, "began_next_step": self._step_began is not None,
                "seconds_since_last_step": None if last is None else round(now - last, 3),
                "phase": self._phase}

    def data(self, batches: Any, shard: Callable[[Any], Any] | None = None, start: int = 0) -> Any:
        """Iterate ``batches``, dropping (and counting) those a command says to skip: the
        batches right after a rewind, or a shard told to be skipped (``shard(batch)`` names a
        batch's shard). ``start``: batches to pass over first, e.g. a resume plan's
        ``data_position``."""
        self.control.data_consumer = True
        for i, batch in enumerate(batches):
            self.data_position += 1
            name = shard(batch) if shard else None
            if i < start or self.control.should_skip(batch, name):
                continue
            if name is not None:
                self.batch(shard=name)  # data_shard, and the per-shard drift histograms
            yield batch

    @property
    def paused(self) -> bool:
        return self.control.paused

    @property
    def lr_scale(self) -> float:
        """The learning-rate factor rewinds put in force (1.0: none)."""
        return self.control.lr_scale

    def recent_batches(self) -> list[RecentBatch]:
        """The last ``keep_batches`` training batches, oldest first (held by reference)."""
        return list(self._recent)

    def flush(self, timeout: float = 10.0) -> bool:
        """Send what has been recorded so far and wait up to ``timeout`` for the daemon's ack.

        Waits for the device once; meant for the end of a run or a test, not the step path.
        """
        if self.enabled:
            self.buffer.flush()
            self.buffer.drain(wait=True)
        return self.sender.flush(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Flush, detach the hooks and stop the sender. Safe to call twice."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            if self.enabled:
                self.buffer.flush()
                self.buffer.drain(wait=True)
        except Exception:
            log.exception("runwatch: final flush failed")
        self._disable()
        self.sender.close(timeout)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- hooks -------------------------------------------------------------------------

    @_guarded
    def observe_inputs(self, *args: Any, **kwargs: Any) -> None:
        """Count tokens, fingerprint and keep one training micro-batch's inputs.

        Called for you by a forward pre-hook on the model; integrations whose model does not
        receive the batch in ``forward`` (Lightning) call it with the batch instead.
        """
        self._inputs(args, kwargs)

    def before_optimizer_step(self) -> None:
        """Read gradients and run the guard now. For loops whose ``optimizer.step(closure)``
        computes the gradients inside the step (Lightning), where the optimizer's pre-hook
        would see the previous step's; pass ``optimizer_pre_hook=False`` and call this."""
        self._before_step(self.optimizer, (), {})

    @_guarded
    def record_loss(self, loss: torch.Tensor) -> None:
        """Add one micro-batch's loss; the step reports their mean. Stops ``.loss`` capture."""
        self._user_loss = True
        self.buffer.add("loss", loss)
        self._last_loss = loss

    @_guarded
    def _before_forward(self, module: torch.nn.Module, args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> None:
        if module.training and torch.is_grad_enabled():
            self._close_microbatch()
            self._forwards_this_step += 1
            if self._forwards_this_step == 2 and self._microbatch_mode == "auto" and \
                    not hasattr(self, "_mb_sq"):
                self._install_microbatch_taps()
                self._mb_partial_step = True  # this step's first micro-batch went unseen
            self._inputs(args, kwargs)

    def _inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._step_start()
        if self._step_began is None:
            self._step_began = time.perf_counter()
            if self._last_step_end is not None:
                self.buffer.put("data_wait_seconds", self._step_began - self._last_step_end)
        counts = token_counts(args, kwargs, self.ignore_index, self.pad_id)
        if counts is not None:
            useful, total, samples = counts
            self.buffer.add("useful_tokens", useful, average=False)
            self.buffer.put_add("tokens", total)
            self.buffer.put_add("samples", samples)
        if self._hist_every and self.step % HISTOGRAM_STEP_SAMPLE == 0:
            per_sample = per_sample_tokens(args, kwargs, self.ignore_index, self.pad_id)
            if per_sample is not None:
                lengths, seq_len = per_sample
                if self._seq_len is None:
                    self._seq_len = seq_len  # fixed for the run: the grid must not move
                # hi = seq_len + 1 so that a full-length sample falls in the last bin, not overflow.
                h = self._builtin_histogram("seq_length", lo=0.0, hi=self._seq_len + 1.0,
                                            fine=min(128, self._seq_len + 1))
                if h is not None:
                    h.add(lengths)
                    slot = self._shard_histogram(h) if self._shard is not None else None
                    if slot is not None:
                        slot.add(lengths)
            if self._token_loss is not None:
                labels = kwargs.get("labels")
                self._fwd_labels = labels if isinstance(labels, torch.Tensor) else None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point():
            self.buffer.set("batch_fingerprint", self._fingerprint(ids))
        if self._keep_batches:
            self._recent.append(RecentBatch(self.step, args, kwargs, self._shard, self._offset))

    def _step_start(self) -> None:
        """Apply agreed commands before the step's first forward (a no-op unless one is due).
        Time spent paused is not the hook's time, nor the step's."""
        control = self.control
        if not control.agreed and not control.paused:
            return
        before = control.paused_seconds
        control.at_step_start()
        paused = control.paused_seconds - before
        self._hook_seconds -= paused
        if self._last_step_end is not None:
            self._last_step_end += paused

    @_guarded
    def _after_forward(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if not module.training or not torch.is_grad_enabled():
            return
        if self._hist_every and self.step % HISTOGRAM_STEP_SAMPLE == 0:
            logits = logits_of(output)
            if logits is not None:
                h = self._builtin_histogram("output_entropy", lo=0.0, hi=math.log(logits.shape[-1]),
                                            fine=128)
                if h is not None:
                    h.add(entropy_sample(logits, self._sampler()))
                labels, self._fwd_labels = self._fwd_labels, None
                if self._token_loss is not None and labels is not None:
                    shift = self._token_loss == "shifted"
                    try:
                        check_token_loss(logits, labels, shift, None)
                    except ValueError as exc:  # the model's labels are not what token_loss= said
                        log.warning("runwatch: no token_loss histogram: %s", exc)
                        self._token_loss = None
                    else:
                        self._token_loss_add(logits, labels, shift, None, None)
        if self._user_loss:
            return
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self.buffer.add("loss", loss)
            self._last_loss = loss

    def _time_forward_begin(self, module: torch.nn.Module, args: Any) -> None:
        if module.training and torch.is_grad_enabled():
            self._forward_began = time.perf_counter()

    def _time_forward_end(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._forward_began is not None:
            self._forward_seconds += time.perf_counter() - self._forward_began
            self._forward_began = None

    @_guarded
    def _on_activation(self, key: str, output: Any) -> None:
        if torch.is_grad_enabled():
            measured = activation_norm(output)
            if measured is not None:
                norm, count = measured
                # Sum of squares and element counts over the step's micro-batches; the host
                # takes sqrt(sum / count), right also when micro-batches differ in size.
                self.buffer.add(key, norm.square(), average=False)
                self.buffer.put_add(key.replace("activation_norm/", "activation_count/", 1), count)
            if self._hist_every and key in self._activation_hists and self.step % HISTOGRAM_STEP_SAMPLE == 0:
                name = key.replace("activation_norm/", "activation_values/", 1)
                h = self._builtin_histogram(name, -ACTIVATION_RANGE, ACTIVATION_RANGE, 128)
                sample = activation_sample(output, self._sampler()) if h is not None else None
                if sample is not None and h is not None:
                    h.add(sample)

    def _sampler(self) -> Sampler:
        if self._hist_sampler is None:
            self._hist_sampler = Sampler(self.device)
        return self._hist_sampler

    def _builtin_histogram(self, name: str, lo: float, hi: float, fine: int) -> DeviceHistogram | None:
        """A built-in histogram, or None (said once) when it cannot be one: a name too long
        for a key, a grid that changed, no room left in the step's row. Monitoring goes on."""
        if name in self._hist_refused:
            return None
        try:
            return self._histogram(name, lo, hi, fine)
        except ValueError as exc:
            log.warning("runwatch: no drift histogram %s: %s", name, exc)
            self._hist_refused.add(name)
            return None

    def _histogram(self, name: str, lo: float, hi: float, fine: int) -> DeviceHistogram:
        h = self._hists.get(name)
        if h is None:
            h = DeviceHistogram(name, lo, hi, fine, self.device)
            bad = [k for k in (h.keys[0], h.keys[-1]) if not protocol.METRIC_KEY.fullmatch(k)]
            if bad or len(h.keys[-1]) > protocol.MAX_KEY_LENGTH:
                raise ValueError(f"histogram name {name!r} does not make a valid key ({h.keys[-1]!r})")
            columns = sum(len(x.keys) for x in self._hists.values()) + len(h.keys)
            if columns > MAX_HISTOGRAM_COLUMNS:
                raise ValueError(f"histograms would take {columns} columns of a step's row, more than "
                                 f"{MAX_HISTOGRAM_COLUMNS} (half the protocol's metrics per block)")
            self.buffer.reserve(h.keys)
            self._hists[name] = h
        elif h.grid() != (float(lo), float(hi), fine):
            raise ValueError(f"histogram {name!r}: grid {h.grid()} is fixed for the run, "
                             f"got {(lo, hi, fine)}")
        return h

    def _shard_histogram(self, base: DeviceHistogram) -> DeviceHistogram | None:
        """The slot of this batch's shard for ``base``'s counts this flush, or None when the
        flush already holds ``SHARD_SLOTS`` other shards (then the batch counts in ``base``
        only). Fixed slots keep the row's columns fixed however many shards a run reads."""
        assert self._shard is not None
        j = self._shard_slots.get(self._shard)
        if j is None:
            if len(self._shard_slots) >= SHARD_SLOTS:
                return None
            j = self._shard_slots[self._shard] = len(self._shard_slots)
        return self._builtin_histogram(f"{base.name}@shard{j}", base.lo, base.hi, base.fine)

    def _flush_histograms(self, step: int) -> None:
        if self._hist_every and self._hists and step % self._hist_every == self._hist_every - 1:
            used = {f"seq_length@shard{j}" for j in self._shard_slots.values()}
            for name, h in self._hists.items():
                if "@shard" in name and name not in used:
                    continue  # an idle shard slot: nothing counted, nothing to say
                self.buffer.set_many(h.keys, h.take())
            for shard, j in self._shard_slots.items():
                self.buffer.put(f"hist/seq_length@shard{j}/id", float(shard_id(shard)))
            self._shard_slots.clear()

    def _install_microbatch_taps(self) -> None:
        """Per-parameter gradient hooks: each sees one backward's gradient before it is added
        to ``.grad``. (A multi-grad hook would be one call, but it breaks a user's
        ``torch.autograd.grad`` on the parameters.) Costs two small kernels per parameter per
        backward, so it is installed only once gradient accumulation is seen."""
        self._mb_sq = torch.zeros((), device=self.device, dtype=torch.float32)
        self._mb_open = False
        for p in self._grad_norms.params:
            if p.requires_grad:
                self._handles.append(p.register_hook(self._on_param_grad))

    def _on_param_grad(self, grad: torch.Tensor) -> None:
        # Runs inside autograd: an exception here would abort the user's backward().
        if not self.enabled or grad.is_sparse or grad.is_complex():
            return
        try:
            self._mb_sq.add_(torch.linalg.vector_norm(grad, dtype=torch.float32).square().to(self.device))
            self._mb_open = True
        except Exception:
            log.exception("runwatch: micro-batch gradient tap failed; monitoring is now off")
            self._disable()

    def _close_microbatch(self) -> None:
        if getattr(self, "_mb_open", False):
            if not self._mb_partial_step:
                norm = self._mb_sq.sqrt()
                self.buffer.add("microbatch_grad_norm", norm)
                self.buffer.add("microbatch_grad_norm_sq", norm.square())
            self._mb_sq.zero_()
            self._mb_open = False

    @_guarded
    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._close_microbatch()
        self._forwards_this_step = 0
        self._mb_partial_step = False
        computed = self._grad_norms.compute()
        if computed is None:
            return
        total, per_group = computed
        grad_scale = getattr(optimizer, "grad_scale", None)
        if isinstance(grad_scale, torch.Tensor):
            # GradScaler hands fused optimizers still-scaled gradients plus the scale.
            inv = grad_scale.to(self.device, torch.float32).reciprocal()
            total, per_group = total * inv, per_group * inv
        if self._user_grad_norm is not None:
            total, self._user_grad_norm = self._user_grad_norm, None
        self.buffer.set("grad_norm", total)
        if self._group_keys:
            self.buffer.set_many(self._group_keys, per_group)
        if hasattr(self, "_local_sq"):
            self.buffer.set("local_grad_norm", self._local_sq.sqrt())
            self._local_sq.zero_()
        if self._guard is None:
            return
        skip, threshold = self._guard.check(total, self._last_loss)
        self.buffer.set("guard_skipped", skip)
        self.buffer.set("guard_threshold", threshold)
        if self.guard_mode == "skip":
            found = skip.to(torch.float32)
            existing = getattr(optimizer, "found_inf", None)
            if existing is not None:  # GradScaler got there first: skip if either says so
                found = torch.maximum(existing.reshape(()).to(torch.float32), found).reshape(existing.shape)
                self._restore_found_inf = existing
            optimizer.found_inf = found  # type: ignore[attr-defined]
            self._set_found_inf = True
            self._our_found_inf = found
        elif self.guard_mode == "skip_sync" and bool(skip.item()):  # the stated one sync per step
            self.skipped_steps_requested += 1
            raise _SkipStep

    @_guarded
    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._set_found_inf:
            # Touch found_inf only if it is still ours: a GradScaler that set its own after us
            # (Lightning's AMP order) deletes it itself.
            if getattr(optimizer, "found_inf", None) is self._our_found_inf:
                restore = getattr(self, "_restore_found_inf", None)
                if restore is not None:
                    optimizer.found_inf = restore  # type: ignore[attr-defined]
                else:
                    del optimizer.found_inf  # type: ignore[attr-defined]
            self._restore_found_inf = None
            self._our_found_inf = None
            self._set_found_inf = False
        if not self._optimizer_pre_hook:
            self._user_grad_norm = None  # a clip after our read belongs to no later step
        now = time.perf_counter()
        buf = self.buffer
        for i, group in enumerate(optimizer.param_groups):
            lr = group.get("lr")
            if isinstance(lr, torch.Tensor):
                buf.set(f"learning_rate/{i}", lr)
            elif lr is not None:
                buf.put(f"learning_rate/{i}", lr)
        if self._last_step_end is not None:
            buf.put("step_duration_seconds", now - self._last_step_end)
        if self.sender.dropped_points:
            buf.put("hook_dropped_points", self.sender.dropped_points)
        if self._forward_seconds:
            buf.put("forward_seconds", self._forward_seconds)
            self._forward_seconds = 0.0
        self._last_step_end = now
        self._step_began = None
        self._last_loss = None
        # This call's own time is added by the wrapper after it returns, so it is counted in
        # the next step's figure: the sum over a run is exact, each step's is off by one call.
        buf.put("hook_seconds", self._hook_seconds)
        self._hook_seconds = 0.0
        control = self.control
        if control.rewinds:
            buf.put("lr_scale", control.lr_scale)
            buf.put("rewinds", control.rewinds)
        if control.skipped.batches:
            buf.put("skipped_batches", control.skipped.batches)
            buf.put("skipped_samples", control.skipped.samples)
            buf.put("skipped_tokens", control.skipped.tokens)
        step = self.step
        self.step += 1
        self._flush_histograms(step)
        if buf.end_step(step, time.time()):
            buf.flush()
        buf.drain(wait=False)
        control.at_step_end(step)
        if not self._apply_in_forward:
            self._step_start()

    # -- emitting ----------------------------------------------------------------------

    def _emit(self, batch: Batch) -> None:
        """Derive host-side ratios from a window that has reached the host, then send it."""
        self.sender.put(_derive(batch))

    def _disable(self) -> None:
        self.enabled = False
        for h in self._handles:
            h.remove()
        self._handles = []
        restore = getattr(self, "_restore_clip", None)
        if restore is not None:
            restore()
            self._restore_clip = None
        unwrap = getattr(self, "_unwrap_step", None)
        if unwrap is not None:
            unwrap()
            self._unwrap_step = None


def _derive(batch: Batch) -> Batch:
    names = list(batch.names)
    cols = {n: i for i, n in enumerate(names)}
    values, present = batch.values.copy(), batch.present
    new: list[tuple[str, np.ndarray, np.ndarray]] = []

    def col(name: str) -> tuple[np.ndarray, np.ndarray] | None:
        i = cols.get(name)
        if i is None:
            return None
        mask = np.ones(len(values), dtype=bool) if present is None else present[:, i]
        return values[:, i], mask

    tokens, useful, dt = col("tokens"), col("useful_tokens"), col("step_duration_seconds")
    samples, mb, mb_sq = col("samples"), col("microbatch_grad_norm"), col("microbatch_grad_norm_sq")
    with np.errstate(divide="ignore", invalid="ignore"):
        if tokens and useful:
            new.append(("token_efficiency", useful[0] / tokens[0], useful[1] & tokens[1] & (tokens[0] > 0)))
        if tokens and dt:
            new.append(("tokens_per_second", tokens[0] / dt[0], tokens[1] & dt[1] & (dt[0] > 0)))
        if samples and dt:
            new.append(("samples_per_second", samples[0] / dt[0], samples[1] & dt[1] & (dt[0] > 0)))
        if mb and mb_sq:
            new.append(("microbatch_grad_norm_std", np.sqrt(np.maximum(mb_sq[0] - mb[0] ** 2, 0.0)),
                        mb[1] & mb_sq[1]))
    for name, i in cols.items():
        if name.startswith("activation_norm/"):
            count = col("activation_count/" + name.split("/", 1)[1])
            if count is not None:
                values[:, i] = np.sqrt(values[:, i] / np.where(count[0] > 0, count[0], 1.0))
    drop = {i for n, i in cols.items()
            if n == "microbatch_grad_norm_sq" or n.startswith("activation_count/")}
    if not new and not drop:
        return batch
    keep = [i for i in range(len(names)) if i not in drop]
    out_names = tuple(names[i] for i in keep) + tuple(n for n, _, _ in new)
    out_values = np.concatenate([values[:, keep]] + [v[:, None] for _, v, _ in new], axis=1)
    base_present = np.ones_like(values, dtype=bool) if present is None else present
    out_present = np.concatenate([base_present[:, keep]] + [m[:, None] for _, _, m in new], axis=1)
    return Batch(out_names, batch.steps, batch.times, out_values,
                 None if out_present.all() else out_present)


def _local_norm_allreduce(state, bucket):  # type: ignore[no-untyped-def]
    """DDP comm hook: add this bucket's local squared norm, then all-reduce as DDP would,
    over DDP's own process group (HSDP, TP x DP).

    No annotations: DDP checks them against ``dist.GradBucket`` and, with postponed
    evaluation of annotations in this module, would see strings and refuse the hook.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    watch, process_group = state
    if watch.enabled:
        watch._local_sq.add_(torch.linalg.vector_norm(bucket.buffer(), dtype=torch.float32).square())
    return default_hooks.allreduce_hook(process_group, bucket)


def watch(
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    run: str | None = None,
    **options: Any,
) -> Watch:
    """Watch a training loop: ``watch = runwatch.hooks.watch(model, optimizer, run="my-run")``.

    Options (all keyword): ``socket``, ``flush_every`` (steps per device-to-host copy,
    default 16), ``rank``/``world_size``, ``spool_dir``, ``spool_max_bytes``, ``guard``
    (``auto``/``skip``/``skip_sync``/``observe``/``off``), ``guard_window``,
    ``guard_warmup``, ``guard_sigma``, ``guard_ratio``, ``layers`` (modules or names whose
    output norm is watched; default each repeated block), ``group_norms``,
    ``microbatch_norms``, ``ignore_index``, ``pad_id``, ``keep_batches``,
    ``inputs_from_forward``, ``capture_clip``, ``optimizer_pre_hook``, ``start_step`` (the
    step a resumed run continues from), ``histogram_every`` (steps per histogram flush for the
    drift monitors, default 16; 0: no histograms), ``seq_len`` (top of the ``seq_length``
    grid; default the first batch's sequence length), ``token_loss`` (``"shifted"`` or
    ``"aligned"``: how the ``labels`` passed to the model align with its output's ``logits``;
    then the forward hook fills the ``token_loss`` histogram; default None: not filled, see
    ``Watch.token_loss``).
    """
    return Watch(model, optimizer, run, **options)
