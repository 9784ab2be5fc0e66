"""Save and load runwatch checkpoints; load Hugging Face Trainer and Lightning ones too.

    from runwatch.hooks.checkpoint import save, restore_latest_clean
    save("ckpts", step, model=model, optimizer=opt, scheduler=sched, data_position={"shard": 3})
    restored = restore_latest_clean("ckpts", model=model, optimizer=opt, scheduler=sched)

A save is atomic: everything is written and fsynced in ``.tmp-step-<N>-<pid>/``, the ``COMPLETE``
marker last, then the folder is renamed to ``step-<N>/``. A crash at any point leaves either no
``step-<N>`` or a whole one. Call :func:`save` from one process (rank 0 under DDP): the RNG
states it records are that process's.

A sharded model (its parameters are DTensors: FSDP2 ``fully_shard``, tensor parallel) is saved
and loaded through ``torch.distributed.checkpoint`` instead, and then :func:`save`,
:func:`load` and :func:`restore_latest_clean` are collective: every rank calls them, in the
same order. Each rank writes its own shards and its RNG states (``rng-rank<R>.pt``) into one
``.tmp-step-<N>-<pid of rank 0>/`` in a folder every rank shares; rank 0 writes ``state.pt``
(step, scheduler, data position, extra), the manifest (with every rank's files) and the
marker, then renames. The ranks agree on every outcome, so they all return the same
checkpoint or all raise the same error; none is left waiting in a collective.

Loading never unpickles Python objects: every file goes through ``torch.load(weights_only=True)``
(or safetensors), so a checkpoint from an untrusted place cannot run code. DCP's own reader
would unpickle ``.metadata`` and its non-tensor values freely; runwatch reads ``.metadata``
with an unpickler that builds only DCP's metadata records, and the values with
``weights_only=True``. Before anything is
changed, the checkpoint is verified (:func:`runwatch.daemon.checkpoints.verify`) and its model
keys and shapes and optimizer groups are checked against the objects given, so a refused load
leaves the model, optimizer, scheduler and RNGs as they were.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from runwatch.daemon.checkpoints import (
    DCP,
    DCP_LAYOUT,
    DCP_METADATA,
    HF_TRAINER_STATE,
    HF_WEIGHT_INDEXES,
    HUGGINGFACE,
    LIGHTNING,
    MANIFEST,
    MARKER,
    RUNWATCH,
    STATE,
    Checkpoint,
    CheckpointError,
    file_sha256,
    folder_name,
    identify,
    inside,
    latest_clean,
    manifest_layout,
    verify,
)

__all__ = ["Checkpoint", "CheckpointError", "Restored", "is_sharded", "load", "restore_latest_clean", "save",
           "sharded_load_refused"]

log = logging.getLogger("runwatch.hooks")

PathLike = str | os.PathLike[str]
MANIFEST_FORMAT = 1


@dataclass
class Restored:
    """What :func:`load` restored: from which checkpoint, the training step it was saved at,
    and the ``data_position`` / ``extra`` dicts given to :func:`save` (for Hugging Face and
    Lightning checkpoints ``data_position`` holds the ``epoch`` when they record one)."""

    checkpoint: Checkpoint
    step: int
    data_position: dict[str, Any]
    extra: dict[str, Any]


# ---------------------------------------------------------------------------------------- save


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``):
    those wrappers prefix every state_dict key, so saving through them would tie the checkpoint
    to the wrapping."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _check_plain(value: Any, where: str) -> None:
    """Refuse at save time what ``torch.load(weights_only=True)`` would refuse at load time:
    a checkpoint that cannot be loaded is worse than an error now."""
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            _check_plain(key, f"{where} key")
            _check_plain(item, f"{where}[{key!r}]")
    elif type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, str | int | float | bool | type(None) | torch.Tensor):
        raise CheckpointError(
            f"{where} is a {type(value).__qualname__}; a checkpoint holds only dicts, "
            "lists, tuples, str, int, float, bool, None and tensors (nothing pickled)"
        )


def _rng_state() -> dict[str, Any]:
    # Python's and numpy's states are tuples holding a large int tuple / a uint32 array; as
    # int64 tensors they load under weights_only=True without allow-listing numpy globals.
    version, internal, gauss_next = random.getstate()
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "bit_generator": str(bit_generator),
            "state": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
    }


class _HashingWriter:
    """A file that hashes what passes through it, so state.pt is not read back to hash it."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    folder: PathLike,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    data_position: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    process_group: Any = None,
) -> Checkpoint:
    """Save ``folder/step-<N>/`` atomically and return it.

    Holds the model (unwrapped from DDP / torch.compile), optimizer and scheduler state, the
    torch, CUDA, Python and numpy RNG states, ``step``, and ``data_position`` / ``extra`` (plain
    dicts of str, numbers, lists and tensors). Refuses with CheckpointError when ``step-<N>``
    exists already: a checkpoint is never overwritten. On failure nothing is left behind.

    A sharded model (:func:`is_sharded`) is saved through torch.distributed.checkpoint by every
    rank of ``process_group`` (default: the default group), which must all call this with the
    same ``folder`` (shared by all) and ``step``; each returns the checkpoint or raises the same
    CheckpointError.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, not {step!r}")
    folder = Path(folder)
    if is_sharded(model):
        return _save_sharded(folder, step, model=model, optimizer=optimizer, scheduler=scheduler,
                             data_position=dict(data_position or {}), extra=dict(extra or {}),
                             process_group=process_group)
    final = folder / folder_name(step)
    if os.path.lexists(final):
        raise CheckpointError(f"{final}: already exists; runwatch never overwrites a checkpoint")
    _check_plain(data_position or {}, "data_position")
    _check_plain(extra or {}, "extra")
    state = {
        "model": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": _rng_state(),
        "step": step,
        "data_position": dict(data_position or {}),
        "extra": dict(extra or {}),
    }

    tmp = folder / f".tmp-{folder_name(step)}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # only this process writes this name
        tmp.mkdir()
        with open(tmp / STATE, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(state, writer)
            f.flush()
            os.fsync(f.fileno())
        manifest = {
            "files": {STATE: {"size": writer.size, "sha256": writer.digest.hexdigest()}},
            "step": step,
            "format": MANIFEST_FORMAT,
        }
        manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"
        _write_synced(tmp / MANIFEST, manifest_bytes)
        saved_at = time.time()
        marker = {
            "step": step,
            "saved_at": saved_at,
            "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        }
        _write_synced(tmp / MARKER, json.dumps(marker, sort_keys=True).encode() + b"\n")
        _fsync_dir(tmp)
        # os.rename silently replaces an empty folder: check again right before it.
        if os.path.lexists(final):
            raise CheckpointError(f"{final}: already exists; runwatch never overwrites a checkpoint")
        os.rename(tmp, final)
        _fsync_dir(folder)  # the rename itself must survive a power cut
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and not isinstance(exc, CheckpointError):
            raise CheckpointError(f"{final}: save failed ({type(exc).__name__}: {exc})") from exc
        raise
    size = writer.size + len(manifest_bytes) + (final / MARKER).stat().st_size
    return Checkpoint(final, step, RUNWATCH, True, size, saved_at)


# ---------------------------------------------------------------------------------------- load


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _torch_load(path: Path, map_location: Any, *, safe_globals: list[Any] | None = None) -> Any:
    """``torch.load(weights_only=True)``; a file that needs unpickling is refused, never retried
    with weights_only=False (that would run whatever code the file carries)."""
    try:
        if safe_globals:
            with torch.serialization.safe_globals(safe_globals):
                return torch.load(path, map_location=map_location, weights_only=True)
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _UNSUPPORTED_GLOBAL.search(str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: contains pickled Python objects{what}; runwatch loads checkpoints "
            "with weights_only=True and will not unpickle them"
        ) from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: torch.load failed ({type(exc).__name__}: {exc})") from None


def _numpy_globals() -> list[Any]:
    """What unpickling a numpy array needs (Hugging Face's rng_state.pth holds one); the same
    allow-list transformers uses. These reconstruct arrays only and run no other code."""
    core = np._core if hasattr(np, "_core") else np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _describe_keys(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _check_model(model: torch.nn.Module, state_dict: Any, where: Path, *, tied_may_be_absent: bool) -> None:
    """Refuse before loading anything when keys or shapes differ. ``tied_may_be_absent``:
    safetensors files store a tied weight once (lm_head tied to the embedding), so a missing key
    whose parameter shares memory with a key that is present is fine."""
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{where}: the model state is a {type(state_dict).__name__}, not a dict")
    own = _unwrap(model).state_dict()
    missing = [k for k in own if k not in state_dict]
    if tied_may_be_absent and missing:
        present = {own[k].data_ptr() for k in own if k in state_dict and isinstance(own[k], torch.Tensor)}
        missing = [
            k for k in missing if not (isinstance(own[k], torch.Tensor) and own[k].data_ptr() in present)
        ]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        parts = [
            f"missing {_describe_keys(missing)}" if missing else "",
            f"unexpected {_describe_keys(unexpected)}" if unexpected else "",
        ]
        raise CheckpointError(f"{where}: does not fit this model: " + "; ".join(p for p in parts if p))
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)} here"
        for k, v in state_dict.items()
        if isinstance(v, torch.Tensor) and isinstance(own[k], torch.Tensor) and v.shape != own[k].shape
    ]
    if wrong:
        raise CheckpointError(f"{where}: shapes differ from this model: {_describe_keys(wrong)}")


def _check_optimizer(optimizer: torch.optim.Optimizer, state: Any, where: Path) -> None:
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or "state" not in state:
        raise CheckpointError(f"{where}: the optimizer state is not an optimizer state_dict")
    saved = [len(g.get("params", [])) for g in groups]
    here = [len(g["params"]) for g in optimizer.param_groups]
    if saved != here:
        raise CheckpointError(
            f"{where}: optimizer parameter groups hold {saved} parameters, this optimizer's hold {here}"
        )


def _set_cuda_rng(states: list[torch.Tensor]) -> None:
    if not states:
        return
    if not torch.cuda.is_available():
        log.warning("runwatch: the checkpoint has CUDA RNG states but CUDA is not available; not restored")
        return
    count = torch.cuda.device_count()
    if len(states) != count:
        log.warning(
            "runwatch: the checkpoint has CUDA RNG states for %d devices, this process sees %d; "
            "restoring the first %d",
            len(states),
            count,
            min(len(states), count),
        )
    for device, rng in enumerate(states[:count]):
        torch.cuda.set_rng_state(rng.cpu(), device)


def _set_rng(rng: dict[str, Any]) -> None:
    # map_location may have moved the byte tensors to a GPU; the setters want CPU ones.
    torch.set_rng_state(rng["torch"].cpu())
    _set_cuda_rng(list(rng.get("cuda") or []))
    py = rng["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    npy = rng["numpy"]
    np.random.set_state(
        (
            npy["bit_generator"],
            npy["state"].cpu().numpy().astype(np.uint32),
            int(npy["pos"]),
            int(npy["has_gauss"]),
            float(npy["cached_gaussian"]),
        )
    )


@dataclass
class _Plan:
    """Everything read and checked, nothing applied yet."""

    step: int
    model_state: dict[str, Any]
    optimizer_state: dict[str, Any] | None
    scheduler_state: dict[str, Any] | None
    apply_rng: Callable[[], None] | None
    data_position: dict[str, Any]
    extra: dict[str, Any]
    tied_may_be_absent: bool = False


def _plan_runwatch(
    ckpt: Checkpoint, *, optimizer: Any, scheduler: Any, restore_rng: bool, map_location: Any
) -> _Plan:
    state = _torch_load(ckpt.path / STATE, map_location)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{ckpt.path / STATE}: not a runwatch state (no model)")
    if state.get("step") != ckpt.step:
        raise CheckpointError(f"{ckpt.path / STATE}: says step {state.get('step')!r}, the folder {ckpt.step}")
    if scheduler is not None and state.get("scheduler") is None:
        log.warning("runwatch: %s was saved without a scheduler; the scheduler is left as it is", ckpt.path)
    rng = state.get("rng")
    return _Plan(
        step=ckpt.step,
        model_state=state["model"],
        optimizer_state=state.get("optimizer") if optimizer is not None else None,
        scheduler_state=state.get("scheduler") if scheduler is not None else None,
        apply_rng=(lambda: _set_rng(rng)) if restore_rng and rng else None,
        data_position=dict(state.get("data_position") or {}),
        extra=dict(state.get("extra") or {}),
    )


def _load_safetensors(path: Path, map_location: Any) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            f"{path}: reading .safetensors needs the safetensors package "
            "(it comes with transformers): pip install safetensors"
        ) from None
    device = str(map_location) if isinstance(map_location, str | torch.device) else "cpu"
    try:
        return load_file(path, device=device)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None


def _hf_weights(path: Path, map_location: Any) -> dict[str, Any]:
    def read(file: Path) -> dict[str, Any]:
        if file.name.endswith(".safetensors"):
            return _load_safetensors(file, map_location)
        return _torch_load(file, map_location)

    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return read(path / name)
    for index in HF_WEIGHT_INDEXES:
        if (path / index).is_file():
            weight_map = json.loads((path / index).read_text())["weight_map"]
            merged: dict[str, Any] = {}
            for shard in sorted(set(weight_map.values())):
                merged.update(read(path / shard))  # verify() checked each shard lies inside
            return merged
    raise CheckpointError(f"{path}: no weights file")


def _hf_rng(path: Path) -> Callable[[], None] | None:
    # Trainer writes one file per process when distributed, named by the process's rank.
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    file = path / (f"rng_state_{dist.get_rank()}.pth" if distributed else "rng_state.pth")
    if not file.is_file():
        log.info("runwatch: %s has no %s; RNG states not restored", path, file.name)
        return None
    rng = _torch_load(file, "cpu", safe_globals=_numpy_globals())

    def apply() -> None:
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["cpu"])
        cuda = rng.get("cuda")
        _set_cuda_rng([] if cuda is None else [cuda] if isinstance(cuda, torch.Tensor) else list(cuda))

    return apply


def _plan_huggingface(
    ckpt: Checkpoint, *, optimizer: Any, scheduler: Any, restore_rng: bool, map_location: Any
) -> _Plan:
    path = ckpt.path
    trainer_state = json.loads((path / HF_TRAINER_STATE).read_text())
    optimizer_state = scheduler_state = None
    if optimizer is not None:
        if not (path / "optimizer.pt").is_file():
            raise CheckpointError(
                f"{path}: no optimizer.pt (saved with save_only_model?); "
                "load with optimizer=None to restore the weights only"
            )
        optimizer_state = _torch_load(path / "optimizer.pt", map_location)
    if scheduler is not None:
        if (path / "scheduler.pt").is_file():
            scheduler_state = _torch_load(path / "scheduler.pt", map_location)
        else:
            log.warning("runwatch: %s has no scheduler.pt; the scheduler is left as it is", path)
    epoch = trainer_state.get("epoch")
    return _Plan(
        step=int(trainer_state.get("global_step", ckpt.step)),
        model_state=_hf_weights(path, map_location),
        optimizer_state=optimizer_state,
        scheduler_state=scheduler_state,
        apply_rng=_hf_rng(path) if restore_rng else None,
        data_position={"epoch": epoch} if epoch is not None else {},
        extra=_runwatch_record(path / "runwatch.json"),
        tied_may_be_absent=True,
    )


def _runwatch_record(path: Path) -> dict[str, Any]:
    """The runwatch callback's note in a framework checkpoint (the LR scale in force when it was
    saved), so a rewind after a restart does not scale already-scaled rates again."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _plan_lightning(
    ckpt: Checkpoint, *, optimizer: Any, scheduler: Any, restore_rng: bool, map_location: Any
) -> _Plan:
    state = _torch_load(ckpt.path, map_location)
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CheckpointError(f"{ckpt.path}: no state_dict (not a Lightning checkpoint?)")
    optimizer_state = scheduler_state = None
    if optimizer is not None:
        states = state.get("optimizer_states") or []
        if not states:
            raise CheckpointError(
                f"{ckpt.path}: no optimizer state (saved with save_weights_only?); "
                "load with optimizer=None to restore the weights only"
            )
        optimizer_state = states[0]
    if scheduler is not None:
        schedulers = state.get("lr_schedulers") or []
        if schedulers:
            scheduler_state = schedulers[0]
        else:
            log.warning("runwatch: %s has no scheduler state; the scheduler is left as it is", ckpt.path)
    # Lightning does not save RNG states; seed_everything(workers=True) is its way to reproduce.
    epoch = state.get("epoch")
    return _Plan(
        step=int(state.get("global_step", ckpt.step)),
        model_state=state["state_dict"],
        optimizer_state=optimizer_state,
        scheduler_state=scheduler_state,
        apply_rng=None,
        data_position={"epoch": epoch} if epoch is not None else {},
        # What the runwatch callback added (the LR scale in force at the save), if it did.
        extra=dict(state["runwatch"]) if isinstance(state.get("runwatch"), dict) else {},
    )


