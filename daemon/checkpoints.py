"""The checkpoint folders a run can come back from: which formats are recognised, when one is
complete, and whether it is intact.

Stdlib only (no torch): the daemon's retention and rewind logic reads checkpoint folders
without importing torch. Saving and loading live in :mod:`runwatch.hooks.checkpoint`.

Formats recognised directly inside a checkpoint folder (one level, never recursive):

``runwatch``     ``step-<N>/`` written by ``runwatch.hooks.checkpoint.save``: ``state.pt``,
                 ``manifest.json`` (size and sha256 of every file) and the marker ``COMPLETE``,
                 written last. In-progress saves live in ``.tmp-step-*`` and are never listed.
                 A sharded model's checkpoint (``"layout": "dcp"`` in the manifest) holds a
                 ``torch.distributed.checkpoint`` folder's files (``.metadata``, one
                 ``__<rank>_<i>.distcp`` per writing rank) beside ``state.pt`` and one
                 ``rng-rank<R>.pt`` per rank, every one of them in the manifest.
``huggingface``  Trainer's ``checkpoint-<N>/``: complete once ``trainer_state.json`` and a weights
                 file exist (Trainer writes ``trainer_state.json`` after the weights, optimizer
                 and scheduler). ``tmp-checkpoint-*`` is ignored.
``lightning``    ``*.ckpt`` files; the step comes from ``step=<N>`` in the name, else it is -1
                 (unknown). Complete when the file is a whole zip archive (``torch.save`` writes
                 zips, and a truncated zip has no central directory).
``dcp``          a ``torch.distributed.checkpoint`` folder: complete when it holds ``.metadata``,
                 which DCP writes after every shard. Without it the folder is not recognised at
                 all, since nothing else marks it as a checkpoint. The step comes from
                 ``step=<N>`` or a trailing number in the name (``step_100``, ``global_step100``).

``verify()`` says whether a complete checkpoint is intact; ``latest_clean()`` walks back from the
newest to the first one that passes, and says what it refused on the way and why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import warnings
import zipfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = "COMPLETE"
MANIFEST = "manifest.json"
STATE = "state.pt"

RUNWATCH, HUGGINGFACE, LIGHTNING, DCP = "runwatch", "huggingface", "lightning", "dcp"
FORMATS = (RUNWATCH, HUGGINGFACE, LIGHTNING, DCP)

CHUNK = 1 << 20  # read files 1 MiB at a time: hashing a 10 GB state.pt must not load it whole

_RUNWATCH_NAME = re.compile(r"step-(\d+)")
_HF_NAME = re.compile(r"checkpoint-(\d+)")
_STEP_EQUALS = re.compile(r"(?:^|[^A-Za-z0-9])step=(\d+)")
_TRAILING_NUMBER = re.compile(r"(\d+)$")

HF_TRAINER_STATE = "trainer_state.json"
# Single-file weights, then the index files of sharded weights (which list the shards).
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
DCP_METADATA = ".metadata"
#: The manifest's ``layout`` of a runwatch checkpoint of a sharded model.
DCP_LAYOUT = "dcp"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the path and what is wrong."""


class CompetingRetentionWarning(UserWarning):
    """A framework's own checkpoint rotation (Hugging Face ``save_total_limit``, Lightning
    ``save_top_k``) is on in a folder runwatch's retention manages: it deletes checkpoints that
    runwatch may protect (a rollback target, a pin). Warned once when training starts."""


