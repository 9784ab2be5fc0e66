"""``runwatch install-systemd``: put the shipped systemd files in place under ``--root``.

    runwatch install-systemd [--root /] [--runwatch PATH] [--dry-run] [--json]

Writes (paths under ``--root``):
  etc/systemd/system/runwatch.service      the unit, ExecStart= rewritten to ``--runwatch`` (default:
                                           the ``runwatch`` this command runs from); replaced
  etc/systemd/system/runwatch.service.d/checkpoints.conf.example
                                           the retention drop-in, inactive until renamed *.conf
  etc/sysusers.d/runwatch.conf             user and group runwatch, for systemd-sysusers
  etc/runwatch/runwatch.env                environment example, mode 0600; never overwritten
then prints the next steps (systemd-sysusers, group membership, daemon-reload, enable --now).
It runs no systemctl itself: ``--root`` may be an image being built. Stdlib only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import stat
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

#: Shipped as ``runwatch/systemd`` in the wheel (pyproject package-data), ``systemd/`` in the tree.
SHIPPED = Path(__file__).resolve().parent.parent / "systemd"
UNIT = "runwatch.service"
#: (shipped file, destination under the root, mode, replace an existing file)
FILES = (
    (UNIT, "etc/systemd/system/runwatch.service", 0o644, True),
    ("checkpoints.conf.example", "etc/systemd/system/runwatch.service.d/checkpoints.conf.example",
     0o644, True),
    ("runwatch.sysusers.conf", "etc/sysusers.d/runwatch.conf", 0o644, True),
    ("runwatch.env", "etc/runwatch/runwatch.env", 0o600, False),
)
EXIT_FAILED = 1


@dataclass
class Placed:
    source: str
    path: str
    mode: str
    action: str  # create | replace | unchanged | keep (exists, not ours to overwrite)


def runwatch_executable() -> str:
    """The ``runwatch`` this process was started as, else the one beside this Python, else on PATH,
    else this Python with ``-m runwatch.daemon``."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "runwatch" and argv0.is_file():
        return str(argv0.absolute())
    sibling = Path(sys.executable).parent / "runwatch"
    if sibling.is_file():
        return str(sibling.absolute())
    found = shutil.which("runwatch")
    if found:
        return str(Path(found).absolute())
    return f"{_quote(str(Path(sys.executable).absolute()))} -m runwatch.daemon"


def _quote(word: str) -> str:
    """One ExecStart= word: systemd expands % specifiers and $VARIABLES, and splits at spaces."""
    word = word.replace("%", "%%").replace("$", "$$")
    if re.search(r"[\s\"'\\]", word):
        word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def render_unit(text: str, executable: str) -> str:
    """The unit with ExecStart= running ``executable daemon``."""
    exec_start = executable if " -m " in executable else _quote(executable)
    out, n = re.subn(r"(?m)^ExecStart=\S+", lambda _: f"ExecStart={exec_start}", text)
    if n != 1:
        raise ValueError(f"{UNIT}: expected one ExecStart= line, found {n}")
    return out


def unreachable(path: Path) -> str | None:
    """Why user runwatch (not the owner, not in the owner's group) cannot run ``path``, or None."""
    for p in [path, *path.parents][::-1]:
        try:
            mode = p.stat().st_mode
        except OSError as exc:
            return f"{p}: {exc.strerror}"
        if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
            return f"{p} is not searchable by other users (mode {stat.S_IMODE(mode):04o})"
        if p == path and not mode & stat.S_IROTH:
            return f"{p} is not readable by other users (mode {stat.S_IMODE(mode):04o})"
    return None


def _warnings(executable: str) -> list[str]:
    exe = Path(executable.split(" -m ")[0].strip('"'))
    targets = [exe]
    try:
        with open(exe, "rb") as f:
            first = f.readline(4096)
        if first.startswith(b"#!"):
            targets.append(Path(first[2:].decode(errors="replace").split()[0]).resolve())
    except (OSError, IndexError):
        pass
    return [f"user runwatch cannot run ExecStart's {t}: {why}; install runwatch where every user can "
            "(for example a venv under /opt) or pass --runwatch" for t in targets if (why := unreachable(t))]


def install(root: Path, executable: str, dry_run: bool = False) -> list[Placed]:
    placed = []
    for source, rel, mode, replace in FILES:
        text = (SHIPPED / source).read_text()
        if source == UNIT:
            text = render_unit(text, executable)
        dest = root / rel
        if not dest.exists():
            action = "create"
        elif not replace:
            action = "keep"
        else:
            action = "unchanged" if dest.read_text(errors="replace") == text else "replace"
        placed.append(Placed(source, str(dest), f"{mode:04o}", action))
        if dry_run or action in ("keep", "unchanged"):
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    return placed


def next_steps(root: Path) -> list[str]:
    optional = [
        "usermod -aG runwatch USER   # each user whose training or CLI talks to the daemon (next login)",
        "optional: edit /etc/runwatch/runwatch.env (root, 0600) and /etc/runwatch/runwatch.toml"
        " (root:runwatch, 0640)",
        "optional: list checkpoint folders in /etc/systemd/system/runwatch.service.d/"
        "checkpoints.conf.example and rename it checkpoints.conf (retention writes there)",
    ]
    if root != Path("/"):  # an image or a chroot: nothing runs yet
        return [f"systemd-sysusers --root={root}   # creates user and group runwatch in the image",
                f"systemctl --root={root} enable runwatch.service", *optional]
    return ["systemd-sysusers   # creates user and group runwatch", *optional,
            "systemctl daemon-reload", "systemctl enable --now runwatch",
            "systemctl status runwatch; journalctl -u runwatch -f"]


def cmd_install_systemd(args: argparse.Namespace) -> int:
    root = Path(args.root).absolute()
    executable = str(Path(args.runwatch).absolute()) if args.runwatch else runwatch_executable()
    try:
        placed = install(root, executable, dry_run=args.dry_run)
    except (OSError, ValueError) as exc:
        msg = f"install-systemd: {exc}"
        if isinstance(exc, PermissionError):
            msg += " (run it as root, or give --root a folder you may write)"
        if args.json:
            print(json.dumps({"error": msg}, indent=2, sort_keys=True))
        else:
            print(f"runwatch {msg}", file=sys.stderr)
        return EXIT_FAILED
    warnings = _warnings(executable)
    steps = next_steps(root)
    if args.json:
        print(json.dumps({"root": str(root), "dry_run": args.dry_run, "exec_start": f"{executable} daemon",
                          "files": [asdict(p) for p in placed], "warnings": warnings,
                          "next_steps": steps}, indent=2, sort_keys=True))
        return 0
    verb = "would write" if args.dry_run else "wrote"
    for p in placed:
        shown = {"create": verb, "replace": f"{verb} (replacing)", "unchanged": "unchanged",
                 "keep": "kept (exists; not overwritten)"}[p.action]
        print(f"{shown:>30}  {p.path}  ({p.mode})")
    print(f"ExecStart={executable} daemon")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print("\nnext:" if not args.dry_run else "\nthen:")
    for s in steps:
        print(f"  {s}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("install-systemd", help="install the systemd unit, sysusers entry and examples")
    p.add_argument("--root", type=Path, default=Path("/"), help="install under this folder (default /)")
    p.add_argument("--runwatch", help="the runwatch executable ExecStart= runs (default: this one)")
    p.add_argument("--dry-run", action="store_true", help="show what would be written; write nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_install_systemd)
