"""``runwatch dashboards``: the Grafana dashboards shipped with runwatch.

    runwatch dashboards push --url URL [--token TOKEN] [--folder NAME] [--json]
    runwatch dashboards path

``push`` creates or replaces each dashboard through Grafana's HTTP API
(``POST /api/dashboards/db`` with ``overwrite``) with the maintained ``grafana-client``
package; ``--folder`` finds the folder by title, or creates it. The token is a Grafana service
account token with the Editor role; ``$GRAFANA_TOKEN`` is read when ``--token`` is not given
(a token on the command line is visible to other users in ``ps``), and it is never printed.
``path`` prints the folder holding the JSON, for file-based provisioning.

The dashboards are the JSON files in ``dashboards/`` at the top of the source tree, installed
as ``runwatch/dashboards`` beside this package (the same way as the default rule pack).

Exit codes: 0 pushed; 1 Grafana unreachable (or timed out); 5 usage (no token, bad URL, no
dashboards); 7 Grafana refused or failed (401, 403, 4xx, 5xx).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from runwatch.daemon import __version__

TOKEN_ENV = "GRAFANA_TOKEN"
EXIT_UNREACHABLE = 1
EXIT_USAGE = 5
EXIT_FAILED = 7


class PushError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def dashboards_dir() -> Path:
    """The shipped dashboards (``dashboards/`` in the source tree, ``runwatch/dashboards``
    when installed)."""
    return Path(__file__).resolve().parent.parent / "dashboards"


def load_dashboards(folder: Path | None = None) -> dict[str, dict[str, Any]]:
    """File name -> dashboard JSON, for every ``*.json`` in the folder."""
    folder = folder or dashboards_dir()
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


@dataclass(frozen=True)
class Target:
    """Where Grafana is: the URL without credentials (safe to print), and the auth to send."""

    url: str
    origin: str
    auth: str | tuple[str, str]


def target(url: str, token: str | None) -> Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PushError(f"--url {url!r}: give Grafana's address, e.g. https://grafana.example.com",
                        EXIT_USAGE)
    try:
        port = parts.port
    except ValueError as exc:
        raise PushError(f"--url: {exc}", EXIT_USAGE) from None
    netloc = parts.hostname + (f":{port}" if port else "")
    origin = f"{parts.scheme}://{netloc}"
    shown = origin + parts.path.rstrip("/")
    if token:
        return Target(shown, origin, token)
    if parts.username and parts.password:  # basic auth in the URL (a local admin, say)
        return Target(shown, origin, (parts.username, parts.password))
    raise PushError(f"no Grafana token: give --token or set ${TOKEN_ENV} (a service account token "
                    "with the Editor role)", EXIT_USAGE)


def _api(t: Target, timeout: float) -> Any:
    from grafana_client import GrafanaApi

    parts = urlsplit(t.url)
    prefix = parts.path.strip("/")
    # grafana-client joins "{prefix}api": a sub-path (Grafana behind /grafana/) needs its slash.
    return GrafanaApi(auth=t.auth, host=parts.hostname, port=parts.port, protocol=parts.scheme,
                      url_path_prefix=f"{prefix}/" if prefix else "", timeout=timeout,
                      user_agent=f"runwatch/{__version__}")


def _scrub(text: str, t: Target) -> str:
    secrets = [t.auth] if isinstance(t.auth, str) else [t.auth[1]]
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def _failure(exc: Exception, t: Target, doing: str) -> PushError:
    """A clear message (and exit code) for what went wrong talking to Grafana."""
    import niquests.exceptions
    from grafana_client.client import GrafanaException, GrafanaTimeoutError, GrafanaUnauthorizedError

    if isinstance(exc, GrafanaUnauthorizedError):
        msg = (f"Grafana at {t.url} refused the credentials while {doing} (401 Unauthorized): check "
               f"--token / ${TOKEN_ENV}")
        return PushError(msg, EXIT_FAILED)
    if isinstance(exc, GrafanaTimeoutError):
        return PushError(f"Grafana at {t.url} did not answer in time while {doing}", EXIT_UNREACHABLE)
    if isinstance(exc, GrafanaException) and exc.status_code:
        detail = exc.response.get("message") if isinstance(exc.response, dict) else exc.response
        hint = {403: " (the token's role may not write dashboards or folders: give it Editor)",
                404: " (is this Grafana's address?)",
                412: " (a dashboard with this uid or title changed meanwhile)"}.get(exc.status_code, "")
        text = (f"Grafana at {t.url} answered HTTP {exc.status_code} while {doing}: "
                f"{detail or exc.message}{hint}")
        return PushError(_scrub(text, t), EXIT_FAILED)
    if isinstance(exc, GrafanaException | niquests.exceptions.RequestException | OSError):
        reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        text = f"cannot reach Grafana at {t.url} while {doing}: {reason}"
        return PushError(_scrub(text, t), EXIT_UNREACHABLE)
    return PushError(_scrub(f"{doing}: {type(exc).__name__}: {exc}", t), EXIT_FAILED)


def _folder_uid(api: Any, title: str, t: Target) -> tuple[str, bool]:
    """The uid of the folder titled ``title``, created when missing; and whether it was."""
    try:
        for f in api.folder.get_all_folders() or []:
            if isinstance(f, dict) and f.get("title") == title:
                return str(f["uid"]), False
        created = api.folder.create_folder(title)
    except Exception as exc:
        raise _failure(exc, t, f"finding or creating folder {title!r}") from None
    return str(created["uid"]), True


def push(url: str, token: str | None, folder: str | None = None, timeout: float = 15.0,
         dashboards: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Create or replace every shipped dashboard in Grafana; what Grafana answered, per file."""
    t = target(url, token)
    boards = load_dashboards() if dashboards is None else dashboards
    if not boards:
        raise PushError(f"no dashboards in {dashboards_dir()}", EXIT_USAGE)
    api = _api(t, timeout)
    out: dict[str, Any] = {"grafana": t.url, "folder": None, "dashboards": []}
    folder_uid = None
    if folder:
        folder_uid, created = _folder_uid(api, folder, t)
        out["folder"] = {"title": folder, "uid": folder_uid, "created": created}
    for name, board in boards.items():
        body: dict[str, Any] = {
            "dashboard": {**board, "id": None},  # matched by uid; a numeric id is per-instance
            "overwrite": True,
            "message": f"runwatch dashboards push (runwatch {__version__})",
        }
        if folder_uid:
            body["folderUid"] = folder_uid
        try:
            reply = api.dashboard.update_dashboard(body) or {}
        except Exception as exc:
            raise _failure(exc, t, f"pushing {name}") from None
        path = str(reply.get("url") or "")
        out["dashboards"].append({
            "file": name, "title": board.get("title"), "uid": reply.get("uid", board.get("uid")),
            "version": reply.get("version"), "status": reply.get("status"),
            "url": t.origin + path if path.startswith("/") else path,
        })
    return out


