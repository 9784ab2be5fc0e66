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
(for "every Nth"), pins, quarantines, and what left the folder (``retention_gone``: each entry
in the trash with why it was deleted, each quarantined checkpoint with its incident, each
protected checkpoint that something else deleted), which ``runwatch checkpoints RUN`` lists.

A pass interrupted by a restart (even ``kill -9``) is finished by the next. A checkpoint moved
to the trash is purged. A checkpoint whose marker was renamed but that was not moved yet is
whole (nothing in it was touched): the next pass puts its marker back and decides again, so a
checkpoint pinned or protected in the meantime is kept and one still doomed is deleted.

Protected checkpoints that vanish without runwatch deleting them (Hugging Face's
``save_total_limit``, Lightning's ``save_top_k``, a cleanup script) raise the alert
``retention_protected_checkpoint_lost`` naming the checkpoint and the likely cause; it stays
firing for :data:`LOST_ALERT_SECONDS`.

Fault injection (tests only): ``RUNWATCH_FAULT_RETENTION_HOLD_AFTER=N`` makes a deleting pass
stop for good right after renaming its Nth marker (before moving that checkpoint to the trash),
holding the folder lock as a frozen process would, so a test can ``kill -9`` the daemon at
exactly that point. Never set it in production.
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
#: A protected checkpoint deleted by something else keeps its alert firing this long.
LOST_ALERT_SECONDS = 3600.0
FAULT_HOLD_ENV = "RUNWATCH_FAULT_RETENTION_HOLD_AFTER"
#: The file whose presence makes each format complete: renamed away first on deletion.
MARKERS = {ck.RUNWATCH: ck.MARKER, ck.HUGGINGFACE: ck.HF_TRAINER_STATE, ck.DCP: ck.DCP_METADATA}


@dataclass
class PassReport:
    """What one pass saw and did, per run (for logs, tests and ``runwatch retention plan``)."""

    plans: dict[str, pol.Plan] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    purged: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
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
        self._hold_after = _fault_hold_after()
        self._markers_renamed = 0

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
        self._reconcile_gone(runs)
        previous = [row for r in runs for row in self.conn.execute(
            "SELECT path, step, keep, reason, incident, state FROM retention WHERE run = ?", (r,))]
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
        self._notice_lost(runs, previous, found, pins, incidents, resume, report, now)
        for r in runs:
            report.plans[r] = plan
            self._record(r, candidates, plan, now)
        run = runs[0]
        for r in runs:
            lost = self.conn.execute(
                "SELECT original, reason FROM retention_gone WHERE run = ? AND state = 'lost' AND moved >= ?"
                " ORDER BY moved, original", (r, now - LOST_ALERT_SECONDS)).fetchall()
            if lost:
                text = f"{len(lost)} protected checkpoint(s) of {r} deleted outside runwatch: " + "; ".join(
                    f"{path} ({why})" for path, why in lost)
                report.alerts.append({"kind": "protected_checkpoint_lost", "run": r, "text": text})
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
        why = {d.path: d.text for d in plan.decisions}
        saved = {c.path: c.saved_at for c in candidates}
        with self._folder_lock(folder) as held:
            if not held:
                return
            # Every trash row first, in one transaction (a commit per deletion costs seconds on a
            # loaded disk); a row whose move never happens is dropped by the next pass's reconcile.
            moved = self.clock()
            dest = {path: folder / TRASH / f"{by_path[path].path.name}.{time.time_ns()}" for path in doomed}
            self._gone([(r, str(dest[p]), p, by_path[p].step, by_path[p].size_bytes, saved[p], "trash",
                         why[p], None, moved) for p in doomed for r in runs])
            for path in doomed:
                c = by_path[path]
                try:
                    self._to_trash(c, folder, dest[path])
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

    def _to_trash(self, c: ck.Checkpoint, folder: Path, dest: Path) -> None:
        """Rename ``c``'s marker away, then move it to ``dest`` in the trash. Its ``retention_gone``
        row (what ``runwatch checkpoints`` lists as ``trash``) was written first; dropped on failure."""
        try:
            _real_folder(folder / TRASH, folder, create=True)
            marker = MARKERS.get(c.format)
            if marker is not None and (c.path / marker).exists():
                os.rename(c.path / marker, c.path / (marker + DELETING))  # no longer complete, first
                self._fault_point(c.path)
            os.rename(c.path, dest)
        except OSError:
            with self.conn:
                self.conn.execute("DELETE FROM retention_gone WHERE path = ?", (str(dest),))
            raise

    def _fault_point(self, path: Path) -> None:
        """``RUNWATCH_FAULT_RETENTION_HOLD_AFTER`` (tests only): freeze here, as a hung process would."""
        self._markers_renamed += 1
        if self._hold_after and self._markers_renamed == self._hold_after:
            log.warning("retention: fault injection (%s=%d): holding the pass after renaming the marker of"
                        " %s", FAULT_HOLD_ENV, self._hold_after, path)
            self._stop.wait()
            raise RuntimeError(f"{FAULT_HOLD_ENV}: pass abandoned at {path}")

    def _finish_interrupted(self, folder: Path, report: PassReport) -> None:
        """A checkpoint whose marker a cut-off pass renamed, but did not move, is whole: put its
        marker back (and the folder's mtime, so it is not taken for a write in progress) and let
        this pass decide again: a pin or incident since then must win over the old decision."""
        with contextlib.suppress(FileNotFoundError):
            for entry in folder.iterdir():
                if not entry.is_dir() or entry.is_symlink() or entry.name.startswith("."):
                    continue
                for marker in sorted(set(MARKERS.values())):
                    stale = entry / (marker + DELETING)
                    if not stale.is_file() or stale.is_symlink():
                        continue
                    st = entry.stat()
                    if (entry / marker).exists():
                        stale.unlink()  # its writer completed it again since; the old copy goes
                    else:
                        os.rename(stale, entry / marker)
                    os.utime(entry, ns=(st.st_atime_ns, st.st_mtime_ns))
                    report.restored.append(str(entry))
                    log.info("retention: %s: a pass was cut off after renaming its marker; marker restored,"
                             " deciding again", entry)

    def _purge(self, folder: Path, report: PassReport) -> None:
        trash = folder / TRASH
        if not trash.exists() and not trash.is_symlink():
            return
        try:
            _real_folder(trash, folder)
        except OSError as exc:
            report.errors.append(str(exc))
            return
        purged: list[str] = []
        try:
            self._purge_entries(trash, report, purged)
        finally:
            with self.conn:  # one transaction for the lot
                self.conn.executemany("DELETE FROM retention_gone WHERE path = ?", [(p,) for p in purged])

    def _purge_entries(self, trash: Path, report: PassReport, purged: list[str]) -> None:
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
                with self.conn:
                    self.conn.execute("UPDATE retention_gone SET note = ? WHERE path = ?",
                                      (f"purge failed {n} time(s): {exc}; retried every pass", str(entry)))
                if n in (1, 10, 100):
                    report.alerts.append({"kind": "purge_failed", "run": None,
                                          "text": f"cannot purge {entry} from the trash ({n} tries): {exc}"})
                continue
            self._purge_failures.pop(str(entry), None)
            report.purged.append(str(entry))
            purged.append(str(entry))

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
                        why = f"abandoned by the rewind to step {target}" + (
                            f" (incident {incident})" if incident is not None else "")
                        self._gone([(run, str(dest / c.path.name), str(c.path), c.step, c.size_bytes,
                                     c.saved_at, "abandoned", why, incident, self.clock())])
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
                present = ck.scan(folder)
                kept = next((c for c in present if c.step == target), None)
                # A checkpoint saved after the rewind is what the trainer resumes from now: leave
                # the pointer to it (moving it back would throw that work away on a restart).
                if kept is not None and not any(c.step > applied_step for c in present):
                    try:
                        if moved := _point_resume_at(folder, kept.path):
                            log.info("retention: %s now names %s, the rewind's target", moved, kept.path)
                    except OSError as exc:
                        report.alerts.append({"kind": "quarantine_failed", "run": run,
                                              "text": f"could not point the resume pointer at {kept.path}:"
                                                      f" {exc}"})
                        self._count_error("quarantine")
            with self.conn:
                self.conn.execute("INSERT OR IGNORE INTO retention_quarantines (command_id, time)"
                                  " VALUES (?, ?)", (cid, self.clock()))

    def _gone(self, rows: list[tuple[Any, ...]]) -> None:
        """Record what left a folder: (run, path, original, step, size_bytes, saved_at, state, reason,
        incident, moved) rows of ``retention_gone``."""
        with self.conn:
            self.conn.executemany(
                "INSERT OR REPLACE INTO retention_gone (run, path, original, step, size_bytes, saved_at,"
                " state, reason, incident, moved, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)", rows)

    def _reconcile_gone(self, runs: list[str]) -> None:
        """Drop ``retention_gone`` rows the disk no longer bears out: a trash or quarantine entry
        that is gone (purged by hand, or a move a crash cut off), a lost checkpoint that is back."""
        marks = ",".join("?" * len(runs))
        rows = self.conn.execute(f"SELECT run, path, state FROM retention_gone WHERE run IN ({marks})", runs)
        stale = [(run, path) for run, path, state in rows.fetchall()
                 if os.path.lexists(path) == (state == "lost")]
        if stale:
            with self.conn:
                self.conn.executemany("DELETE FROM retention_gone WHERE run = ? AND path = ?", stale)

    def _notice_lost(self, runs: list[str], previous: list[tuple[Any, ...]], found: list[ck.Checkpoint],
                     pins: set[int], incidents: list[pol.Incident], resume: Path | None, report: PassReport,
                     now: float) -> None:
        """Record each checkpoint the last pass protected that has vanished without runwatch moving
        it, when its protection still holds: its step is pinned (whatever reason came first), it is
        the rollback target of a still open incident, it was the newest complete one and nothing
        newer is complete, or the resume pointer still names it."""
        present = {str(c.path) for c in found}
        ours = {p for (p,) in self.conn.execute(
            f"SELECT original FROM retention_gone WHERE run IN ({','.join('?' * len(runs))})"
            " AND state != 'lost'", runs)} | set(report.quarantined)
        newest = max((c.step for c in found if c.complete), default=None)
        open_incidents = {i.id for i in incidents}
        lost: dict[str, tuple[int, str]] = {}
        for path, step, keep, reason, incident, state in previous:
            if not keep or path in present or path in ours or path in lost:
                continue
            why = _protection(reason, incident)
            if state == "pinned" and step in pins:
                reason = pol.Reason.PINNED.value  # pinned, even when another protection came first
            elif why in (None, pol.Reason.INCOMPLETE, pol.Reason.PINNED) or \
                    (why is pol.Reason.LATEST_COMPLETE and newest is not None and newest >= step) or \
                    (why in (pol.Reason.ROLLBACK_TARGET, pol.Reason.ROLLBACK_TARGET_UNCONFIRMED)
                     and incident not in open_incidents) or \
                    (why is pol.Reason.RESUME_POINTER and resume is not None and str(resume) != path
                     and resume.exists()):
                continue
            lost[path] = (step, f"{reason}; deleted outside runwatch, likely by {_likely_cause(Path(path))}")
        if not lost:
            return
        self._gone([(r, p, p, step, None, None, "lost", why, None, now)
                    for r in runs for p, (step, why) in lost.items()])
        for path, (_step, why) in lost.items():
            report.lost.append(path)
            log.error("retention: protected checkpoint %s vanished: %s", path, why)

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


def _fault_hold_after() -> int:
    """``RUNWATCH_FAULT_RETENTION_HOLD_AFTER`` as a count (0: unset); a clear error otherwise."""
    raw = os.environ.get(FAULT_HOLD_ENV, "").strip()
    if not raw:
        return 0
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 1:
        raise ValueError(f"{FAULT_HOLD_ENV}={raw!r}: must be a positive integer (a fault-injection aid for"
                         " tests: hold a deleting pass after renaming that many markers)")
    return n


def _protection(reason: str, incident: int | None) -> pol.Reason | None:
    """The protection a stored decision text names, or None when a keep policy (or nothing) kept it."""
    for r in pol.PROTECTIONS:
        if reason == r.value.format(incident=incident):
            return r
    return None


def _likely_cause(path: Path) -> str:
    """What most likely deleted a checkpoint runwatch protected, by its format, with the fix."""
    if path.name.startswith("checkpoint-"):
        return ("the Hugging Face Trainer's own rotation (TrainingArguments.save_total_limit deletes the"
                " oldest checkpoint-N folders): set save_total_limit=None and let runwatch's retention own"
                " the folder")
    if path.name.endswith(".ckpt"):
        return ("Lightning's ModelCheckpoint(save_top_k=K), which deletes all but its best K:"
                " set save_top_k=-1 and let runwatch's retention own the folder")
    return "something other than runwatch (a cleanup script, a person, another tool)"


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


def _point_resume_at(folder: Path, target: Path) -> Path | None:
    """After a rewind, make the trainer's resume pointer name the rewind's target, so that a
    restarted trainer resumes from it and not from an abandoned checkpoint. Each pointer is
    replaced atomically (written beside, then renamed). Returns the pointer changed, if any."""
    latest = folder / "latest"
    if latest.is_file() and not latest.is_symlink() and target.parent == folder:
        if latest.read_text().strip() != target.name:
            tmp = folder / ".latest.runwatch-tmp"
            tmp.write_text(target.name)
            os.replace(tmp, latest)
            return latest
        return None
    last = folder / "last.ckpt"
    if target.suffix != ".ckpt" or target == last:
        return None
    if last.is_symlink():
        if os.readlink(last) in (target.name, str(target)):
            return None
        tmp = folder / ".last.ckpt.runwatch-tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(target.name)
        os.replace(tmp, last)
        return last
    if last.is_file():  # save_last's full copy: what ckpt_path="last" loads
        tmp = folder / ".last.ckpt.runwatch-tmp"
        shutil.copy2(target, tmp)
        os.replace(tmp, last)
        return last
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
        # What left the folder: 'trash' (path in .runwatch-trash, until purged), 'abandoned' (path in
        # abandoned/incident-N/), 'lost' (a protected checkpoint deleted outside runwatch; path = original).
        store.conn.execute(
            "CREATE TABLE IF NOT EXISTS retention_gone (run TEXT NOT NULL, path TEXT NOT NULL, original TEXT,"
            " step INTEGER, size_bytes INTEGER, saved_at REAL, state TEXT NOT NULL, reason TEXT,"
            " incident INTEGER, moved REAL, note TEXT, PRIMARY KEY (run, path))")
        store.conn.execute(
            "CREATE TABLE IF NOT EXISTS pins (run TEXT NOT NULL, step INTEGER NOT NULL, created REAL,"
            " created_by TEXT, PRIMARY KEY (run, step))")


def decisions(conn: sqlite3.Connection, run: str) -> list[dict[str, Any]]:
    """The last pass's decision for each of ``run``'s checkpoints (any thread, own connection)."""
    cur = conn.execute("SELECT path, step, size_bytes, saved_at, health, state, keep, reason, incident,"
                       " decided FROM retention WHERE run = ? ORDER BY step, path", (run,))
    keys = [d[0] for d in cur.description]
    return [dict(zip(keys, row, strict=True)) for row in cur.fetchall()]


def gone(conn: sqlite3.Connection, run: str) -> list[dict[str, Any]]:
    """``run``'s checkpoints that left its folder and are still worth listing: in the trash (state
    ``trash``, with why they were deleted and any purge failure in ``note``), quarantined by a
    rewind (``abandoned``, with the incident), or deleted outside runwatch while protected
    (``lost``, with the likely cause), oldest step first."""
    cur = conn.execute("SELECT path, original, step, size_bytes, saved_at, state, reason, incident, moved,"
                       " note FROM retention_gone WHERE run = ? ORDER BY step, path", (run,))
    keys = [d[0] for d in cur.description]
    return [dict(zip(keys, row, strict=True)) for row in cur.fetchall()]