_PLANNERS = {RUNWATCH: _plan_runwatch, HUGGINGFACE: _plan_huggingface, LIGHTNING: _plan_lightning}


def _checkpoint_at(path: PathLike | Checkpoint) -> Checkpoint:
    if isinstance(path, Checkpoint):
        return path
    try:
        ckpt = identify(Path(path))
    except OSError as exc:
        raise CheckpointError(f"{path}: {exc.strerror or exc}") from None
    if ckpt is None:
        raise CheckpointError(
            f"{path}: not a checkpoint runwatch recognises (a runwatch step-<N>/ folder, "
            "a Hugging Face checkpoint-<N>/ folder or a Lightning .ckpt file)"
        )
    return ckpt


def load(
    path: PathLike | Checkpoint,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
    map_location: Any = None,
    process_group: Any = None,
) -> Restored:
    """Restore ``model`` (and ``optimizer``, ``scheduler``, the RNGs when given / asked) from the
    checkpoint at ``path``: a runwatch ``step-<N>/``, a Hugging Face ``checkpoint-<N>/`` or a
    Lightning ``.ckpt``.

    Verifies the checkpoint first and checks that it fits the objects given before changing any
    of them. Raises CheckpointError, naming the path and the reason, for any failure, including
    a file that holds pickled objects (refused, never unpickled) and DCP folders runwatch did not
    write (restore those with ``torch.distributed.checkpoint.load`` under the layout that saved
    them).

    A sharded model loads only runwatch's sharded checkpoints, on every rank of
    ``process_group`` at once (collective: each rank reads its own shards; the ranks agree on
    the checkpoint first, so all load it or all raise the same error). A model that is not
    sharded loads one in this process alone, whole tensors gathered from the shards.
    ``map_location`` does not apply to sharded checkpoints: tensors land where the model's are.
    """
    if is_sharded(model):
        return _load_dcp(path, model=model, optimizer=optimizer, scheduler=scheduler,
                         restore_rng=restore_rng, process_group=process_group)
    ckpt = _checkpoint_at(path)
    if ckpt.format == DCP:
        raise CheckpointError(
            f"{ckpt.path}: a torch.distributed.checkpoint folder; restore it with "
            "torch.distributed.checkpoint.load under the parallel layout that saved it"
        )
    verify(ckpt)
    if manifest_layout(ckpt) == DCP_LAYOUT:
        return _load_dcp(ckpt, model=model, optimizer=optimizer, scheduler=scheduler,
                         restore_rng=restore_rng, process_group=process_group)
    try:
        plan = _PLANNERS[ckpt.format](
            ckpt, optimizer=optimizer, scheduler=scheduler, restore_rng=restore_rng, map_location=map_location
        )
        _check_model(model, plan.model_state, ckpt.path, tied_may_be_absent=plan.tied_may_be_absent)
        if plan.optimizer_state is not None:
            _check_optimizer(optimizer, plan.optimizer_state, ckpt.path)  # type: ignore[arg-type]
        _unwrap(model).load_state_dict(plan.model_state, strict=not plan.tied_may_be_absent)
        if plan.optimizer_state is not None:
            optimizer.load_state_dict(plan.optimizer_state)  # type: ignore[union-attr]
        if plan.scheduler_state is not None:
            scheduler.load_state_dict(plan.scheduler_state)
        if plan.apply_rng is not None:
            plan.apply_rng()
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{ckpt.path}: cannot load ({type(exc).__name__}: {exc})") from exc
    return Restored(ckpt, plan.step, plan.data_position, plan.extra)