# -- the command line --------------------------------------------------------------------------

def cmd_push(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get(TOKEN_ENV) or None
    try:
        result = push(args.url, token, folder=args.folder, timeout=args.timeout)
    except PushError as exc:
        print(f"runwatch dashboards push: {exc}", file=sys.stderr)
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}, indent=2, sort_keys=True))
        return exc.code
    if args.json:
        print(json.dumps({"ok": True, **result}, indent=2, sort_keys=True))
        return 0
    where = f" into folder {args.folder!r}" if args.folder else ""
    for d in result["dashboards"]:
        print(f"pushed {d['file']}{where}: {d['title']} version {d['version']} {d['url']}")
    return 0


def cmd_path(args: argparse.Namespace) -> int:
    folder = dashboards_dir()
    if args.json:
        print(json.dumps({"path": str(folder), "dashboards": sorted(load_dashboards(folder))}, indent=2))
    else:
        print(folder)
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``runwatch dashboards ...`` on the CLI's subparsers."""
    dash = subparsers.add_parser("dashboards", help="the Grafana dashboards: push them, or find the JSON")
    sub = dash.add_subparsers(dest="dashboards_command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser("push", help="create or replace the dashboards in Grafana (grafana-client)",
                       description="Create or replace runwatch's dashboards through Grafana's HTTP API. "
                       "Exit 1: unreachable; 5: usage; 7: Grafana refused or failed.")
    p.add_argument("--url", required=True, help="Grafana's address, e.g. https://grafana.example.com")
    p.add_argument("--token", help=f"service account token (Editor role); default ${TOKEN_ENV}")
    p.add_argument("--folder", help="Grafana folder title (created when missing; default: General)")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds per request (default 15)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_push)
    p = sub.add_parser("path", help="the folder holding the dashboard JSON (for file provisioning)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_path)