def warn_competing_retention(setting: str, fix: str, folder: str | os.PathLike[str]) -> None:
    """Warn (:class:`CompetingRetentionWarning`) that ``setting`` deletes checkpoints in ``folder``
    behind runwatch's back, and say what to set instead (``fix``)."""
    warnings.warn(
        f"runwatch: {setting} deletes checkpoints in {folder} by itself, including ones runwatch's retention"
        f" protects (an incident's rollback target, a pinned step, every Nth). {fix}, and let the runwatch"
        " daemon's [retention] policy decide what to keep; if a protected checkpoint is deleted anyway,"
        " the daemon raises retention_protected_checkpoint_lost.",
        CompetingRetentionWarning, stacklevel=3)


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint on disk as :func:`scan` found it.

    ``step`` is -1 when the format does not say (a Lightning file without ``step=`` in its
    name). ``saved_at`` is the save time the format records when it records one, else the
    modification time of the file that completes it (see :func:`scan`).
    """

    path: Path
    step: int
    format: str
    complete: bool
    size_bytes: int
    saved_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "step": self.step,
            "format": self.format,
            "complete": self.complete,
            "size_bytes": self.size_bytes,
            "saved_at": self.saved_at,
        }


def folder_name(step: int) -> str:
    """The folder a runwatch checkpoint of ``step`` lives in: ``step-000000100``.

    Zero-padded so that a plain ``ls`` lists them in step order."""
    if step < 0:
        raise ValueError(f"a checkpoint step must be >= 0, not {step}")
    return f"step-{step:09d}"


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read 1 MiB at a time."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _tree_size(path: Path) -> int:
    """Bytes in the regular files under ``path`` (symlinks not followed); unreadable parts count 0."""
    try:
        st = path.lstat()
    except OSError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    total = 0
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                total += _tree_size(Path(entry.path))
    except OSError:
        pass
    return total


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def _hf_weights(path: Path) -> list[Path]:
    """The weights files (or shard index files) present in a Hugging Face checkpoint folder."""
    return [path / name for name in (*HF_WEIGHTS, *HF_WEIGHT_INDEXES) if _is_file(path / name)]


def _step_from_name(name: str) -> int:
    if match := _STEP_EQUALS.search(name):
        return int(match.group(1))
    if match := _TRAILING_NUMBER.search(name):
        return int(match.group(1))
    return -1


def _read_marker(path: Path) -> dict[str, Any]:
    marker = path / MARKER
    try:
        data = json.loads(marker.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: incomplete (no {MARKER} marker)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: {MARKER} marker is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {MARKER} marker is not a JSON object")
    return data


def identify(path: Path) -> Checkpoint | None:
    """The checkpoint at ``path`` (a folder or a ``.ckpt`` file), or None when it is none of the
    recognised formats. Raises OSError only when ``path`` itself cannot be examined."""
    path = Path(path)
    name = path.name
    st = path.lstat()
    if stat.S_ISREG(st.st_mode):
        if not name.endswith(".ckpt"):
            return None
        # A half-written file has no zip central directory at its end, so is_zipfile() is False.
        return Checkpoint(
            path, _step_from_name(name), LIGHTNING, zipfile.is_zipfile(path), st.st_size, st.st_mtime
        )
    if not stat.S_ISDIR(st.st_mode):
        return None  # a symlink, socket, ...: never a checkpoint we act on
    if name.startswith("."):
        return None  # runwatch's .tmp-step-* (in-progress saves) and anything hidden

    # A DCP folder may be named step-100 too; its .metadata tells them apart, unless runwatch
    # wrote it (a sharded save): then state.pt is there, and a missing COMPLETE (a save cut off,
    # retention renaming the marker away first) must read as an incomplete runwatch checkpoint,
    # never as a complete DCP one.
    runwatch_name = _RUNWATCH_NAME.fullmatch(name)
    if runwatch_name and (
        not (path / DCP_METADATA).exists() or (path / MARKER).exists() or (path / STATE).exists()
    ):
        complete = (path / MARKER).is_file()
        saved_at = _mtime(path)
        if complete:
            saved_at = _mtime(path / MARKER)
            # A bad marker is verify()'s to report; listing the checkpoint must not fail on it.
            with contextlib.suppress(CheckpointError, KeyError, TypeError, ValueError):
                saved_at = float(_read_marker(path)["saved_at"])
        return Checkpoint(path, int(runwatch_name.group(1)), RUNWATCH, complete, _tree_size(path), saved_at)
    if match := _HF_NAME.fullmatch(name):
        state = path / HF_TRAINER_STATE
        complete = _is_file(state) and bool(_hf_weights(path))
        # trainer_state.json records no save time; the time it was written is when Trainer
        # finished the checkpoint, so its mtime stands in for one.
        saved_at = _mtime(state) if complete else _mtime(path)
        return Checkpoint(path, int(match.group(1)), HUGGINGFACE, complete, _tree_size(path), saved_at)
    if name.startswith("tmp-checkpoint-"):
        return None  # Trainer's own in-progress folder
    if _is_file(path / DCP_METADATA):
        return Checkpoint(
            path, _step_from_name(name), DCP, True, _tree_size(path), _mtime(path / DCP_METADATA)
        )
    return None


def scan(folder: Path) -> list[Checkpoint]:
    """Every checkpoint directly in ``folder``, complete or not, sorted by (step, path).

    A missing folder has none. An entry that cannot be read, or is not shaped like any format,
    is skipped: one odd file must not hide the checkpoints beside it. Raises CheckpointError
    only when ``folder`` exists but is not a folder that can be listed.
    """
    folder = Path(folder)
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CheckpointError(f"{folder}: cannot list checkpoints ({exc.strerror or exc})") from None
    found: list[Checkpoint] = []
    for name in names:
        try:
            ckpt = identify(folder / name)
        except OSError:
            continue  # vanished between listdir and stat, or unreadable
        if ckpt is not None:
            found.append(ckpt)
    found.sort(key=lambda c: (c.step, str(c.path)))
    return found


def _verify_runwatch(ckpt: Checkpoint) -> None:
    path = ckpt.path
    marker = _read_marker(path)
    if marker.get("step") != ckpt.step:
        raise CheckpointError(
            f"{path}: {MARKER} marker says step {marker.get('step')!r}, the folder name says {ckpt.step}"
        )
    try:
        manifest_bytes = (path / MANIFEST).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read {MANIFEST} ({exc.strerror or exc})") from None
    if hashlib.sha256(manifest_bytes).hexdigest() != marker.get("manifest_sha256"):
        raise CheckpointError(f"{path}: {MANIFEST} sha256 mismatch (it changed after the save)")
    try:
        manifest = json.loads(manifest_bytes)
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(e, dict) for e in files.values()):
            raise ValueError("no files mapping")
        if manifest.get("step") != ckpt.step:
            raise ValueError(f"it says step {manifest.get('step')!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: {MANIFEST} is not a runwatch manifest ({exc})") from None

    for name, entry in files.items():
        target = inside(path, Path(name))  # a manifest naming ../x must not make us read it
        try:
            st = target.stat()
        except FileNotFoundError:
            raise CheckpointError(f"{path}: {name} is missing") from None
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read {name} ({exc.strerror or exc})") from None
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: {name} is not a regular file")
        if st.st_size != entry.get("size"):
            raise CheckpointError(
                f"{path}: size mismatch in {name} ({st.st_size} bytes, manifest says {entry.get('size')})"
            )
        try:
            digest = file_sha256(target)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read {name} ({exc.strerror or exc})") from None
        if digest != entry.get("sha256"):
            raise CheckpointError(
                f"{path}: sha256 mismatch in {name} "
                f"({digest[:12]}…, manifest says {str(entry.get('sha256'))[:12]}…)"
            )

    listed = {Path(name).as_posix() for name in files} | {MARKER, MANIFEST}
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            relative = (Path(root) / name).relative_to(path).as_posix()
            if relative not in listed:
                raise CheckpointError(f"{path}: unlisted extra file {relative} (not in {MANIFEST})")


def manifest_layout(ckpt: Checkpoint) -> str | None:
    """How a runwatch checkpoint holds the model: :data:`DCP_LAYOUT` (a sharded model's
    ``torch.distributed.checkpoint`` files) or None (one ``state.pt``). Read from the manifest,
    which :func:`verify` has checked against the marker; None when it cannot be read."""
    if ckpt.format != RUNWATCH:
        return None
    try:
        layout = json.loads((ckpt.path / MANIFEST).read_bytes()).get("layout")
    except (OSError, ValueError, AttributeError):
        return None
    return layout if isinstance(layout, str) else None


def _verify_huggingface(ckpt: Checkpoint) -> None:
    path = ckpt.path
    try:
        state = json.loads((path / HF_TRAINER_STATE).read_bytes())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: {HF_TRAINER_STATE} is unreadable ({exc})") from None
    for weights in _hf_weights(path):
        shards = [weights]
        if weights.name in HF_WEIGHT_INDEXES:
            try:
                weight_map = json.loads(weights.read_bytes())["weight_map"]
                shards = [inside(path, Path(s)) for s in sorted(set(weight_map.values()))]
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{path}: {weights.name} is not a weights index ({exc})") from None
        for shard in shards:
            try:
                size = shard.stat().st_size
            except OSError:
                raise CheckpointError(f"{path}: weights file {shard.name} is missing") from None
            if size == 0:
                raise CheckpointError(f"{path}: weights file {shard.name} is empty")


def _verify_lightning(ckpt: Checkpoint) -> None:
    try:
        with zipfile.ZipFile(ckpt.path) as archive:
            bad = archive.testzip()  # reads every member and checks its CRC
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"{ckpt.path}: not a readable zip archive ({exc})") from None
    if bad is not None:
        raise CheckpointError(f"{ckpt.path}: CRC mismatch in archive member {bad}")


def _verify_dcp(ckpt: Checkpoint) -> None:
    # Without torch the shard files cannot be checked against .metadata; an empty .metadata
    # is the one sign of damage visible from here.
    try:
        size = (ckpt.path / DCP_METADATA).stat().st_size
    except OSError:
        raise CheckpointError(f"{ckpt.path}: incomplete (no {DCP_METADATA})") from None
    if size == 0:
        raise CheckpointError(f"{ckpt.path}: {DCP_METADATA} is empty")


def verify(ckpt: Checkpoint) -> None:
    """Raise CheckpointError unless ``ckpt`` is complete and intact, as far as its format lets
    us tell: runwatch checks every byte against its manifest, Hugging Face that the weights are
    there and not empty, Lightning every zip member's CRC, DCP that ``.metadata`` is not empty.
    """
    if not ckpt.complete:
        why = {
            RUNWATCH: f"no {MARKER} marker",
            HUGGINGFACE: f"needs {HF_TRAINER_STATE} and a weights file",
            LIGHTNING: "not a whole zip archive (truncated or still being written?)",
            DCP: f"no {DCP_METADATA}",
        }.get(ckpt.format, "")
        raise CheckpointError(f"{ckpt.path}: incomplete ({why})")
    {
        RUNWATCH: _verify_runwatch,
        HUGGINGFACE: _verify_huggingface,
        LIGHTNING: _verify_lightning,
        DCP: _verify_dcp,
    }[ckpt.format](ckpt)


def inside(folder: Path, candidate: Path) -> Path:
    """``candidate`` resolved (relative to ``folder`` when relative), refused with
    CheckpointError unless it lies strictly inside ``folder`` after ``..`` and symlinks are
    resolved. Use it on every path that comes from a command, a manifest or a user."""
    root = Path(folder).resolve()
    candidate = Path(candidate)
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise CheckpointError(f"{candidate}: resolves to {resolved}, which is not inside {root}")
    return resolved


def latest_clean(
    folder: Path, *, before_step: int | None = None, exclude: Collection[Path] = ()
) -> tuple[Checkpoint | None, list[tuple[Checkpoint, str]]]:
    """The newest checkpoint in ``folder`` that is complete and passes :func:`verify`, with
    step < ``before_step`` when given, leaving out ``exclude``; and the (checkpoint, reason)
    pairs refused on the way there, newest first.

    With ``before_step``, checkpoints of unknown step (-1) are never offered: nothing says
    they come before it. Incomplete checkpoints newer than the one offered are reported too
    (a save that died half-way is worth a line in the alert).
    """
    excluded = {Path(p).resolve() for p in exclude}
    refused: list[tuple[Checkpoint, str]] = []
    for ckpt in reversed(scan(folder)):
        if before_step is not None and not 0 <= ckpt.step < before_step:
            continue
        if ckpt.path.resolve() in excluded:
            continue
        try:
            verify(ckpt)
        except CheckpointError as exc:
            refused.append((ckpt, str(exc)))
            continue
        return ckpt, refused
    return None, refused
