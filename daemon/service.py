"""The node service: wires ingest → writer/store → live view → exporter, and owns signals.

SIGTERM/SIGINT drain: stop reading, commit and acknowledge what was received, close.
SIGHUP reloads the configuration; settings that need a new socket, store or exporter
address are logged as needing a restart and keep their old value until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import signal
import socket
import sqlite3
import ssl
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, replace
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from runwatch.daemon import __version__, sdnotify
from runwatch.daemon import history as history_mod
from runwatch.daemon import playbook as playbook_mod
from runwatch.daemon import store as store_mod
from runwatch.daemon.config import ConfigError, Settings
from runwatch.daemon.drift import DriftConfig
from runwatch.daemon.exporter import (
    NODE_RUN_PREFIX,
    REJECT_REASONS,
    AlertCollector,
    DaemonMetrics,
    NodeCollector,
    TrainCollector,
    serve,
)
from runwatch.daemon.history import History, Pass
from runwatch.daemon.hostio import HostIO
from runwatch.daemon.ingest import Ingest
from runwatch.daemon.live import LiveView
from runwatch.daemon.monitors import DriftMonitors
from runwatch.daemon.notify.notifier import Notifier
from runwatch.daemon.playbook import ControlRefused, Playbook
from runwatch.daemon.protocol import Block, Samples
from runwatch.daemon.retention import manager as retention_mod
from runwatch.daemon.retention.manager import RetentionManager
from runwatch.daemon.rules.engine import Engine, Event, StreamRef
from runwatch.daemon.rules.reload import RuleSource
from runwatch.daemon.rules.spec import SEVERITY_ORDER
from runwatch.daemon.sampler import Sampler, describe_gpus
from runwatch.daemon.store import DiskReserve, Store, StoreError
from runwatch.daemon.writer import Write, Writer, store_error_kind

log = logging.getLogger("runwatch.daemon")

RESTART_ONLY = ("socket", "socket_mode", "state_dir", "exporter_address", "exporter_port",
                "exporter_enabled", "inflight_bytes", "rules", "rules_enabled")
TICK_SECONDS = 1.0
#: Steps per stream replayed from the store at start, so baselines do not start cold, for
#: streams that sent a step within WARM_SECONDS.
WARM_ROWS = 1024
WARM_SECONDS = 24 * 3600.0


def _json_number(value: float) -> float | str:
    """JSON has no NaN or Inf; a NaN loss is exactly what a user must see, so spell it."""
    return value if math.isfinite(value) else str(value)


def _sample_stored(error: BaseException | None) -> None:
    if error is not None:
        log.warning("a node sample was not stored: %s", error)


def drift_config(settings: Settings) -> DriftConfig:
    """The monitors' settings; the grid (lo, hi) is a placeholder: monitors work on counts."""
    return DriftConfig(lo=0.0, hi=1.0, **settings.drift.model_dump(exclude={"references"}))


#: Arguments several query ops read, and the type each must have when given (a CLI sends these;
#: anything else reaching a handler would fail inside it, or inside SQLite, as an internal error).
_INT_ARGS = ("limit", "id", "step")
_STR_ARGS = ("run", "action", "comment")


def bad_query(request: dict[str, Any]) -> str | None:
    """Why a query's common arguments are unusable (None when they are fine)."""
    op = request.get("op")
    if not isinstance(op, str) or len(op) > 64:
        return "op: give a query op (a short name such as 'status')"
    for name in _INT_ARGS:
        value = request.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not -(2**63) <= value < 2**63):
            return f"{op}: {name} must be an integer (64-bit), not {type(value).__name__}"
    for name in _STR_ARGS:
        value = request.get(name)
        if value is not None and not isinstance(value, str):
            return f"{op}: {name} must be a string, not {type(value).__name__}"
    return None


class StartupError(Exception):
    """The daemon cannot start; the message says what to fix."""