def restore_latest_clean(folder: PathLike, *, before_step: int | None = None, **load_kwargs: Any) -> Restored:
    """Load the newest checkpoint in ``folder`` (before ``before_step`` when given) that passes
    verification and loads; ``load_kwargs`` go to :func:`load` (``model=`` at least).

    Each checkpoint refused on the way is logged on ``runwatch.hooks`` with its reason, then
    the one restored. Raises CheckpointError when none is left. For a sharded model it is
    collective like :func:`load`: the ranks try the same checkpoints in step, and all stop when
    any rank has none left.
    """
    folder = Path(folder)
    passed_over: list[Path] = []
    refused_names: list[str] = []
    sharded = is_sharded(load_kwargs.get("model"))
    while True:
        ckpt, refused = latest_clean(folder, before_step=before_step, exclude=passed_over)
        for bad, reason in refused:
            log.warning("runwatch: checkpoint %s refused: %s", bad.path.name, reason)
            passed_over.append(bad.path)
            refused_names.append(bad.path.name)
        where = f" before step {before_step}" if before_step is not None else ""
        tried = f" (refused: {', '.join(refused_names)})" if refused_names else ""
        if ckpt is None:
            if sharded and torch.distributed.is_initialized():
                # The others may still have one to try: tell them to stop rather than leave them waiting.
                with contextlib.suppress(CheckpointError):
                    _agree_to_load(None, f"{folder}: no clean checkpoint{where}",
                                   load_kwargs.get("process_group"), none_left=True)
            raise CheckpointError(f"{folder}: no clean checkpoint{where}{tried}")
        try:
            restored = load(ckpt, **load_kwargs)
        except _NoneLeft:
            raise CheckpointError(f"{folder}: no clean checkpoint{where} on every rank{tried}") from None
        except CheckpointError as exc:
            # It passed verify() but does not load here (pickled objects, another model): go on
            # to an older one as with any refused checkpoint.
            log.warning("runwatch: checkpoint %s refused: %s", ckpt.path.name, exc)
            passed_over.append(ckpt.path)
            refused_names.append(ckpt.path.name)
            continue
        if refused_names:
            log.warning(
                "runwatch: restored checkpoint %s (step %d) instead of %s",
                ckpt.path.name,
                restored.step,
                refused_names[0],
            )
        else:
            log.info("runwatch: restored checkpoint %s (step %d)", ckpt.path.name, restored.step)
        return restored


