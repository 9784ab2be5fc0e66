"""How each training-health signal is computed on the device, in as few kernels as possible.

Nothing here reads a tensor back to the host; shapes and counts that Python already knows
(``numel``, batch size) are used as plain numbers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

# Parameter names that are not inside a repeated block, by role.
_EMBEDDING = re.compile(r"(^|\.)(embed|embedding|embeddings|wte|wpe|tok_embeddings|pos|position)")
_HEAD = re.compile(r"(^|\.)(lm_head|head|output|classifier|score)(\.|$)")
_BLOCK_LISTS = ("blocks", "layers", "h", "layer", "block", "decoder_layers", "encoder_layers")


def repeated_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Children of every ``nn.ModuleList`` whose members share one class: transformer blocks."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) >= 2 and \
                len({type(m) for m in module}) == 1:
            found.extend((f"{name}.{i}" if name else str(i), m) for i, m in enumerate(module))
    return found


def group_of(param_name: str, blocks: Sequence[str]) -> str:
    """The layer group of a parameter: its block, 'embeddings', 'head' or 'other'."""
    for block in blocks:
        if param_name.startswith(block + "."):
            return block
    if _EMBEDDING.search(param_name):
        return "embeddings"
    if _HEAD.search(param_name):
        return "head"
    return "other"


class GradNorms:
    """Total and per-group gradient norms from one ``_foreach_norm`` over all gradients.

    The group of each parameter is fixed at construction; the per-step cost is one fused
    norm kernel per (device, dtype), one stack, one ``index_add_`` and a square root.
    Index tensors are built once per distinct set of present gradients and cached: building
    one from a Python list is a host-to-device copy.
    """

    def __init__(self, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer,
                 device: torch.device) -> None:
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        blocks = [name for name, _ in repeated_blocks(model)] if model is not None else []
        groups = [group_of(names.get(id(p), ""), blocks) for p in self.params]
        order = list(dict.fromkeys(groups))
        self.group_names = tuple(order)
        self._group_of = [order.index(g) for g in groups]
        self.device = device
        self._index: dict[tuple[int, ...], torch.Tensor] = {}

    def _index_tensor(self, values: Sequence[int]) -> torch.Tensor:
        key = tuple(values)
        t = self._index.get(key)
        if t is None:
            if len(self._index) >= 64:  # sets of present gradients that keep changing (MoE)
                self._index.clear()
            # From pinned memory with non_blocking: no host sync even the first time.
            host = torch.tensor(key, dtype=torch.int64)
            if self.device.type == "cuda":
                host = host.pin_memory()
            t = self._index[key] = host.to(self.device, non_blocking=True)
        return t

    def norms(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-tensor L2 norms in float32, on ``self.device``."""
        by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(grads):
            by_kind.setdefault((t.device, t.dtype), []).append(i)
        if len(by_kind) == 1:
            return torch.stack(torch._foreach_norm(list(grads), 2, dtype=torch.float32)).to(self.device)
        out = torch.empty(len(grads), device=self.device, dtype=torch.float32)
        for idx in by_kind.values():
            norms = torch._foreach_norm([grads[i] for i in idx], 2, dtype=torch.float32)
            out.index_copy_(0, self._index_tensor(idx), torch.stack(norms).to(self.device))
        return out

    def compute(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(total norm, per-group norms) of the current gradients, or None if there are none."""
        present = [i for i, p in enumerate(self.params) if p.grad is not None and not p.grad.is_sparse]
        if not present:
            return None
        squares = self.norms([_local(self.params[i].grad) for i in present]).square()  # type: ignore[arg-type]
        group_index = self._index_tensor([self._group_of[i] for i in present])
        per_group = torch.zeros(len(self.group_names), device=self.device, dtype=torch.float32)
        per_group.index_add_(0, group_index, squares)
        return squares.sum().sqrt(), per_group.sqrt()


def _local(grad: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (DTensor, e.g. FSDP2) gradient; any other as it is.

    Under FSDP2 the gradient norm is therefore the norm of this rank's shard, as under DDP it is
    the rank's local gradient before the all-reduce: the global norm would need a collective
    every step, which the hook never adds. A spike of the global norm shows in the shards.
    """
    to_local = getattr(grad, "to_local", None)
    return to_local() if to_local is not None else grad


def activation_norm(output: Any) -> tuple[torch.Tensor, int] | None:
    """L2 norm of a layer's output (the first tensor of a tuple) and its element count.

    RMS is sqrt(sum of norm² / sum of counts) over a step's micro-batches; the division is
    left to the host, after the read-back, so this is one kernel.
    """
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor) or not output.is_floating_point() or output.numel() == 0:
        return None
    return torch.linalg.vector_norm(output.detach(), dtype=torch.float32), output.numel()


def token_counts(args: tuple[Any, ...], kwargs: dict[str, Any], ignore_index: int,
                 pad_id: int | None) -> tuple[torch.Tensor, int, int] | None:
    """(useful tokens on the device, total tokens, samples) of one forward's inputs.

    Useful tokens come from ``labels != ignore_index`` when labels are given, else from
    ``attention_mask``, else from ``input_ids != pad_id`` when a pad id is configured.
    """
    labels = kwargs.get("labels")
    mask = kwargs.get("attention_mask")
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(labels, torch.Tensor) and not labels.is_floating_point():
        return (labels != ignore_index).sum(), labels.numel(), labels.shape[0]
    if isinstance(mask, torch.Tensor):
        return mask.sum(), mask.numel(), mask.shape[0]
    if isinstance(ids, torch.Tensor) and pad_id is not None and not ids.is_floating_point():
        return (ids != pad_id).sum(), ids.numel(), ids.shape[0]
    return None


class Fingerprint:
    """A cheap, deterministic hash of a batch's token ids, computed on the device (< 2**31)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._weights = torch.empty(0, dtype=torch.int64, device=device)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.detach().reshape(-1).to(torch.int64)
        n = flat.numel()
        if self._weights.numel() < n:
            # Generated on the device (no host copy); the same weights on every rank and run.
            g = torch.Generator(device=self.device).manual_seed(0x5EED)
            self._weights = torch.randint(1, 2**31 - 1, (max(n, 1024),), generator=g, device=self.device)
        return (flat * self._weights[:n]).sum().remainder(2**31 - 1)
