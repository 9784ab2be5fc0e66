"""A checksum manifest of a data folder, so that a suspect shard can be verified.

``runwatch manifest DIR`` writes ``DIR/runwatch-manifest.json``, listing every file under DIR
with its size, sha256 and the shard ids a training hook may report it by. When an alert names
a shard (``data_shard``, from ``watch.batch(shard=...)``), :func:`verify_manifest` re-hashes the
files of that shard and says whether they still match.

Shard ids: a hook reports ``shard_id(shard)`` (:func:`runwatch.daemon.protocol.shard_id`): the
number itself for ``17`` or ``"00017"``, a CRC of the name for ``"shard-00017"``. So each file
records the id of its stem (the name without every suffix: ``shard-00017.jsonl.gz`` →
``shard-00017``) and, when the stem ends in a number, that number too. ``-of-<total>`` is not
that number: ``train-00017-of-00100.parquet`` is shard 17.

Stdlib only: the daemon runs without torch.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from runwatch.daemon.checkpoints import file_sha256
from runwatch.daemon.protocol import shard_id

MANIFEST_NAME = "runwatch-manifest.json"
FORMAT = 1

_SHARD_NUMBER = re.compile(r"(\d+)(?:[-_]of[-_]\d+)?$")
_TMP_PREFIX = f".{MANIFEST_NAME}.tmp-"


class ManifestError(Exception):
    """The manifest is missing or unusable, or a shard asked about is not in it."""


@dataclass(frozen=True)
class ShardCheck:
    """One file's verdict. ``status``: ``match``; ``mismatch`` (size or sha256 differ);
    ``missing`` (listed, not on disk); ``new`` (on disk, not listed). ``path`` is relative to
    the data folder, with ``/`` separators."""

    path: str
    status: str
    detail: str


def _stem(name: str) -> str:
    # Path.stem drops one suffix only; shard-00017.jsonl.gz has two.
    path = Path(name)
    while path.suffix:
        path = path.with_suffix("")
    return path.name


def shard_ids(name: str) -> list[int]:
    """The ids a file may be reported by: shard_id(stem), then the stem's number when it has one."""
    stem = _stem(name)
    ids = [shard_id(stem)]
    if (match := _SHARD_NUMBER.search(stem)) and (number := shard_id(match.group(1))) not in ids:
        ids.append(number)
    return ids


def _files(data_dir: Path) -> list[str]:
    """Relative posix paths of the files under ``data_dir``, sorted, without our own manifest.

    Symlinked files are included (their content is what training reads); symlinked folders are
    not walked, so a link loop cannot make this run forever."""
    found: list[str] = []
    for root, dirs, names in os.walk(data_dir):
        dirs.sort()
        for name in names:
            relative = (Path(root) / name).relative_to(data_dir).as_posix()
            if relative == MANIFEST_NAME or relative.startswith(_TMP_PREFIX):
                continue
            if (Path(root) / name).is_file():
                found.append(relative)
    return sorted(found)


def write_manifest(data_dir: Path) -> Path:
    """Hash every file under ``data_dir`` into ``data_dir/runwatch-manifest.json`` and return
    its path. Written to a temporary file and renamed, so a reader never sees half of one."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ManifestError(f"{data_dir}: not a folder")
    files: dict[str, dict[str, Any]] = {}
    for relative in _files(data_dir):
        path = data_dir / relative
        try:
            size = path.stat().st_size
            digest = file_sha256(path)
        except OSError as exc:
            raise ManifestError(f"{path}: cannot read ({exc.strerror or exc})") from None
        ids = shard_ids(relative)
        files[relative] = {"size": size, "sha256": digest, "shard_id": ids[0], "shard_ids": ids}
    body = {"format": FORMAT, "created_at": time.time(), "files": files}
    target = data_dir / MANIFEST_NAME
    tmp = data_dir / f"{_TMP_PREFIX}{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(body, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ManifestError(f"{target}: cannot write ({exc.strerror or exc})") from None
    return target


def _load(data_dir: Path) -> dict[str, dict[str, Any]]:
    path = data_dir / MANIFEST_NAME
    try:
        body = json.loads(path.read_bytes())
    except FileNotFoundError:
        hint = f"run `runwatch manifest {data_dir}` first"
        raise ManifestError(f"{data_dir}: no {MANIFEST_NAME}; {hint}") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: unreadable ({exc})") from None
    files = body.get("files") if isinstance(body, dict) else None
    if not isinstance(files, dict) or not all(isinstance(e, dict) for e in files.values()):
        raise ManifestError(f"{path}: not a runwatch manifest (no files mapping)")
    for relative in files:
        # The manifest is data, not trusted: it must not send us hashing files elsewhere.
        parts = PurePosixPath(relative).parts
        if not parts or PurePosixPath(relative).is_absolute() or ".." in parts:
            raise ManifestError(f"{path}: entry {relative!r} is not a path inside {data_dir}")
    return files


def _check(data_dir: Path, relative: str, entry: dict[str, Any]) -> ShardCheck:
    path = data_dir / relative
    try:
        size = path.stat().st_size
        if not path.is_file():
            return ShardCheck(relative, "mismatch", "not a regular file any more")
    except FileNotFoundError:
        return ShardCheck(relative, "missing", "listed in the manifest, not on disk")
    except OSError as exc:
        return ShardCheck(relative, "mismatch", f"cannot read ({exc.strerror or exc})")
    if size != entry.get("size"):
        return ShardCheck(relative, "mismatch", f"size {size} bytes, manifest says {entry.get('size')}")
    try:
        digest = file_sha256(path)
    except OSError as exc:
        return ShardCheck(relative, "mismatch", f"cannot read ({exc.strerror or exc})")
    if digest != entry.get("sha256"):
        return ShardCheck(
            relative, "mismatch", f"sha256 {digest[:16]}…, manifest says {str(entry.get('sha256'))[:16]}…"
        )
    return ShardCheck(relative, "match", f"size {size} bytes, sha256 {digest[:16]}…")


def verify_manifest(data_dir: Path, shard: int | str | None = None) -> list[ShardCheck]:
    """Re-hash the files the manifest lists and compare, sorted by path.

    With ``shard``: only that shard's files, found by any id the hook could have reported
    (``17``, ``"00017"``, ``"shard-00017"``) or by its path relative to ``data_dir``; a shard
    that matches no file raises ManifestError. Without: every listed file, plus a ``new``
    verdict for each file on disk the manifest does not list.
    """
    data_dir = Path(data_dir)
    files = _load(data_dir)
    if shard is None:
        selected = sorted(files)
    elif isinstance(shard, str) and shard in files:
        selected = [shard]  # a path exactly as listed names that one file
    else:
        wanted = {shard_id(shard)}
        if isinstance(shard, str):
            wanted.add(shard_id(_stem(shard)))  # a file name given with its suffixes
        selected = [
            relative
            for relative, entry in sorted(files.items())
            if wanted & set(entry.get("shard_ids") or [entry.get("shard_id")])
        ]
        if not selected:
            raise ManifestError(f"{data_dir}: shard {shard!r} matches no file in {MANIFEST_NAME}")
    checks = [_check(data_dir, relative, files[relative]) for relative in selected]
    if shard is None:
        checks += [
            ShardCheck(relative, "new", "on disk, not in the manifest")
            for relative in _files(data_dir)
            if relative not in files
        ]
        checks.sort(key=lambda c: c.path)
    return checks