# ------------------------------------------------------------- sharded (torch.distributed.checkpoint)

RNG_FILE = "rng-rank{rank:05d}.pt"
_DCP_SHARD = re.compile(r"__(\d+)_\d+\.distcp")
_RNG_NAME = re.compile(r"rng-rank(\d+)\.pt")


def is_sharded(model: torch.nn.Module | None) -> bool:
    """Whether ``model`` has DTensor parameters (FSDP2 ``fully_shard``, tensor parallel): then
    :func:`save` and :func:`load` go through torch.distributed.checkpoint and are collective.
    Walks the parameters: call it at a save or load, not every step."""
    if model is None or not torch.distributed.is_available():
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor cannot have sharded a model this way
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def _group_rank_size(group: Any) -> tuple[int, int]:
    dist = torch.distributed
    return dist.get_rank(group), dist.get_world_size(group)


def _all_gather(value: Any, group: Any) -> list[Any]:
    """Every rank's ``value``. all_gather_object pickles, but only between this job's own ranks
    (as the control group's agreement does); nothing read from a checkpoint goes through it."""
    out: list[Any] = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(out, value, group=group)
    return out


def _combined(errors: list[str | None]) -> str | None:
    """One message for what the ranks reported: the error itself when every failing rank saw the
    same (a torn checkpoint on a shared folder), else each rank's."""
    failed = {r: e for r, e in enumerate(errors) if e is not None}
    if not failed:
        return None
    distinct = set(failed.values())
    if len(distinct) == 1:
        return distinct.pop()
    return "; ".join(f"rank {r}: {e}" for r, e in failed.items())


