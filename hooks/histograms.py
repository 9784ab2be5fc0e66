"""Fixed-edge histograms accumulated on the device, for the daemon's drift monitors.

Each histogram has a fine grid known in advance: ``fine`` equal-width bins over ``[lo, hi)``
plus an underflow bin (index 0) and an overflow bin (index ``fine + 1``), the grid of
:mod:`runwatch.daemon.drift` (``torch.bucketize(v, edges, right=True)`` is numpy's
``searchsorted(edges, v, side="right")``; the edges are numpy's ``linspace`` so both sides agree
to the last bit). Values are binned in float64 into a device counts vector with ``index_add_``
(``torch.bincount`` would read its maximum back to the host); NaN goes to an extra discard slot.
Nothing is read back: the counts reach the host as columns ``hist/<name>/<i>`` of a step's row
in the step buffer, every ``histogram_every`` steps, and are then zeroed on the device.

Sampling keeps the per-step cost flat: activations are sampled (``ACTIVATION_SAMPLES`` elements
per watched layer and forward, at positions drawn on the device from the hook's own generator,
so the training's random stream is untouched), output entropy at ``ENTROPY_POSITIONS``
positions, fewer for very large vocabularies.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

ACTIVATION_SAMPLES = 1024
ACTIVATION_RANGE = 8.0  # signed log1p grid [-8, 8]: |x| up to e**8 ~ 3000 before overflow
ENTROPY_POSITIONS = 256
ENTROPY_MAX_ELEMENTS = 1 << 23  # positions x vocabulary gathered at most (32 MiB of float32)
#: Per-token loss grid [0, 16) nats: ln(vocabulary) is 12.5 at 256k tokens; above, overflow.
TOKEN_LOSS_RANGE = 16.0
#: Slots for per-shard counts of one histogram per flush (fixed columns; see hooks/watch.py).
SHARD_SLOTS = 4


def hist_keys(name: str, fine: int) -> tuple[str, ...]:
    return tuple(f"hist/{name}/{i}" for i in range(fine + 2))


class DeviceHistogram:
    """Counts over one fixed grid, on one device; ``add`` queues kernels and never syncs."""

    def __init__(self, name: str, lo: float, hi: float, fine: int, device: torch.device) -> None:
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"histogram {name!r}: need finite lo < hi, got {lo!r}, {hi!r}")
        if isinstance(fine, bool) or not isinstance(fine, int) or fine < 1:
            raise ValueError(f"histogram {name!r}: fine must be a positive integer, got {fine!r}")
        self.name, self.lo, self.hi, self.fine = name, float(lo), float(hi), fine
        self.keys = hist_keys(name, fine)
        edges = torch.from_numpy(np.linspace(self.lo, self.hi, fine + 1))
        if device.type == "cuda":
            edges = edges.pin_memory()
        self.edges = edges.to(device, non_blocking=True)
        # fine + 2 bins and one discard slot for NaN.
        self.counts = torch.zeros(fine + 3, dtype=torch.int64, device=device)
        self.device = device

    def grid(self) -> tuple[float, float, int]:
        return self.lo, self.hi, self.fine

    @torch.no_grad()
    def add(self, values: torch.Tensor) -> None:
        v = values.detach().reshape(-1).to(self.device, torch.float64)
        idx = torch.bucketize(v, self.edges, right=True)
        idx = torch.where(torch.isnan(v), self.fine + 2, idx)
        self.counts.index_add_(0, idx, torch.ones_like(idx))

    def take(self) -> torch.Tensor:
        """The counts so far (a copy, ``fine + 2`` entries) and zero them; both device ops."""
        out = self.counts[: self.fine + 2].clone()
        self.counts.zero_()
        return out


class Sampler:
    """Random positions on the device from a generator of the hook's own."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(0xD21F7)

    def positions(self, high: int, k: int) -> torch.Tensor:
        return torch.randint(0, high, (k,), generator=self.generator, device=self.device)