def prepare_socket(path: Path) -> None:
    """Make the socket's folder, refuse to steal a live daemon's socket, clear a stale one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"socket {path}: cannot create folder {path.parent}: {exc.strerror}") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise StartupError(f"socket {path}: folder {path.parent} is not writable by uid {os.geteuid()}")
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise StartupError(f"socket {path}: a file that is not a socket is in the way")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: nobody is listening
        else:
            raise StartupError(f"socket {path}: another runwatch daemon is already listening there")
        finally:
            probe.close()


class Daemon:
    def __init__(self, settings: Settings, reload: Callable[[], Settings] | None = None,
                 config_path: Path | None = None) -> None:
        self.settings = settings
        self._reload = reload
        self._config_path = config_path
        self._started = time.time()
        self.exporter_url: str | None = None

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        s = self.settings
        prepare_socket(s.socket)
        try:
            store = Store.open(s.store_path)
        except StoreError as exc:
            raise StartupError(str(exc)) from None
        self._store = store
        retention_mod.ensure_schema(store)
        self.live = LiveView()
        self._load_live(store)
        self.registry = CollectorRegistry()
        self.metrics = DaemonMetrics(self.registry)
        self.registry.register(TrainCollector(self.live))
        self.engine = Engine(host_io=HostIO(), gpu_state=lambda: describe_gpus(
            self.sampler.latest if self.sampler else None)) if s.rules_enabled else None
        self.rules: RuleSource | None = None

        self.notifier: Notifier | None = None
        self.sampler: Sampler | None = None
        if self.engine is not None:
            try:
                self.notifier = Notifier(s.alerting, s.store_path, self.metrics)
            except (ValueError, OSError, ssl.SSLError) as exc:  # a missing secret, an unreadable CA file
                store.close()
                raise StartupError(f"alerting: {exc}") from None
        ingest: Ingest | None = None
        writer = Writer(store, self.live, self.metrics, lambda results: ingest.notify(results),  # type: ignore[union-attr]
                        engine=self.engine, on_events=self.notifier.submit if self.notifier else None)
        self._writer = writer
        writer.drift = DriftMonitors(lambda: drift_config(self.settings),
                                     lambda: self.settings.drift.references, store.conn)
        writer.reserve = DiskReserve(s.state_dir / "runwatch.reserve", s.store_reserve_mb << 20)
        if not writer.reserve.take():
            writer.reserve.give_up()
            self.metrics.store_full.set(1)
            log.error("store %s: no room to set %d MiB aside for alerts; sample history waits until"
                      " there is", s.store_path, s.store_reserve_mb)
        self.playbook = playbook = Playbook(
            store, lambda: self.settings.playbook, lambda run, cmds: ingest.deliver(run, cmds),  # type: ignore[union-attr]
            self._last_step, self._firing_runs, confirm_steps=lambda: self.settings.retention.confirm_steps,
            defer=lambda fn: self._writer.call(fn),
            connected_ranks=lambda run: sum(1 for st in self.live.snapshot()
                                            if st.info.run == run and st.connections > 0))
        writer.playbook = playbook
        ingest = Ingest(lambda: self.settings, writer, self.live, self.metrics, self.query, playbook)
        self._ingest = ingest
        writer.start()
        self.retention = RetentionManager(
            s.store_path, lambda: self.settings.retention, quiet_seconds=s.retention_quiet_seconds,
            rescan_seconds=s.retention_rescan_seconds, enabled=s.retention_enabled,
            alert=self._retention_alerts, metrics=self.metrics)
        self._retention_firing: dict[tuple[str, str], Event] = {}
        if self.engine is not None:
            engine = self.engine
            self.registry.register(AlertCollector(engine))
            # The engine lives on the writer thread: rule sets are queued to it, in order with the writes.
            self.rules = RuleSource(
                s.rules,
                lambda rules: writer.call(
                    lambda _: writer.guarded(lambda: writer.record(engine.load(rules, time.time())))
                ),
                self.metrics,
            )
            self.rules.load()
            lost = writer.call(lambda store: self._warm_rules(store, engine)).result()
            assert self.notifier is not None
            self.notifier.start(firing=engine.active() + list(playbook.escalations.values()))
            self.notifier.submit(lost)
        exporter = None
        try:
            try:
                await ingest.listen(s.socket, s.socket_mode)
            except OSError as exc:
                raise StartupError(f"socket {s.socket}: cannot listen: {exc.strerror}") from None
            if s.exporter_enabled:
                try:
                    exporter = serve(self.registry, s.exporter_address, s.exporter_port)
                except OSError as exc:
                    raise StartupError(
                        f"exporter {s.exporter_address}:{s.exporter_port}: {exc.strerror}"
                    ) from None
                host = s.exporter_address
                host = f"[{host}]" if ":" in host else host
                self.exporter_url = f"http://{host}:{exporter.server_port}/metrics"
            if self.rules is not None:
                self.rules.watch()
            self.retention.start()
            sampling = asyncio.create_task(self._start_sampler()) if s.sample_interval_seconds > 0 else None
            ticker = asyncio.create_task(self._tick())
            keeping = asyncio.create_task(self._keep_history(History(lambda: self.settings.history)))
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            ready = f"listening on {s.socket}, exporter {self.exporter_url or 'off'}"
            loop.add_signal_handler(signal.SIGHUP, lambda: sdnotify.reloading(self._reload_settings, ready))
            log.info("runwatch %s listening on %s, exporter %s, store %s",
                     __version__, s.socket, self.exporter_url or "off", s.store_path)
            sdnotify.ready(ready)  # systemd (Type=notify): the socket accepts connections from here on
            pinging = sdnotify.Watchdog.start(probe=lambda: writer.call(lambda _: None))
            await stop.wait()
            log.info("draining: no new frames; committing and acknowledging what was received")
            sdnotify.stopping()
            if pinging is not None:
                pinging.cancel()
            ingest.stop_reading()
            if not await ingest.wait_acked(timeout=30):
                log.error("drain timed out; unacknowledged frames will be resent by the hooks")
            await ingest.close_all()
            if ticker is not None:
                ticker.cancel()
            keeping.cancel()
            if sampling is not None:
                sampling.cancel()
        finally:
            if self.rules is not None:
                self.rules.stop()
            self.retention.stop()
            writer.stop()
            if self.notifier is not None:
                self.notifier.stop()
            if self.sampler is not None:
                self.sampler.close()
            store.close()
            if exporter is not None:
                exporter.shutdown()
                exporter.server_close()
            with contextlib.suppress(OSError):
                s.socket.unlink()
        log.info("stopped cleanly")

    def _load_live(self, store: Store) -> None:
        sets = store_mod.metric_sets(store.conn)
        for info in store_mod.streams(store.conn):
            self.live.add_stream(info)
        for stream_id, step, t, set_id, data in store_mod.latest_rows(store.conn):
            self.live.load_row(stream_id, step, t, sets[set_id], data)

    async def _start_sampler(self) -> None:
        """Sample the node every ``sample_interval_seconds`` into its own stream (run
        ``node:<host>``); NVML calls run off the event loop."""
        loop = asyncio.get_running_loop()
        self.sampler = sampler = await loop.run_in_executor(None, Sampler.open)
        host = re.sub(r"[^A-Za-z0-9_.:@+-]", "-", socket.gethostname()) or "localhost"
        info = await asyncio.wrap_future(self._writer.call(lambda store: store.register_stream(
            f"{NODE_RUN_PREFIX}{host}", 0, 1, host, os.getpid(), os.geteuid(), __version__)))
        self.live.add_stream(info)
        self.registry.register(NodeCollector(sampler, self.live))
        seq = 0
        while True:
            sample = await loop.run_in_executor(None, sampler.sample)
            names, values = sample.row()
            if names:
                seq += 1
                block = Block(names, np.array([int(sample.time * 1000)]), np.array([sample.time]),
                              np.array([values], dtype=np.float64))
                self._writer.submit(Write(info, Samples(seq, [block]), _sample_stored))
            await asyncio.sleep(self.settings.sample_interval_seconds)

    async def _tick(self) -> None:
        """Drive the clock-judged rules (``absent``) once a second."""
        while True:
            await asyncio.sleep(TICK_SECONDS)
            # A paused run, or one busy evaluating or saving, sends no steps by design: not a stall.
            held_runs = self.playbook.paused_runs | self.playbook.busy_runs()
            connected = [st.info for st in self.live.snapshot() if st.connections > 0]
            self._writer.tick([i.id for i in connected], [i.id for i in connected if i.run in held_runs])

    async def _keep_history(self, history: History) -> None:
        """Roll up and prune metric history every ``maintenance_seconds``, a bounded chunk per
        writer turn so that a backlog (say, a store from an older version) never stalls ingest."""
        while True:
            await asyncio.sleep(self.settings.history.maintenance_seconds)
            more = True
            while more:
                if self._writer.reserve is not None and self._writer.reserve.full:
                    break  # the disk is full: what is left of it belongs to alerts
                try:
                    done = await asyncio.wrap_future(
                        self._writer.call(lambda store: self._maintain(history, store)))
                except Exception as exc:
                    kind = store_error_kind(exc) if isinstance(exc, sqlite3.Error) else "other"
                    self.metrics.store_errors.labels(kind).inc()
                    log.error("metric history maintenance failed: %s (retried next pass)", exc,
                              exc_info=not isinstance(exc, sqlite3.Error))
                    break
                more = done.more

    def _maintain(self, history: History, store: Store) -> Pass:
        done = history.maintain(store.conn)
        m = self.metrics
        m.history_rows.labels("rolled").inc(done.rolled)
        m.history_rows.labels("pruned_raw").inc(done.pruned_raw)
        m.history_rows.labels("pruned_rollup").inc(done.pruned_rollups)
        conn = store.conn
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        m.store_bytes.labels("file").set(conn.execute("PRAGMA page_count").fetchone()[0] * page)
        m.store_bytes.labels("free").set(conn.execute("PRAGMA freelist_count").fetchone()[0] * page)
        # About the rows not yet rolled (exact unless rows were refused in between); O(1).
        newest = conn.execute("SELECT coalesce(max(rowid), 0) FROM samples").fetchone()[0]
        m.history_backlog.set(max(0, newest - history_mod.watermark(conn)))
        return done

    def _retention_alerts(self, alerts: list[dict[str, Any]]) -> None:
        """The retention manager's findings as alerts: firing while a pass says so, resolved
        at the first pass that no longer does (from the manager's thread)."""
        now = time.time()
        seen: dict[tuple[str, str], Event] = {}
        for a in alerts:
            rule = f"retention_{a['kind']}"
            key = (rule, f"{a.get('run')}:{a.get('incident')}:{a['text'] if 'purge' in rule else ''}")
            seen[key] = Event(rule=rule, version="retention", severity="warning", state="firing",
                              run=a.get("run") or "", rank=0, metric="", step=-1, sample_time=now,
                              value=math.nan, baseline=math.nan, window="", summary=a["text"],
                              actions=("alert",))
        new = [e for k, e in seen.items() if k not in self._retention_firing]
        gone = [replace(e, state="resolved", summary=f"{e.summary} [no longer so]")
                for k, e in self._retention_firing.items() if k not in seen]
        self._retention_firing = {**{k: v for k, v in self._retention_firing.items() if k in seen}, **{
            k: e for k, e in seen.items() if k not in self._retention_firing}}
        if new or gone:
            writer = self._writer
            writer.call(lambda _: writer.guarded(lambda: writer.record(new + gone)))

    def _last_step(self, run: str) -> int:
        return max((st.last_step for st in self.live.snapshot() if st.info.run == run), default=-1)

    def _firing_runs(self) -> set[str]:
        """Runs with a firing alert that would pause them (keeps an incident from resolving)."""
        if self.engine is None:
            return set()
        return {e.run for e in self.engine.active() if set(e.actions) & playbook_mod.INTERVENTIONS}

    def _warm_rules(self, store: Store, engine: Engine) -> list[Event]:
        """Give baselines the last steps from the store, and take over the alerts the last daemon
        left firing: they resolve when a new step says so (nothing fires or pages twice)."""
        sets = store_mod.metric_sets(store.conn)
        recent = time.time() - WARM_SECONDS
        for info in store_mod.streams(store.conn, seen_since=recent):
            ref = StreamRef(info.id, info.run, info.rank, info.host)
            rows = store_mod.recent_rows(store.conn, info.id, WARM_ROWS)
            # Consecutive rows of one metric set are judged as one batch, as the writer does.
            for set_id, group in groupby(rows, key=lambda row: row[2]):
                batch = list(group)
                names = sets[set_id]
                blob = b"".join(r[3] for r in batch)
                values = np.frombuffer(blob, dtype="<f8").reshape(len(batch), len(names))
                steps = np.array([r[0] for r in batch], dtype=np.int64)
                times = np.array([r[1] for r in batch])
                engine.observe(ref, set_id, names, steps, times, values, now=float(times[-1]))
        engine.clear_firing()
        open_alerts = [Event(**row) for row in store_mod.open_alerts(store.conn)]
        self.playbook.restore(open_alerts)
        refs = {(info.run, info.rank): StreamRef(info.id, info.run, info.rank, info.host)
                for info in store_mod.streams(store.conn)}
        now = time.time()
        lost = engine.restore_firing(
            [e for e in open_alerts if e.rule != playbook_mod.ESCALATION_RULE], refs)
        with store.conn:
            for e in lost:
                why = (f"resolved: {e.rule} on {e.run} rank {e.rank}"
                       " [the rule changed or went away while the daemon was down]")
                store.insert_event(now, replace(e, state="resolved", summary=why, actions=()))
        why = "resolved: the rule changed or went away while the daemon was down"
        return [replace(e, state="resolved", summary=why, actions=()) for e in lost]

    def _reload_settings(self) -> None:
        if self.rules is not None:
            self.rules.load()
        if self._reload is None:
            return
        try:
            new = self._reload()
        except ConfigError as exc:
            log.error("SIGHUP: configuration refused, keeping the running one: %s", exc)
            return
        kept = {k: getattr(self.settings, k) for k in RESTART_ONLY
                if getattr(new, k) != getattr(self.settings, k)}
        if kept:
            log.warning("SIGHUP: %s change only after a restart", ", ".join(sorted(kept)))
        self.settings = new.model_copy(update=kept)
        logging.getLogger("runwatch").setLevel(self.settings.log_level.upper())
        log.info("SIGHUP: configuration reloaded")

    # -- queries from the CLI -----------------------------------------------------------

    def query(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if (bad := bad_query(request)) is not None:
            return {"error": bad}
        if op == "status":
            return self.status()
        if op == "runs":
            return {"runs": self.runs(include_gone=bool(request.get("all")))}
        if op == "alerts":
            return self.alerts(limit=int(request.get("limit") or 50), run=request.get("run"))
        if op == "rules":
            return self.rules_status()
        if op in ("silence_add", "silences", "silence_expire", "notifications"):
            return self.notifications(op, request)
        if op == "control":
            return self.control(request)
        if op in ("incidents", "incident", "command", "checkpoints"):
            return self.interventions(op, request)
        if op in ("pin", "unpin"):
            return self.pin(request, op == "pin")
        if op == "retention_plan":
            return self.retention_plan(str(request.get("run")))
        if op in ("drift", "drift_freeze"):
            return self.drift(op, request)
        return {"error": f"unknown query op {op!r}; known: status, runs, alerts, rules, silences,"
                         " silence_add, silence_expire, notifications, control, incidents, incident,"
                         " command, checkpoints, pin, unpin, retention_plan, drift, drift_freeze"}

    def drift(self, op: str, request: dict[str, Any]) -> dict[str, Any]:
        """``runwatch drift list|freeze`` on the writer thread, which owns the monitors; freezing a
        run's reference is for its owner or root."""
        monitors, playbook = self._writer.drift, self.playbook

        def call(_: Store) -> dict[str, Any]:
            if op == "drift_freeze":
                playbook.check_owner(str(request.get("run")), int(request["peer_uid"]), "freeze drift for")
            return monitors.query(op, request)

        try:
            return self._writer.call(call).result(timeout=60)
        except ControlRefused as exc:
            self.metrics.control_refused.inc()
            return {"error": str(exc)}

    def pin(self, request: dict[str, Any], pinned: bool) -> dict[str, Any]:
        run, step = request.get("run"), request.get("step")
        if not isinstance(run, str) or not isinstance(step, int):
            return {"error": "pin: give run (a name) and step (an integer)"}
        uid, playbook = int(request["peer_uid"]), self.playbook
        try:
            reply = self._writer.call(lambda _: playbook.pin(run, step, uid, pinned)).result(timeout=30)
        except ControlRefused as exc:
            self.metrics.control_refused.inc()
            return {"error": str(exc)}
        self.retention.poke()
        return reply

    def retention_plan(self, run: str) -> dict[str, Any]:
        """What the next pass would keep and delete for ``run``, and why (deletes nothing)."""
        report = self.retention.run_pass(only_run=run, dry_run=True)
        plan = report.plans.get(run)
        if plan is None:
            return {"error": f"run {run!r} has told the daemon no checkpoint folder (checkpoint_dir=)"}
        return {"run": run, "delete": plan.delete, "freed_bytes": plan.freed_bytes,
                "kept_bytes": plan.kept_bytes, "by_tier": {k: v for k, v in plan.by_tier.items() if v},
                "decisions": [{"path": d.path, "step": d.step, "keep": d.keep, "size_bytes": d.size_bytes,
                               "reason": d.reason.value.format(incident=d.incident)} for d in plan.decisions],
                "no_rollback_target": plan.no_rollback_target,
                "enabled": self.settings.retention_enabled and not self.settings.retention.dry_run}

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        """A person's pause/resume/rewind/skip_shard/dump_batch; the owner or root only."""
        run, action, args = request.get("run"), request.get("action"), request.get("params") or {}
        if not isinstance(run, str) or not isinstance(action, str) or not isinstance(args, dict):
            return {"error": "control: give run (a name), action and params (an object)"}
        uid = int(request["peer_uid"])
        playbook = self.playbook
        try:
            return self._writer.call(lambda _: playbook.request(run, action, args, uid)).result(timeout=30)
        except ControlRefused as exc:
            self.metrics.control_refused.inc()
            return {"error": str(exc)}

    def interventions(self, op: str, request: dict[str, Any]) -> dict[str, Any]:
        conn = Store.reader(self.settings.store_path)
        try:
            if op == "incidents":
                run = request.get("run")
                return {"incidents": playbook_mod.incidents(conn, run if isinstance(run, str) else None,
                                                            int(request.get("limit") or 50))}
            if op == "checkpoints":
                run = str(request.get("run"))
                return {"run": run, "checkpoints": playbook_mod.checkpoints(conn, run),
                        "control": playbook_mod.run_control(conn, run),
                        "retention": retention_mod.decisions(conn, run),
                        "gone": retention_mod.gone(conn, run)}
            key = request.get("id")
            if not isinstance(key, int):
                return {"error": f"{op}: id must be an integer"}
            found = playbook_mod.incident(conn, key) if op == "incident" else playbook_mod.command(conn, key)
            return {op: found} if found else {"error": f"no {op} with id {key}"}
        finally:
            conn.close()

    def notifications(self, op: str, request: dict[str, Any]) -> dict[str, Any]:
        n = self.notifier
        if n is None:
            return {"error": "alerting is off (rules_enabled = false)"}
        if op == "silence_add":
            matchers = request.get("matchers")
            seconds = request.get("seconds")
            if not isinstance(matchers, dict) or not matchers or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in matchers.items()):
                return {"error": "matchers: give at least one label=value"}
            for label, value in matchers.items():
                if value.startswith("~"):
                    try:
                        re.compile(value[1:])
                    except re.error as exc:
                        return {"error": f"--match {label}={value}: not a regex: {exc}"}
            if not isinstance(seconds, int | float) or not 0 < seconds <= 366 * 86400:
                return {"error": "seconds: a duration between 1 second and a year"}
            who = f"uid {request.get('peer_uid')}"
            return {"id": n.silence(matchers, float(seconds), str(request.get("comment") or ""), who)}
        if op == "silence_expire":
            sid = request.get("id")
            if not isinstance(sid, int):
                return {"error": "id: a silence id (an integer)"}
            return {"expired": n.expire(sid)}
        if op == "silences":
            now = time.time()
            return {"silences": [{**asdict(x), "active": x.active(now)} for x in n.silences()]}
        return {"outbox": n.outbox(int(request.get("limit") or 50)), "counts": n.counts(),
                "receivers": {name: r.config.type for name, r in n.receivers.items()}}

    def alerts(self, limit: int = 50, run: str | None = None) -> dict[str, Any]:
        if self.engine is None:
            return {"enabled": False, "firing": [], "recent": []}
        # Escalations are the playbook's alerts and retention_* the retention manager's, not a rule
        # series': all are firing.
        firing = sorted(self.engine.active() + list(self.playbook.escalations.values())
                        + list(self._retention_firing.values()),
                        key=lambda e: (-SEVERITY_ORDER[e.severity], e.run, e.rank, e.rule))
        conn = Store.reader(self.settings.store_path)
        try:
            recent = store_mod.alert_events(conn, limit=max(1, min(limit, 10_000)), run=run)
        finally:
            conn.close()
        return {
            "enabled": True,
            "firing": [{**{k: _json_number(v) if isinstance(v, float) else v
                           for k, v in asdict(e).items()}, "actions": list(e.actions)}
                       for e in firing if run is None or e.run == run],
            "recent": [{k: _json_number(v) if isinstance(v, float) else v for k, v in r.items()}
                       for r in recent],
        }

    def rules_status(self) -> dict[str, Any]:
        if self.rules is None:
            return {"enabled": False, "rules": [], "errors": []}
        return {
            "enabled": True,
            "paths": [str(p) for p in self.rules.paths],
            "rules": [{"name": lr.rule.name, "version": lr.rule.version, "severity": lr.rule.severity,
                       "file": str(lr.path), "line": lr.line, "actions": list(lr.rule.actions)}
                      for lr in self.rules.rules],
            "errors": [f"{p}:{line}: {reason}" if line else f"{p}: {reason}"
                       for err in self.rules.errors for p, line, reason in err.problems],
        }

    def _sample(self, name: str, labels: dict[str, str] | None = None) -> int:
        return int(self.registry.get_sample_value(name, labels or {}) or 0)

    def status(self) -> dict[str, Any]:
        s = self.settings
        store_bytes = sum(
            p.stat().st_size for p in (s.store_path, Path(f"{s.store_path}-wal")) if p.exists()
        )
        return {
            "daemon": {
                "version": __version__,
                "pid": os.getpid(),
                "uid": os.geteuid(),
                "uptime_seconds": round(time.time() - self._started, 1),
                "socket": str(s.socket),
                "exporter": self.exporter_url,
                "store": str(s.store_path),
                "store_bytes": store_bytes,
                "config": str(self._config_path) if self._config_path else None,
            },
            "ingest": {
                "connections": self._ingest.connections,
                "points_total": self._sample("runwatch_ingest_points_total"),
                "frames_total": self._sample("runwatch_ingest_frames_total"),
                "rejected_frames_total": {
                    r: n for r in REJECT_REASONS
                    if (n := self._sample("runwatch_ingest_rejected_frames_total", {"reason": r}))
                },
            },
            "runs": {"live": len({st.info.run for st in self.live.live(s.live_run_seconds)
                                  if not st.info.run.startswith(NODE_RUN_PREFIX)})},
            "rules": {
                "enabled": self.rules is not None,
                "loaded": len(self.rules.rules) if self.rules else 0,
                "refused_files": len(self.rules.errors) if self.rules else 0,
                "firing": len(self.engine.active()) if self.engine else 0,
            },
            "node": self.node_status(),
            "notify": {
                "receivers": {name: r.config.type for name, r in self.notifier.receivers.items()},
                "outbox": self.notifier.counts(),
            } if self.notifier else None,
        }

    def node_status(self) -> dict[str, Any] | None:
        """The GPUs the sampler reads, with their last readings, or why there are none."""
        sampler = self.sampler
        if sampler is None:
            return None
        latest = sampler.latest
        gpus = [{"index": g.index, "uuid": g.uuid, "name": g.name,
                 **{k: _json_number(v) for k, v in g.values.items()},
                 "processes": [{"pid": pid, "memory_bytes": mem} for pid, mem in g.processes]}
                for g in (latest.gpus if latest else [])]
        return {"gpus": gpus, "no_gpu_reason": sampler.no_gpu_reason,
                "host": {k: _json_number(v) for k, v in (latest.host if latest else {}).items()},
                "sampled_at": latest.time if latest else None}

    def runs(self, include_gone: bool = False) -> list[dict[str, Any]]:
        streams = self.live.snapshot() if include_gone else self.live.live(self.settings.live_run_seconds)
        by_run: dict[str, list[Any]] = defaultdict(list)
        for st in streams:
            if not st.info.run.startswith(NODE_RUN_PREFIX):
                by_run[st.info.run].append(st)
        now = time.time()
        out = []
        for run, ranks in sorted(by_run.items()):
            ranks.sort(key=lambda st: st.info.rank)
            reporting = [st for st in ranks if st.last_step >= 0]
            first = reporting[0] if reporting else ranks[0]
            out.append({
                "run": run,
                "ranks": [st.info.rank for st in ranks],
                "world_size": max(st.info.world_size for st in ranks),
                "connected": sum(1 for st in ranks if st.connections > 0),
                "hosts": sorted({st.info.host for st in ranks}),
                "last_step": max((st.last_step for st in ranks), default=-1),
                "steps_per_second": round(
                    sum(st.steps_per_second for st in reporting) / len(reporting), 3
                ) if reporting else 0.0,
                "seconds_since_last_step": round(now - max(st.last_time for st in ranks), 1)
                if reporting else None,
                "latest": {k: _json_number(v) for k, v in first.latest.items()},
                "latest_rank": first.info.rank,
            })
        return out
