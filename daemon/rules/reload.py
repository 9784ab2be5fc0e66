"""Where the daemon's rules come from: loaded at start, reloaded when a file is saved.

Saving a file in a rules folder takes effect without a restart (watchdog, debounced). A file
with an error is refused with file, line and reason, logged and exported
(``runwatch_rules_file_errors``), and the rules it held before keep running.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from runwatch.daemon.exporter import DaemonMetrics
from runwatch.daemon.rules.spec import LoadedRule, RuleError, load_rules

log = logging.getLogger("runwatch.rules")

DEBOUNCE_SECONDS = 0.25
_CHANGES = {"created", "modified", "deleted", "moved", "closed"}


class RuleSource:
    """The rule files in force. ``apply`` receives each new rule set (on the caller's thread)."""

    def __init__(
        self, paths: list[Path], apply: Callable[[list[LoadedRule]], None], metrics: DaemonMetrics
    ) -> None:
        self.paths = paths
        self.rules: list[LoadedRule] = []
        self.errors: list[RuleError] = []
        self._apply = apply
        self._metrics = metrics
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._error_files: set[str] = set()
        self._timer_lock = threading.Lock()
        self._stopped = False

    def load(self) -> list[RuleError]:
        """(Re)load every file; refused files keep their previous rules. Returns the refusals."""
        with self._lock:
            rules, errors = load_rules(self.paths, previous=self.rules)
            self.rules, self.errors = rules, errors
            self._apply(rules)
            counts: dict[str, int] = {}
            for err in errors:
                for path, _line, _reason in err.problems:
                    counts[str(path)] = counts.get(str(path), 0) + 1
                log.error("rule file refused; its previous rules (if any) keep running:\n%s", err)
            for gone in self._error_files - set(counts):
                self._metrics.rule_file_errors.labels(gone).set(0)
            for file, n in counts.items():
                self._metrics.rule_file_errors.labels(file).set(n)
            self._error_files = set(counts)
            self._metrics.rules_loaded.set(len(rules))
            self._metrics.rule_reloads.labels("refused" if errors else "ok").inc()
            log.info(
                "rules: %d in force from %s%s",
                len(rules),
                ", ".join(map(str, self.paths)),
                f"; {len(errors)} file(s) refused" if errors else "",
            )
            return errors

    def watch(self) -> None:
        """Reload on every save under the rule paths, until :meth:`stop`."""
        handler = _Handler(self._schedule)
        observer = Observer()
        folders = {p if p.is_dir() else p.parent for p in self.paths if p.exists()}
        for folder in folders:
            observer.schedule(handler, str(folder), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        """Stop watching; no reload starts after this returns."""
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        with self._timer_lock:
            self._stopped = True
            if self._timer is not None:
                self._timer.cancel()
        with self._lock:  # wait for a reload in progress
            pass

    def _schedule(self) -> None:
        # Editors write a file in several events (truncate, write, rename): reload once after.
        with self._timer_lock:
            if self._stopped:
                return
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(DEBOUNCE_SECONDS, self._reload_quietly)
            self._timer.daemon = True
            self._timer.start()

    def _reload_quietly(self) -> None:
        if self._stopped:
            return
        try:
            self.load()
        except Exception:
            log.exception("rule reload failed; the previous rules keep running")


class _Handler(FileSystemEventHandler):
    def __init__(self, changed: Callable[[], None]) -> None:
        self._changed = changed

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _CHANGES or event.is_directory:
            return
        names = [str(event.src_path), str(getattr(event, "dest_path", "") or "")]
        if any(n.endswith((".yaml", ".yml")) for n in names):
            self._changed()