def signed_log(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(torch.abs(x))


def activation_sample(output: Any, sampler: Sampler) -> torch.Tensor | None:
    """``ACTIVATION_SAMPLES`` elements of a layer's output (its first tensor), signed-log'd."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor) or not output.is_floating_point() or output.numel() == 0:
        return None
    out = output.detach()
    picked = out.take(sampler.positions(out.numel(), ACTIVATION_SAMPLES).to(out.device))
    return signed_log(picked.float())


def logits_of(output: Any) -> torch.Tensor | None:
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if isinstance(logits, torch.Tensor) and logits.is_floating_point() and logits.dim() >= 2 \
            and logits.numel() > 0 and logits.shape[-1] >= 2:
        return logits
    return None


def entropy_sample(logits: torch.Tensor, sampler: Sampler) -> torch.Tensor:
    """Entropy in nats of softmax(logits) at sampled positions (rows of the last dim)."""
    vocab = logits.shape[-1]
    rows = logits.detach().reshape(-1, vocab)
    k = max(1, min(ENTROPY_POSITIONS, ENTROPY_MAX_ELEMENTS // vocab))
    picked = rows.index_select(0, sampler.positions(rows.shape[0], k).to(rows.device)).float()
    logp = torch.log_softmax(picked, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def _kind(x: Any) -> str:
    return str(tuple(x.shape)) + " " + str(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__


def check_token_loss(values: Any, labels: Any, shift: bool | None, mask: Any) -> None:
    """Refuse a ``watch.token_loss`` call that cannot be right, naming the argument (host-only
    checks of types and shapes: no sync)."""
    where = "watch.token_loss"
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise ValueError(f"{where}: the first argument must be a float tensor (logits, or per-token "
                         f"losses), got {_kind(values)}")
    if labels is None:
        if shift is not None:
            raise ValueError(f"{where}: shift= applies to logits with labels; per-token losses are "
                             "aligned already")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != values.shape):
            raise ValueError(f"{where}: mask must be a tensor of the losses' shape {tuple(values.shape)}, "
                             f"got {_kind(mask)}")
        return
    if shift is None:
        raise ValueError(f"{where}: with labels, say how they align with the logits: shift=True when "
                         "position t predicts label t+1 (causal LMs that shift inside their loss, as "
                         "Hugging Face's *ForCausalLM do), shift=False when labels are already aligned")
    if mask is not None:
        raise ValueError(f"{where}: mask= is for per-token losses; with labels, ignore_index marks what "
                         "to skip")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{where}: labels must be an integer tensor, got {_kind(labels)}")
    if values.dim() < 2 or tuple(labels.shape) != tuple(values.shape[:-1]):
        raise ValueError(f"{where}: labels of shape {tuple(labels.shape)} do not match logits of shape "
                         f"{tuple(values.shape)} (labels must be the logits' shape without the vocabulary)")
    if shift and values.shape[-2] < 2:
        raise ValueError(f"{where}: shift=True needs sequences of at least 2 positions, got logits "
                         f"{tuple(values.shape)}")


def token_loss_sample(logits: torch.Tensor, labels: torch.Tensor, sampler: Sampler, *, shift: bool,
                      ignore_index: int) -> torch.Tensor:
    """Cross-entropy in nats of each label at ``ENTROPY_POSITIONS`` sampled positions (fewer for
    very large vocabularies). ``shift``: logits at position t predict label t+1 of the same
    sequence. NaN where the label is ``ignore_index`` or outside the vocabulary, which the
    histogram drops: no boolean indexing, so no sync."""
    vocab, seq = logits.shape[-1], logits.shape[-2]
    rows = logits.detach().reshape(-1, vocab)
    flat = labels.detach().reshape(-1).to(rows.device)
    k = max(1, min(ENTROPY_POSITIONS, ENTROPY_MAX_ELEMENTS // vocab))
    if shift:
        # Positions (sequence b, t < seq - 1): row b * seq + t, label at the next row.
        pos = sampler.positions(rows.shape[0] // seq * (seq - 1), k).to(rows.device)
        row = pos // (seq - 1) * seq + pos % (seq - 1)
        target = flat.index_select(0, row + 1)
    else:
        row = sampler.positions(rows.shape[0], k).to(rows.device)
        target = flat.index_select(0, row)
    logp = torch.log_softmax(rows.index_select(0, row).float(), dim=-1)
    valid = (target >= 0) & (target < vocab) & (target != ignore_index)
    nll = -logp.gather(1, target.clamp(0, vocab - 1).long().unsqueeze(1)).squeeze(1)
    return torch.where(valid, nll, torch.full_like(nll, math.nan))


def loss_values_sample(losses: torch.Tensor, mask: torch.Tensor | None, sampler: Sampler) -> torch.Tensor:
    """``ENTROPY_POSITIONS`` sampled per-token losses (NaN where ``mask`` is False)."""
    flat = losses.detach().reshape(-1)
    pos = sampler.positions(flat.numel(), ENTROPY_POSITIONS).to(flat.device)
    picked = flat.index_select(0, pos).float()
    if mask is not None:
        keep = mask.detach().reshape(-1).to(flat.device).index_select(0, pos).bool()
        picked = torch.where(keep, picked, torch.full_like(picked, math.nan))
    return picked


def per_sample_tokens(args: tuple[Any, ...], kwargs: dict[str, Any], ignore_index: int,
                      pad_id: int | None) -> tuple[torch.Tensor, int] | None:
    """(useful tokens of each sample on the device, sequence length) of one forward's inputs,
    by the same rule as :func:`runwatch.hooks.signals.token_counts`."""
    labels = kwargs.get("labels")
    mask = kwargs.get("attention_mask")
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(labels, torch.Tensor) and not labels.is_floating_point() and labels.dim() >= 2:
        return (labels != ignore_index).flatten(1).sum(1), labels[0].numel()
    if isinstance(mask, torch.Tensor) and mask.dim() >= 2:
        return mask.flatten(1).sum(1), mask[0].numel()
    if isinstance(ids, torch.Tensor) and pad_id is not None and not ids.is_floating_point() \
            and ids.dim() >= 2:
        return (ids != pad_id).flatten(1).sum(1), ids[0].numel()
    return None
