"""The retention manager: watches checkpoint folders and carries out the policy's plan, safely.

One thread, one pass at a time, over every run that told the daemon its checkpoint folder.
A pass runs when watchdog reports a change in one of those folders and every
``rescan_seconds`` regardless (events get lost on network filesystems). A pass:

1. scans the folder (:func:`runwatch.daemon.checkpoints.scan`); a checkpoint counts once its
   format's completion marker exists and nothing in it changed for ``quiet_seconds``;
2. marks each one's health from the run's alerts (:func:`policy.health`);
3. asks :func:`policy.plan` what to keep and stores every decision with its reason (what
   ``runwatch checkpoints RUN`` and ``runwatch retention plan RUN`` show);
4. unless ``dry_run``, under the folder's lock file: for each deletion, renames the completion
   marker away first (a crash from here on leaves an incomplete checkpoint, which nothing
   trusts, never a half-deleted one that looks whole), then moves it into ``.runwatch-trash/``
   on the same filesystem; a background purge deletes the trash with retries;
5. quarantines the checkpoints newer than each applied rewind's target into
   ``abandoned/incident-N/`` rather than deleting them.

State lives in the store (its own connection, like the notifier's outbox): decisions, ordinals
(for "every Nth"), pins, quarantines. A pass interrupted by a restart is finished by the next:
a checkpoint whose marker was renamed is moved to the trash, and the trash is purged.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from runwatch.daemon import checkpoints as ck
from runwatch.daemon import store as store_mod
from runwatch.daemon.retention import policy as pol
from runwatch.daemon.store import Store

log = logging.getLogger("runwatch.retention")

TRASH = ".runwatch-trash"
LOCK = ".runwatch-retention.lock"
ABANDONED = "abandoned"
DELETING = ".deleting"
#: The file whose presence makes each format complete: renamed away first on deletion.
MARKERS = {ck.RUNWATCH: ck.MARKER, ck.HUGGINGFACE: ck.HF_TRAINER_STATE, ck.DCP: ck.DCP_METADATA}


@dataclass
class PassReport:
    """What one pass saw and did, per run (for logs, tests and ``runwatch retention plan``)."""

    plans: dict[str, pol.Plan] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    purged: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)


class RetentionManager:
    def __init__(
        self,
        store_path: Path,
        policy: Callable[[], pol.Policy],
        *,
        quiet_seconds: float = 30.0,
        rescan_seconds: float = 60.0,
        enabled: bool = True,
        alert: Callable[[list[dict[str, Any]]], None] | None = None,
        metrics: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store_path = store_path
        self.policy = policy
        self.quiet_seconds = quiet_seconds
        self.rescan_seconds = rescan_seconds
        self.enabled = enabled
        self.alert = alert
        self.metrics = metrics
        self.clock = clock
        self.conn = sqlite3.connect(store_path, check_same_thread=False, timeout=30.0)
        self.conn.execute("PRAGMA busy_timeout=30000")
        self._lock = threading.Lock()  # one pass at a time (the thread's, or a CLI plan's)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: Any = None
        self._watched: set[str] = set()
        self._purge_failures: dict[str, int] = {}
        self._refused: set[tuple[str, str]] = set()

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._observer = Observer()
        self._observer.start()
        self._thread = threading.Thread(target=self._run, name="runwatch-retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        self.conn.close()

    def poke(self) -> None:
        """Run a pass soon (a checkpoint was registered, a rewind applied, a pin changed)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_pass()
            except Exception:  # a failed pass is logged and retried; it never ends the thread
                log.exception("retention pass failed; retrying at the next rescan")
                self._count_error("pass")
            self._wake.wait(self.rescan_seconds)
            self._wake.clear()
            if not self._stop.is_set():
                time.sleep(min(1.0, self.quiet_seconds / 4))  # let a burst of file events settle

    def _watch(self, folder: Path) -> None:
        key = str(folder)
        if key in self._watched or self._observer is None or not folder.is_dir():
            return
        manager = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if TRASH not in str(event.src_path):
                    manager.poke()

        try:
            self._observer.schedule(Handler(), key, recursive=False)
            self._watched.add(key)
        except OSError as exc:  # inotify limits: the periodic rescan still covers the folder
            log.warning("cannot watch %s (%s); relying on the periodic rescan", folder, exc)

    # -- facts from the store ------------------------------------------------------------

    def _runs(self) -> list[tuple[str, Path]]:
        """Runs and the folders they announced: only absolute folders owned by the run's owner
        (or by root): a client must not point the daemon's deletions at someone else's files."""
        rows = self.conn.execute(
            "SELECT c.run, c.checkpoint_dir, r.owner_uid FROM run_control c JOIN runs r ON r.name = c.run"
            " WHERE c.checkpoint_dir IS NOT NULL").fetchall()
        out = []
        for run, folder, owner in rows:
            path = Path(folder)
            try:
                st = path.lstat()
            except OSError:
                continue  # not there (yet): nothing to do
            if not path.is_absolute() or path.is_symlink() or st.st_uid not in (owner, 0):
                if (run, folder) not in self._refused:
                    self._refused.add((run, folder))
                    log.warning("retention: run %s announced %s, which is not an absolute folder owned by"
                                " uid %s; not managed", run, folder, owner)
                continue
            out.append((run, path))
        return out

    def _last_step(self, run: str) -> int:
        row = self.conn.execute(
            "SELECT MAX(s.step) FROM samples s JOIN streams t ON t.id = s.stream_id"
            " JOIN runs r ON r.id = t.run_id WHERE r.name = ?", (run,)).fetchone()
        return int(row[0]) if row and row[0] is not None else -1

    def _alert_steps(self, run: str) -> list[int]:
        return [s for (s,) in self.conn.execute(
            "SELECT step FROM alert_events WHERE run = ? AND state = 'firing'"
            " AND severity IN ('warning', 'critical') AND rule != 'playbook_escalation'", (run,))]

    def _incidents(self, run: str) -> list[pol.Incident]:
        return [pol.Incident(i, s) for i, s in self.conn.execute(
            "SELECT id, first_step FROM incidents WHERE run = ? AND state != 'resolved'"
            " AND first_step IS NOT NULL", (run,))]

    def _pins(self, run: str) -> set[int]:
        return {s for (s,) in self.conn.execute("SELECT step FROM pins WHERE run = ?", (run,))}

    def _metric_at(self, runs: list[str], policy: pol.Policy, steps: list[int]) -> dict[int, float]:
        """For ``best_n``: rank 0's ``best_metric`` at each checkpoint's step (the last value stored
        at or before it), from the store."""
        if not policy.best_n or not policy.best_metric:
            return {}
        out: dict[int, float] = {}
        for run in runs:
            have, values = store_mod.series(self.conn, run, 0, policy.best_metric)
            if not len(have):
                continue
            for step in steps:
                i = int(np.searchsorted(have, step, side="right")) - 1
                if i >= 0 and step not in out:
                    out[step] = float(values[i])
        return out

    def _ordinals(self, run: str, complete: list[ck.Checkpoint]) -> dict[str, int]:
        """Each complete checkpoint's ordinal among all this run ever had (stable: "every Nth"
        keeps the same ones however many later ones come and go)."""
        known = dict(self.conn.execute(
            "SELECT path, ordinal FROM retention_ordinals WHERE run = ?", (run,)).fetchall())
        nxt = max(known.values(), default=-1) + 1
        with self.conn:
            for c in complete:
                if str(c.path) not in known:
                    known[str(c.path)] = nxt
                    self.conn.execute("INSERT INTO retention_ordinals (run, path, ordinal) VALUES (?, ?, ?)",
                                      (run, str(c.path), nxt))
                    nxt += 1
        return known

    # -- a pass ----------------------------------------------------------------------

    def run_pass(self, only_run: str | None = None, dry_run: bool | None = None) -> PassReport:
        with self._lock:
            report = PassReport()
            policy = self.policy()
            dry = policy.dry_run or not self.enabled if dry_run is None else dry_run
            # Runs that share a folder (a relaunch under a new name into the same output_dir) are
            # planned together: every one's pins, incidents and alerts protect the folder's files.
            groups: dict[Path, list[str]] = {}
            for run, folder in self._runs():
                groups.setdefault(folder, []).append(run)
            for folder, runs in groups.items():
                if only_run is not None and only_run not in runs:
                    continue
                self._watch(folder)
                try:
                    self._pass_folder(sorted(runs), folder, policy, dry, report)
                except (OSError, ck.CheckpointError, ValueError, OverflowError) as exc:
                    report.errors.append(f"{folder}: {exc}")
                    self._count_error("scan")
                    log.warning("retention: %s: %s", folder, exc)
            if self.alert is not None and only_run is None:
                self.alert(report.alerts)  # every pass: what is no longer said resolves
            return report

    def _pass_folder(self, runs: list[str], folder: Path, policy: pol.Policy, dry: bool,
                     report: PassReport) -> None:
        now = self.clock()
        if not dry:
            with self._folder_lock(folder) as held:
                if not held:
                    log.info("retention: %s is locked by another deleter; skipping this pass", folder)
                    return
                self._finish_interrupted(folder, report)
                for run in runs:
                    self._quarantine(run, folder, report)
                self._purge(folder, report)
        found = ck.scan(folder)
        complete = [c for c in found if c.complete]
        # Ordinals belong to the folder (stable whichever run saved into it).
        ordinals = self._ordinals(f"folder:{folder}", complete)
        last = max(self._last_step(r) for r in runs)
        alerts = [s for r in runs for s in self._alert_steps(r)]
        pins = set().union(*(self._pins(r) for r in runs))
        incidents = [i for r in runs for i in self._incidents(r)]
        resume = _resume_target(folder)
        registered: dict[str, float] = {}
        for r in runs:
            registered.update(self.conn.execute("SELECT path, saved_at FROM checkpoints WHERE run = ?", (r,)))
        metric = self._metric_at(runs, policy, [c.step for c in found])
        candidates = []
        for c in found:
            writing = not c.complete or (now - _newest_mtime(c.path)) < self.quiet_seconds
            candidates.append(pol.Candidate(
                path=str(c.path), step=c.step, saved_at=float(registered.get(str(c.path), c.saved_at)),
                size_bytes=c.size_bytes, complete=c.complete, writing=writing,
                health=pol.health(c.step, last, alerts, policy.confirm_steps),
                pinned=c.step in pins, resume_target=resume is not None and c.path == resume,
                ordinal=ordinals.get(str(c.path)), metric=metric.get(c.step)))
        plan = pol.plan(candidates, policy, incidents, now)
        for r in runs:
            report.plans[r] = plan
            self._record(r, candidates, plan, now)
        run = runs[0]
        for incident in plan.no_rollback_target:
            text = f"incident {incident}: no clean checkpoint before it exists in {folder}"
            report.alerts.append({"kind": "no_rollback_target", "run": run, "incident": incident,
                                  "text": text})
        doomed = list(plan.delete)
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(folder).free
            if policy.min_free_bytes and free < policy.min_free_bytes:
                extra, short = pol.thin_for_space(plan, free, policy)
                floor = policy.min_free_bytes / 1e9
                text = f"{folder}: {free / 1e9:.1f} GB free, below the floor of {floor:.1f} GB"
                if short:
                    text += "; only protected or kept checkpoints remain: make room by hand"
                report.alerts.append({"kind": "storage_low", "run": run, "text": text})
                doomed = sorted(set(doomed) | set(extra))
        if self.metrics is not None:
            self.metrics.retention_kept_bytes.labels(run).set(plan.kept_bytes)
            for tier, n in plan.by_tier.items():
                self.metrics.retention_checkpoints.labels(run, tier).set(n)
        if dry or not doomed:
            return
        by_path = {str(c.path): c for c in found}
        with self._folder_lock(folder) as held:
            if not held:
                return
            for path in doomed:
                c = by_path[path]
                try:
                    self._to_trash(c, folder)
                except OSError as exc:
                    report.errors.append(f"{path}: {exc}")
                    self._count_error("delete")
                    report.alerts.append({"kind": "delete_failed", "run": run,
                                          "text": f"could not delete {path}: {exc}; retrying next pass"})
                    continue
                report.deleted.append(path)
                if self.metrics is not None:
                    self.metrics.retention_freed_bytes.inc(c.size_bytes)
                log.info("retention: %s deleted (%s)", path, pol.Reason.NOT_KEPT.value)
            self._purge(folder, report)

    def _record(self, run: str, candidates: list[pol.Candidate], plan: pol.Plan, now: float) -> None:
        health = {c.path: c for c in candidates}
        with self.conn:
            self.conn.execute("DELETE FROM retention WHERE run = ?", (run,))
            self.conn.executemany(
                "INSERT INTO retention (run, path, step, size_bytes, saved_at, health, state, keep, reason,"
                " incident, decided) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(run, d.path, d.step, d.size_bytes, health[d.path].saved_at, health[d.path].health.value,
                  _state(health[d.path]), int(d.keep),
                  d.reason.value.format(incident=d.incident), d.incident, now) for d in plan.decisions])

    # -- deleting safely -------------------------------------------------------------

    @contextlib.contextmanager
    def _folder_lock(self, folder: Path) -> Iterator[bool]:
        """The folder's lock file: one deleter per folder, whichever daemon or tool it is."""
        try:
            fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            log.warning("retention: cannot create the lock file in %s: %s", folder, exc)
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def _to_trash(self, c: ck.Checkpoint, folder: Path) -> None:
        trash = _real_folder(folder / TRASH, folder, create=True)
        marker = MARKERS.get(c.format)
        if marker is not None and (c.path / marker).exists():
            os.rename(c.path / marker, c.path / (marker + DELETING))  # no longer complete, first
        os.rename(c.path, trash / f"{c.path.name}.{time.time_ns()}")

    def _finish_interrupted(self, folder: Path, report: PassReport) -> None:
        """A checkpoint whose marker was renamed by a pass that did not finish goes to the trash."""
        with contextlib.suppress(FileNotFoundError):
            for entry in folder.iterdir():
                if entry.is_dir() and not entry.is_symlink() and not entry.name.startswith(".") and \
                        any((entry / (m + DELETING)).exists() for m in MARKERS.values()):
                    trash = _real_folder(folder / TRASH, folder, create=True)
                    os.rename(entry, trash / f"{entry.name}.{time.time_ns()}")
                    report.deleted.append(str(entry))
                    log.info("retention: finished deleting %s (a pass was interrupted)", entry)

    def _purge(self, folder: Path, report: PassReport) -> None:
        trash = folder / TRASH
        if not trash.exists() and not trash.is_symlink():
            return
        try:
            _real_folder(trash, folder)
        except OSError as exc:
            report.errors.append(str(exc))
            return
        for entry in sorted(trash.iterdir()):
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except OSError as exc:
                n = self._purge_failures[str(entry)] = self._purge_failures.get(str(entry), 0) + 1
                report.errors.append(f"{entry}: {exc}")
                self._count_error("purge")
                log.warning("retention: purging %s failed (%d times): %s", entry, n, exc)
                if n in (1, 10, 100):
                    report.alerts.append({"kind": "purge_failed", "run": None,
                                          "text": f"cannot purge {entry} from the trash ({n} tries): {exc}"})
                continue
            self._purge_failures.pop(str(entry), None)
            report.purged.append(str(entry))

    def _quarantine(self, run: str, folder: Path, report: PassReport) -> None:
        """Move what a rewind abandoned (newer than its target) into abandoned/incident-N/."""
        rows = self.conn.execute(
            "SELECT id, incident_id, result, step FROM commands WHERE run = ? AND action = 'rewind'"
            " AND state = 'applied' AND id NOT IN (SELECT command_id FROM retention_quarantines)",
            (run,)).fetchall()
        pins = self._pins(run)
        for cid, incident, result, applied_step in rows:
            target = json.loads(result or "{}").get("checkpoint_step")
            # Steps count forward through a rewind, so the abandoned line is exactly the steps
            # between the target and the step the rewind was applied before; later ones are new.
            if isinstance(target, int) and target >= 0 and isinstance(applied_step, int):
                dest = folder / ABANDONED / f"incident-{incident if incident is not None else cid}"
                for c in ck.scan(folder):
                    if not target < c.step <= applied_step or c.step in pins:
                        continue
                    try:
                        _real_folder(dest.parent, folder, create=True)
                        dest.mkdir(exist_ok=True)
                        os.rename(c.path, dest / c.path.name)
                    except OSError as exc:
                        report.errors.append(f"{c.path}: {exc}")
                        report.alerts.append({"kind": "quarantine_failed", "run": run,
                                              "text": f"could not quarantine {c.path}: {exc}"})
                        self._count_error("quarantine")
                        continue
                    report.quarantined.append(str(c.path))
                    log.info("retention: %s quarantined to %s (abandoned by rewind to step %d)",
                             c.path, dest, target)
            with self.conn:
                self.conn.execute("INSERT OR IGNORE INTO retention_quarantines (command_id, time)"
                                  " VALUES (?, ?)", (cid, self.clock()))

    def _count_error(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.retention_errors.labels(kind).inc()


# -- helpers ------------------------------------------------------------------------------


def _real_folder(path: Path, folder: Path, create: bool = False) -> Path:
    """``path``, a real folder (not a symlink) directly in ``folder`` with the same owner;
    OSError otherwise. The daemon's trash and quarantine must never lead it elsewhere."""
    if create and not path.exists() and not path.is_symlink():
        path.mkdir()
        os.chown(path, folder.stat().st_uid, folder.stat().st_gid)
    st = path.lstat()
    if path.is_symlink() or not path.is_dir() or st.st_uid != folder.stat().st_uid:
        raise OSError(f"{path}: not a real folder owned like {folder}; refusing to use it")
    return path


def _state(c: pol.Candidate) -> str:
    if c.writing:
        return "writing"
    if c.pinned:
        return "pinned"
    return c.health.value if c.health is not pol.Health.PENDING else "complete"


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir():
        for root, _dirs, files in os.walk(path):
            for name in files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def _resume_target(folder: Path) -> Path | None:
    """Where the trainer would resume from: DeepSpeed's ``latest`` file (a tag naming a folder)
    or Lightning's ``last.ckpt`` (a symlink, or the copy ``save_last`` writes)."""
    latest = folder / "latest"
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if latest.is_file():
            tag = latest.read_text().strip()
            if tag and "/" not in tag:
                return folder / tag
    last = folder / "last.ckpt"
    if last.is_symlink():
        with contextlib.suppress(OSError, ck.CheckpointError):
            return ck.inside(folder, last.resolve())
    if last.is_file():
        return last  # Lightning's save_last writes a full copy: it is what ckpt_path="last" loads
    return None


def ensure_schema(store: Store) -> None:
    """Retention's tables (called at daemon start, with the store's own schema)."""
    with store.conn:
        store.conn.execute(
            "CREATE TABLE IF NOT EXISTS retention (run TEXT NOT NULL, path TEXT NOT NULL, step INTEGER,"
            " size_bytes INTEGER, saved_at REAL, health TEXT, state TEXT, keep INTEGER, reason TEXT,"
            " incident INTEGER, decided REAL, PRIMARY KEY (run, path))")
        store.conn.execute(
            "CREATE TABLE IF NOT EXISTS retention_ordinals (run TEXT NOT NULL, path TEXT NOT NULL,"
            " ordinal INTEGER NOT NULL, PRIMARY KEY (run, path))")
        store.conn.execute(
            "CREATE TABLE IF NOT EXISTS retention_quarantines (command_id INTEGER PRIMARY KEY, time REAL)")
        store.conn.execute(
            "CREATE TABLE IF NOT EXISTS pins (run TEXT NOT NULL, step INTEGER NOT NULL, created REAL,"
            " created_by TEXT, PRIMARY KEY (run, step))")


def decisions(conn: sqlite3.Connection, run: str) -> list[dict[str, Any]]:
    """The last pass's decision for each of ``run``'s checkpoints (any thread, own connection)."""
    cur = conn.execute("SELECT path, step, size_bytes, saved_at, health, state, keep, reason, incident,"
                       " decided FROM retention WHERE run = ? ORDER BY step, path", (run,))
    keys = [d[0] for d in cur.description]
    return [dict(zip(keys, row, strict=True)) for row in cur.fetchall()]