def _hash_files(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    entries = {}
    for name in names:
        entries[name] = {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
    return entries


def _save_synced(path: Path, value: Any) -> dict[str, Any]:
    """``torch.save`` into ``path``, fsynced; its manifest entry (hashed on the way out)."""
    with open(path, "wb") as f:
        writer = _HashingWriter(f)
        torch.save(value, writer)
        f.flush()
        os.fsync(f.fileno())
    return {"size": writer.size, "sha256": writer.digest.hexdigest()}


def _save_sharded(
    folder: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data_position: dict[str, Any],
    extra: dict[str, Any],
    process_group: Any,
) -> Checkpoint:
    """:func:`save` for a sharded model; collective (see the module's docstring)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, world = _group_rank_size(process_group)
    final = folder / folder_name(step)
    tmp: Path | None = None
    error: str | None = None
    state: dict[str, Any] = {}
    rng: dict[str, Any] = {}
    tmp_name: str | None = None
    try:
        _check_plain(data_position, "data_position")
        _check_plain(extra, "extra")
        if rank == 0:
            if os.path.lexists(final):
                raise CheckpointError(f"{final}: already exists; runwatch never overwrites a checkpoint")
            # One folder for all ranks, named by rank 0: its pid is as unique there as in save().
            tmp = folder / f".tmp-{folder_name(step)}-{os.getpid()}"
            folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            tmp_name = tmp.name
        rng = _rng_state()
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
    except CheckpointError as exc:
        error = str(exc)
    except Exception as exc:
        error = f"{final}: save failed ({type(exc).__name__}: {exc})"

    def fail(message: str) -> CheckpointError:
        if rank == 0 and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        return CheckpointError(message)

    # Agreement 1: every rank is ready, and all know the folder. A rank that failed alone must
    # not leave the others inside dcp.save waiting for it.
    answers = _all_gather((tmp_name, error), process_group)
    if (message := _combined([e for _, e in answers])) is not None:
        raise fail(message)
    tmp = folder / str(answers[0][0])

    # DCP gathers every rank's write results and raises on all of them if one failed; it writes
    # .metadata last, on rank 0, after every shard is on disk (and fsynced: sync_files).
    try:
        writer = dcp.FileSystemWriter(tmp, sync_files=True)
        dcp.save(state, storage_writer=writer, process_group=process_group)
    except Exception as exc:
        raise fail(f"{final}: save failed ({type(exc).__name__}: {exc})") from exc
    del state

    # Each rank hashes what it wrote (its shards are in the page cache still) and its RNG states;
    # rank 0 also the small state and DCP's .metadata.
    entries: dict[str, dict[str, Any]] = {}
    error = None
    try:
        rng_name = RNG_FILE.format(rank=rank)
        entries[rng_name] = _save_synced(tmp / rng_name, rng)
        names = sorted(os.listdir(tmp))
        mine = [n for n in names if (m := _DCP_SHARD.fullmatch(n)) and int(m.group(1)) == rank]
        if rank == 0:
            small = {"layout": DCP_LAYOUT, "world_size": world, "step": step,
                     "scheduler": scheduler.state_dict() if scheduler is not None else None,
                     "data_position": data_position, "extra": extra}
            entries[STATE] = _save_synced(tmp / STATE, small)
            # Anything DCP wrote that no rank's shard pattern claims (.metadata, a newer DCP's
            # extra files) is rank 0's to list; other ranks' RNG files are theirs.
            mine += [n for n in names if not _DCP_SHARD.fullmatch(n) and not _RNG_NAME.fullmatch(n)
                     and n != STATE]
        entries.update(_hash_files(tmp, mine))
    except Exception as exc:
        error = f"{final}: save failed on rank {rank} ({type(exc).__name__}: {exc})"
    # Agreement 2: every rank's files, to rank 0 for the manifest.
    answers = _all_gather((entries, error), process_group)
    if (message := _combined([e for _, e in answers])) is not None:
        raise fail(message)

    outcome: tuple[float, int] | None = None
    error = None
    if rank == 0:
        try:
            files: dict[str, dict[str, Any]] = {}
            for r, (theirs, _) in enumerate(answers):
                for name, entry in theirs.items():
                    try:
                        size = (tmp / name).stat().st_size
                    except FileNotFoundError:
                        size = -1
                    if size != entry["size"]:
                        raise CheckpointError(
                            f"{final}: {name}, written by rank {r}, is not visible from rank 0; "
                            "checkpoint_dir must be a folder every rank shares"
                        )
                    files[name] = entry
            manifest = {"files": files, "step": step, "format": MANIFEST_FORMAT, "layout": DCP_LAYOUT,
                        "world_size": world}
            manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"
            _write_synced(tmp / MANIFEST, manifest_bytes)
            saved_at = time.time()
            marker = {"step": step, "saved_at": saved_at,
                      "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest()}
            _write_synced(tmp / MARKER, json.dumps(marker, sort_keys=True).encode() + b"\n")
            _fsync_dir(tmp)
            if os.path.lexists(final):
                raise CheckpointError(f"{final}: already exists; runwatch never overwrites a checkpoint")
            os.rename(tmp, final)
            _fsync_dir(folder)
            size = sum(e["size"] for e in files.values()) + len(manifest_bytes)
            size += (final / MARKER).stat().st_size
            outcome = (saved_at, size)
        except CheckpointError as exc:
            error = str(exc)
        except Exception as exc:
            error = f"{final}: save failed ({type(exc).__name__}: {exc})"
    # Agreement 3: rank 0 renamed it, or every rank raises its reason.
    answers = _all_gather((outcome, error), process_group)
    if (message := _combined([e for _, e in answers])) is not None:
        raise fail(message)
    saved_at, size = answers[0][0]
    return Checkpoint(final, step, RUNWATCH, True, size, saved_at)


# Exactly the records DCP's FileSystemWriter pickles into .metadata (torch 2.4 .. 2.13); any other
# global, the first step of every pickle exploit, is refused before it is looked up.
_DCP_METADATA_GLOBALS = frozenset(
    [("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata",
        "BytesStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")]
    + [("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       # Returns one of torch's layout objects by name (torch.strided); runs nothing else.
       ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
       ("pathlib._local", "PosixPath"), ("pathlib._local", "PurePosixPath"), ("collections", "OrderedDict")]
)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        # The wording torch.load uses, so _UNSUPPORTED_GLOBAL names the culprit in the error.
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


def _read_dcp_metadata(path: Path) -> Any:
    """DCP's ``.metadata``, unpickled with only DCP's own records allowed, and every file it
    points at checked to lie inside the checkpoint folder."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except pickle.UnpicklingError as exc:
        found = _UNSUPPORTED_GLOBAL.search(str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: holds pickled Python objects{what} that are not DCP metadata; runwatch will not "
            "unpickle them"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"{path}: not DCP metadata ({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(f"{path}: not DCP metadata ({type(metadata).__name__})")
    for info in (metadata.storage_data or {}).values():
        inside(path.parent, Path(str(getattr(info, "relative_path", ""))))
    return metadata


@functools.cache
def _dcp_loaders() -> tuple[type, type]:
    """A FileSystemReader and a DefaultLoadPlanner that never unpickle freely (built on first use:
    importing torch.distributed.checkpoint costs time every training script would pay)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):  # type: ignore[misc]
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            # As FileSystemReader.read_metadata (torch 2.13), with pickle.load replaced.
            rank = kwargs.get("rank")
            name = DCP_METADATA if rank is None else f"__{rank}{DCP_METADATA}"
            metadata = _read_dcp_metadata(Path(self.path) / name)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(DefaultLoadPlanner):  # type: ignore[misc]
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            # DefaultLoadPlanner reads non-tensor values (lr, betas, ...) with weights_only=False.
            # Read them with weights_only=True, then hand them on re-saved: plain values only.
            try:
                plain = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as exc:
                found = _UNSUPPORTED_GLOBAL.search(str(exc))
                raise CheckpointError(
                    f"{read_item.dest_index.fqn}: holds pickled Python objects"
                    f"{f' ({found.group(1)})' if found else ''}; runwatch will not unpickle them"
                ) from None
            again = io.BytesIO()
            torch.save(plain, again)
            again.seek(0)
            super().load_bytes(read_item, again)

    return SafeReader, SafePlanner


class _NoneLeft(CheckpointError):
    """Some rank has no checkpoint left to try: :func:`restore_latest_clean` stops on every rank."""


def _agree_to_load(path: str | None, error: str | None, group: Any, *, none_left: bool = False) -> None:
    """Before a collective load: every rank says which checkpoint it is about to load, or why it
    cannot; all go on only when all can, with the same one; else all raise the same error."""
    answers = _all_gather((path, error, none_left), group)
    if any(left for _, _, left in answers):
        raise _NoneLeft(_combined([e for _, e, _ in answers]) or "no checkpoint left to try")
    if (message := _combined([e for _, e, _ in answers])) is not None:
        raise CheckpointError(message)
    if len({p for p, _, _ in answers}) > 1:
        chosen = ", ".join(f"rank {r}: {p}" for r, (p, _, _) in enumerate(answers))
        raise CheckpointError(f"the ranks chose different checkpoints ({chosen})")


def sharded_load_refused(model: torch.nn.Module | None, reason: str, *, process_group: Any = None) -> None:
    """A rank that cannot even pick a checkpoint for a sharded ``model`` must still answer the
    others, who wait in :func:`load` for every rank to agree: answer with ``reason`` (they then
    refuse too). Does nothing for a model that is not sharded; returns once every rank answered."""
    if not is_sharded(model) or not torch.distributed.is_initialized():
        return
    with contextlib.suppress(CheckpointError):
        _agree_to_load(None, reason, process_group)


def _check_dcp_fits(metadata: Any, model_state: dict[str, Any], optimizer: Any, where: Path) -> None:
    """Refuse before DCP writes anything into the model: keys and (global) shapes of the model
    state, and an optimizer state present when one is asked for."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = metadata.state_dict_metadata
    saved_model = {k[len("model."):]: v for k, v in saved.items() if k.startswith("model.")}
    missing = [k for k in model_state if k not in saved_model]
    unexpected = [k for k in saved_model if k not in model_state]
    if missing or unexpected:
        parts = [
            f"missing {_describe_keys(missing)}" if missing else "",
            f"unexpected {_describe_keys(unexpected)}" if unexpected else "",
        ]
        raise CheckpointError(f"{where}: does not fit this model: " + "; ".join(p for p in parts if p))
    wrong = [
        f"{k} {tuple(saved_model[k].size)} vs {tuple(v.shape)} here"
        for k, v in model_state.items()
        if isinstance(v, torch.Tensor) and isinstance(saved_model[k], TensorStorageMetadata)
        and tuple(saved_model[k].size) != tuple(v.shape)
    ]
    if wrong:
        raise CheckpointError(f"{where}: shapes differ from this model: {_describe_keys(wrong)}")
    if optimizer is not None and not any(k.startswith("optimizer.") for k in saved):
        raise CheckpointError(
            f"{where}: no optimizer state; load with optimizer=None to restore the weights only"
        )


@dataclass
class _DcpPlan:
    """A sharded checkpoint read and checked as far as it can be without loading tensors."""

    ckpt: Checkpoint
    target: dict[str, Any]
    small: dict[str, Any]
    rng: dict[str, Any] | None


def _plan_dcp(
    ckpt: Checkpoint, *, model: torch.nn.Module, optimizer: Any, scheduler: Any, restore_rng: bool,
    rank: int,
) -> _DcpPlan:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    small = _torch_load(ckpt.path / STATE, "cpu")
    if not isinstance(small, dict) or small.get("layout") != DCP_LAYOUT:
        raise CheckpointError(f"{ckpt.path / STATE}: not a runwatch sharded state")
    if small.get("step") != ckpt.step:
        raise CheckpointError(f"{ckpt.path / STATE}: says step {small.get('step')!r}, the folder {ckpt.step}")
    if scheduler is not None and small.get("scheduler") is None:
        log.warning("runwatch: %s was saved without a scheduler; the scheduler is left as it is", ckpt.path)
    rng = None
    if restore_rng:
        file = ckpt.path / RNG_FILE.format(rank=rank)
        if file.is_file():
            rng = _torch_load(file, "cpu")
        else:  # loaded by more ranks than saved it (DCP reshards the tensors; RNGs cannot be)
            log.warning("runwatch: %s has no %s; RNG states not restored", ckpt.path, file.name)
    metadata = _read_dcp_metadata(ckpt.path / DCP_METADATA)
    module = _unwrap(model)
    if optimizer is not None:
        model_state, optimizer_state = get_state_dict(module, optimizer)
        target = {"model": model_state, "optimizer": optimizer_state}
    else:
        target = {"model": get_model_state_dict(module)}
    _check_dcp_fits(metadata, target["model"], optimizer, ckpt.path)
    return _DcpPlan(ckpt, target, small, rng)


def _load_dcp(
    path: PathLike | Checkpoint,
    *,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    restore_rng: bool,
    process_group: Any,
) -> Restored:
    """:func:`load` of a runwatch sharded checkpoint: collective when ``model`` is sharded (every
    rank loads its own shards), else in this process alone (DCP gathers whole tensors)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    dist = torch.distributed
    collective = is_sharded(model) and dist.is_initialized()
    rank = _group_rank_size(process_group)[0] if collective else (
        dist.get_rank() if dist.is_available() and dist.is_initialized() else 0)
    plan: _DcpPlan | None = None
    error: str | None = None
    where = str(path.path if isinstance(path, Checkpoint) else path)
    try:
        ckpt = _checkpoint_at(path)
        where = str(ckpt.path)
        if ckpt.format == DCP:
            raise CheckpointError(
                f"{ckpt.path}: a torch.distributed.checkpoint folder runwatch did not write; restore it "
                "with torch.distributed.checkpoint.load under the parallel layout that saved it"
            )
        verify(ckpt)
        if manifest_layout(ckpt) != DCP_LAYOUT:
            raise CheckpointError(
                f"{ckpt.path}: holds one state.pt, and this model is sharded (DTensor parameters); "
                "runwatch restores a sharded model from the sharded checkpoints watch.checkpoint() "
                "saves for it"
            )
        plan = _plan_dcp(ckpt, model=model, optimizer=optimizer, scheduler=scheduler,
                         restore_rng=restore_rng, rank=rank)
    except CheckpointError as exc:
        error = str(exc)
    except Exception as exc:
        error = f"{where}: cannot load ({type(exc).__name__}: {exc})"
    if collective:
        _agree_to_load(where, error, process_group)
    elif error is not None:
        raise CheckpointError(error)
    assert plan is not None
    SafeReader, SafePlanner = _dcp_loaders()
    try:
        # Collective: DCP gathers every rank's read plan and raises on all of them if one fails.
        dcp.load(plan.target, storage_reader=SafeReader(plan.ckpt.path), planner=SafePlanner(),
                 process_group=process_group, no_dist=not collective)
        module = _unwrap(model)
        if optimizer is not None:
            set_state_dict(module, optimizer, model_state_dict=plan.target["model"],
                           optim_state_dict=plan.target["optimizer"])
        else:
            set_model_state_dict(module, plan.target["model"])
        if scheduler is not None and plan.small.get("scheduler") is not None:
            scheduler.load_state_dict(plan.small["scheduler"])
        if plan.rng is not None:
            _set_rng(plan.rng)
    except Exception as exc:
        raise CheckpointError(f"{plan.ckpt.path}: cannot load ({type(exc).__name__}: {exc})") from exc
    small = plan.small
    return Restored(plan.ckpt, plan.ckpt.step, dict(small.get("data_position") or {}),
                    dict(small.get("extra") or {}))
