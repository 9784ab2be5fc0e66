"""Save and load runwatch checkpoints; load Hugging Face Trainer and Lightning ones too.

    from runwatch.hooks.checkpoint import save, restore_latest_clean
    save("ckpts", step, model=model, optimizer=opt, scheduler=sched, data_position={"shard": 3})
    restored = restore_latest_clean("ckpts", model=model, optimizer=opt, scheduler=sched)

A save is atomic: everything is written and fsynced in ``.tmp-step-<N>-<pid>/``, the ``COMPLETE``
marker last, then the folder is renamed to ``step-<N>/``. A crash at any point leaves either no
``step-<N>`` or a whole one. Call :func:`save` from one process (rank 0 under DDP): the RNG
states it records are that process's.

Loading never unpickles Python objects: every file goes through ``torch.load(weights_only=True)``
(or safetensors), so a checkpoint from an untrusted place cannot run code. Before anything is
changed, the checkpoint is verified (:func:`runwatch.daemon.checkpoints.verify`) and its model
keys and shapes and optimizer groups are checked against the objects given, so a refused load
leaves the model, optimizer, scheduler and RNGs as they were.
"""

from __future__ import annotations

import hashlib
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
    folder_name,
    identify,
    latest_clean,
    verify,
)

__all__ = ["Checkpoint", "CheckpointError", "Restored", "load", "restore_latest_clean", "save"]

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
) -> Checkpoint:
    """Save ``folder/step-<N>/`` atomically and return it.

    Holds the model (unwrapped from DDP / torch.compile), optimizer and scheduler state, the
    torch, CUDA, Python and numpy RNG states, ``step``, and ``data_position`` / ``extra`` (plain
    dicts of str, numbers, lists and tensors). Refuses with CheckpointError when ``step-<N>``
    exists already: a checkpoint is never overwritten. On failure nothing is left behind.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, not {step!r}")
    folder = Path(folder)
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
) -> Restored:
    """Restore ``model`` (and ``optimizer``, ``scheduler``, the RNGs when given / asked) from the
    checkpoint at ``path``: a runwatch ``step-<N>/``, a Hugging Face ``checkpoint-<N>/`` or a
    Lightning ``.ckpt``.

    Verifies the checkpoint first and checks that it fits the objects given before changing any
    of them. Raises CheckpointError, naming the path and the reason, for any failure, including
    a file that holds pickled objects (refused, never unpickled) and DCP folders (restore those
    with ``torch.distributed.checkpoint.load`` under the layout that saved them).
    """
    ckpt = _checkpoint_at(path)
    if ckpt.format == DCP:
        raise CheckpointError(
            f"{ckpt.path}: a torch.distributed.checkpoint folder; restore it with "
            "torch.distributed.checkpoint.load under the parallel layout that saved it"
        )
    verify(ckpt)
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
    the one restored. Raises CheckpointError when none is left.
    """
    folder = Path(folder)
    passed_over: list[Path] = []
    refused_names: list[str] = []
    while True:
        ckpt, refused = latest_clean(folder, before_step=before_step, exclude=passed_over)
        for bad, reason in refused:
            log.warning("runwatch: checkpoint %s refused: %s", bad.path.name, reason)
            passed_over.append(bad.path)
            refused_names.append(bad.path.name)
        if ckpt is None:
            where = f" before step {before_step}" if before_step is not None else ""
            tried = f" (refused: {', '.join(refused_names)})" if refused_names else ""
            raise CheckpointError(f"{folder}: no clean checkpoint{where}{tried}")
        try:
            restored = load(ckpt, **load_kwargs)
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
