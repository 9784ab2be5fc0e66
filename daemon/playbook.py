"""The intervention playbook: commands to runs, what runs answer, incidents and their timelines.

It runs on the writer thread, which owns the store, so every decision and its record are
written in one place and survive a restart. Three things drive it:

- rule firings whose actions name an intervention (:meth:`Playbook.on_alerts`);
- events a run sends back (:meth:`Playbook.hook_event`): a checkpoint saved, a command
  applied or failed, a heartbeat while paused;
- people (:meth:`Playbook.request`, from ``runwatch pause|resume|rewind|skip-shard``):
  the run's owner or root only, checked against the connection's peer credentials.

A command is stored, then pushed to every connected rank of its run that has not
acknowledged it (again on every reconnect, so a daemon restart loses none); the hook applies
each ``(origin, id)`` once, at a step boundary agreed by all ranks, and acknowledges it.

What happens when a rule fires is one readable table, :func:`decide`, with a named reason.

A command counts as applied only when every rank applied it: the ranks agree on each
command's outcome over their gloo control group and each reports its own answer plus the
agreed one; on any rank's failure every rank stays paused (see ``runwatch.hooks.control``).

Ownership (multi-node): the daemon that global rank 0 of the run's current launch is
connected to runs the run's playbook and takes people's commands; a command it sends
reaches every rank, on every node, through the ranks' agreement. The other nodes' daemons
still judge their ranks and alert, dump stacks for their own ranks' stalls, and follow the
run's state from what their ranks report (paused, resumed, rewound), but open no incident,
pause nothing and escalate nothing for it.

Launches: a hook names its launch (an id every rank of one start of the run shares). A new
launch under a known run name starts running, never inheriting ``paused``: the processes the
old incident paused are gone. The open incident gets a ``relaunched`` entry and is closed
(its escalation alert resolved, saying so), unapplied commands for the old processes are
superseded, and the new launch gets a fresh playbook. See :meth:`Playbook._relaunched`.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from runwatch.daemon.config import Playbook as PlaybookConfig
from runwatch.daemon.manifest import ManifestError, verify_manifest
from runwatch.daemon.protocol import STATEFUL_ACTIONS
from runwatch.daemon.rules.engine import Event
from runwatch.daemon.store import Store, StreamInfo

log = logging.getLogger("runwatch.playbook")

ESCALATION_RULE = "playbook_escalation"
ACTIONS = ("pause", "resume", "rewind", "dump_batch", "dump_stacks", "skip_shard")
#: Rule actions the playbook acts on (``alert`` is the notifier's).
INTERVENTIONS = frozenset({"pause", "rewind", "dump_batch", "dump_stacks", "skip_shard", "verify_shard",
                           "escalate"})
#: A phase (evaluation, a checkpoint save) holds a run's stall rules for at most this long.
PHASE_MAX_SECONDS = 2 * 3600.0
#: One stack dump per incident in this long, however many ranks' stall rules fire.
STACKS_EVERY_SECONDS = 300.0
#: Unapplied commands older than this are not pushed to a run that connects later.
COMMAND_TTL_SECONDS = 24 * 3600.0
#: Commands that change a run's training state: when one fails on any rank, every rank stays
#: paused (a failed batch dump changes nothing, so training may go on after it).
#: What a daemon that does not own a run's interventions still does for its own ranks.
NODE_LOCAL = frozenset({"dump_stacks"})


class Reason(StrEnum):
    """Why :func:`decide` chose what it chose (written into the incident's timeline)."""

    NEW_INCIDENT_REWIND = "paused; rewinding to the last clean checkpoint"
    NEW_INCIDENT_HOLD = "paused; automatic rewind is off: waiting for a person"
    RECURRED_REWIND = "the fault came back after a rewind; rewinding again with a lower learning rate"
    RECURRED_TOO_OFTEN = ("the fault came back after {rewinds} rewinds: likely numerical or "
                          "architectural; review before resuming")
    RULE_ESCALATES = "the rule escalates at once; staying paused for a person"
    ALREADY_HANDLING = "already paused for this incident; noted"
    DATA_ONLY = "data action; training continues"


@dataclass
class Incident:
    id: int
    run: str
    state: str  # paused | rewinding | watching | escalated | resolved
    rule: str
    first_step: int
    rewinds: int
    watch_from: int | None


@dataclass
class Decision:
    commands: list[str]
    state: str
    reason: Reason
    escalate: bool = False
    fields: dict[str, Any] = field(default_factory=dict)


def decide(incident: Incident | None, actions: set[str], cfg: PlaybookConfig) -> Decision:
    """What to do when a firing names ``actions`` on a run with ``incident`` open (or none).

    ============================  ==========================  ==========================
    open incident                 rule names                  then
    ============================  ==========================  ==========================
    none                          escalate                    pause; escalate
    none, or watching with no     pause or rewind             pause, dump, rewind (auto)
    rewind yet (data actions)                                 or pause and wait (manual)
    none                          only dump/skip_shard        those; keep training
                                  (or dump_stacks)
    watching (after a rewind)     pause or rewind             rewind again, or escalate
                                                              after ``max_rewinds``
    paused/rewinding/escalated    anything                    note it; nothing new
    ============================  ==========================  ==========================
    """
    dump = [a for a in ("dump_stacks", "dump_batch") if a in actions]
    skip = ["skip_shard"] if "skip_shard" in actions else []
    stops = bool(actions & {"pause", "rewind", "escalate"})
    if incident is not None and incident.state in ("paused", "rewinding", "escalated"):
        return Decision([], incident.state, Reason.ALREADY_HANDLING)
    if not stops:
        return Decision(dump + skip, incident.state if incident else "watching", Reason.DATA_ONLY)
    if "escalate" in actions:
        return Decision(["pause", *dump], "escalated", Reason.RULE_ESCALATES, escalate=True)
    if incident is None or incident.rewinds == 0:
        # No rewind yet (maybe a stall's stack dump or a data action opened the incident): a
        # first fault, whatever the incident's state says; the manual/auto choice holds.
        if "rewind" in actions or cfg.auto_rewind:
            return Decision(["pause", *dump, "rewind", *skip], "rewinding", Reason.NEW_INCIDENT_REWIND)
        return Decision(["pause", *dump, *skip], "paused", Reason.NEW_INCIDENT_HOLD)
    if incident.rewinds >= cfg.max_rewinds:
        return Decision(["pause", *dump], "escalated", Reason.RECURRED_TOO_OFTEN, escalate=True,
                        fields={"rewinds": incident.rewinds})
    return Decision(["pause", *dump, "rewind", *skip], "rewinding", Reason.RECURRED_REWIND)


def _where(r: dict[str, Any]) -> str:
    """Where a rank's training thread was, from its stack dump's answer."""
    step = r.get("last_step")
    text = (f"finished step {step}, " + ("inside step" if r.get("began_next_step") else "not yet in step")
            + f" {int(step) + 1 if isinstance(step, int) else '?'}")
    if r.get("phase"):
        text += f", in phase {r['phase']}"
    if r.get("main_thread_in"):
        text += f"; training thread under {r['main_thread_in']}"
    if r.get("main_thread_at") and r.get("main_thread_at") != r.get("main_thread_in"):
        text += f", at {r['main_thread_at']}"
    return text


class ControlRefused(Exception):
    """A person's command the daemon will not send; the message says why."""


class Playbook:
    """Per-run interventions. Writer thread only, except where a method says otherwise."""

    def __init__(
        self,
        store: Store,
        config: Callable[[], PlaybookConfig],
        deliver: Callable[[str, list[tuple[dict[str, Any], set[int]]]], None],
        last_step: Callable[[str], int],
        firing_runs: Callable[[], set[str]],
        clock: Callable[[], float] = time.time,
        confirm_steps: Callable[[], int] = lambda: 50,
        defer: Callable[[Callable[[Any], Any]], Any] | None = None,
        connected_ranks: Callable[[str], int] | None = None,
    ) -> None:
        self.store = store
        self.conn = store.conn
        self.config = config
        self.deliver = deliver
        self.last_step = last_step
        self.firing_runs = firing_runs
        self.clock = clock
        self.confirm_steps = confirm_steps
        self.defer = defer  # runs a function on the writer thread (results of background work)
        # Ranks of a run connected to this daemon: a stack dump is diagnosed once they answered
        # (on a multi-node job this node's ranks; the other nodes' daemons diagnose theirs).
        self.connected_ranks = connected_ranks
        # Unique per store, not only per host: two daemons on one host (or hosts with one name)
        # must not take each other's command ids for their own.
        self.origin = _origin(self.conn)
        self._told_not_owner: set[str] = set()
        self._told_no_commands: set[str] = set()
        self.escalations: dict[str, Event] = {}
        #: Runs paused now; read by the service's clock (replaced whole, never mutated).
        self.paused_runs: frozenset[str] = frozenset(
            r for (r,) in self.conn.execute("SELECT run FROM run_control WHERE state = 'paused'"))
        #: (run, rank) -> (phase, since) for ranks busy in an announced phase (replaced whole).
        self.phases: dict[tuple[str, int], tuple[str, float]] = {}

    def busy_runs(self) -> frozenset[str]:
        """Runs with a rank in a phase (evaluation, saving) begun less than
        ``PHASE_MAX_SECONDS`` ago (any thread)."""
        now = self.clock()
        return frozenset(run for (run, _), (_, since) in self.phases.items()
                         if now - since < PHASE_MAX_SECONDS)

    # -- reading state ----------------------------------------------------------------

    def open_incident(self, run: str) -> Incident | None:
        row = self.conn.execute(
            "SELECT id, run, state, rule, first_step, rewinds, watch_from FROM incidents"
            " WHERE run = ? AND state != 'resolved' ORDER BY id DESC LIMIT 1", (run,)).fetchone()
        return Incident(*row) if row else None

    def pending(self, run: str) -> list[tuple[dict[str, Any], set[int]]]:
        """Commands of ``run``'s current launch still to push, each with the ranks that
        acknowledged it (a command made before the launch began was for processes now gone)."""
        launch = self.launch(run)
        since = max(self.clock() - COMMAND_TTL_SECONDS, launch[1] if launch else 0.0)
        rows = self.conn.execute(
            "SELECT id, action, args, incident_id, created FROM commands WHERE run = ? AND created >= ?"
            " AND state != 'superseded' ORDER BY id", (run, since)).fetchall()
        acks: dict[int, set[int]] = {}
        if rows:
            for cid, rank in self.conn.execute(
                    "SELECT command_id, rank FROM command_acks WHERE command_id >= ?", (rows[0][0],)):
                acks.setdefault(cid, set()).add(rank)
        return [({"origin": self.origin, "id": cid, "run": run, "action": action, "args": json.loads(args),
                  "incident": incident, "created": created}, acks.get(cid, set()))
                for cid, action, args, incident, created in rows]

    def connected(self, stream: StreamInfo, checkpoint_dir: str | None, data_dir: str | None,
                  launch: str | None = None, capabilities: frozenset[str] = frozenset({"commands"}),
                  ) -> tuple[list[tuple[dict[str, Any], set[int]]], list[Event]]:
        """A rank connected: note its folders and launch. Returns the commands to push to it
        (none when its hook cannot take them) and alerts to record (a relaunch resolves an
        escalation)."""
        with self.conn:
            self._run_control(stream.run)
            if checkpoint_dir or data_dir:
                self._run_control(stream.run, checkpoint_dir=checkpoint_dir, data_dir=data_dir)
            events = self._launch(stream, launch or "", capabilities)
        return (self.pending(stream.run) if "commands" in capabilities else []), events

    def launch(self, run: str) -> tuple[str, float, bool, frozenset[str]] | None:
        """The run's current launch: (id, first connected, rank 0 connected here, capabilities)."""
        row = self.conn.execute("SELECT launch, started, rank0_here, capabilities FROM run_launches"
                                " WHERE run = ? ORDER BY started DESC LIMIT 1", (run,)).fetchone()
        if row is None:
            return None
        return row[0], float(row[1]), bool(row[2]), frozenset(filter(None, row[3].split(",")))

    def owns(self, run: str) -> bool:
        """Whether this daemon runs ``run``'s playbook: global rank 0 of its current launch is
        connected here (a run no hook has connected for since this was recorded: yes)."""
        launch = self.launch(run)
        return launch is None or launch[2]

    def _launch(self, stream: StreamInfo, launch: str, capabilities: frozenset[str]) -> list[Event]:
        run, caps = stream.run, ",".join(sorted(capabilities))
        current = self.launch(run)
        rank0 = int(stream.rank == 0)
        if current is not None and launch == current[0]:
            if rank0 or current[3] != capabilities:
                self.conn.execute("UPDATE run_launches SET rank0_here = MAX(rank0_here, ?), capabilities = ?"
                                  " WHERE run = ? AND launch = ?", (rank0, caps, run, launch))
            return []
        if current is not None and (not launch or self.conn.execute(
                "SELECT 1 FROM run_launches WHERE run = ? AND launch = ?", (run, launch)).fetchone()):
            # A rank of an earlier launch (still alive, reconnecting) or a hook that names no
            # launch: it cannot be told apart from the current one, so nothing changes.
            log.warning("run %s: rank %d connected with launch %r, not the current launch %r; the run's "
                        "state is left as it is", run, stream.rank, launch, current[0])
            return []
        self.conn.execute("INSERT INTO run_launches (run, launch, started, rank0_here, world_size,"
                          " capabilities) VALUES (?, ?, ?, ?, ?, ?)",
                          (run, launch, self.clock(), rank0, stream.world_size, caps))
        if current is None:
            return []
        return self._relaunched(stream, current[0], launch)

    def _relaunched(self, stream: StreamInfo, old: str, new: str) -> list[Event]:
        """A new launch of a run this daemon knew: it runs (its processes were never paused);
        the open incident is closed with a ``relaunched`` entry, commands not yet applied by
        the old processes are superseded, and an escalation is resolved, saying why."""
        run, now = stream.run, self.clock()
        superseded = self.conn.execute(
            "UPDATE commands SET state = 'superseded', updated = ? WHERE run = ? AND state = 'pending'",
            (now, run)).rowcount
        before = self.conn.execute("SELECT state FROM run_control WHERE run = ?", (run,)).fetchone()
        # A new process starts at its own learning rate (x1 unless it restores a checkpoint that
        # says otherwise, which its next registration reports).
        self._run_control(run, state="running", step=None, lr_scale=1.0)
        self.phases = {k: v for k, v in self.phases.items() if k[0] != run}
        text = (f"relaunched: launch {new!r} connected (rank {stream.rank} on {stream.host or '?'}); the"
                f" processes of launch {old!r} are gone. The new launch runs"
                + (" (the old one was paused; a new launch is not held)" if before and before[0] == "paused"
                   else "")
                + (f"; {superseded} command(s) the old processes never applied are superseded" if superseded
                   else ""))
        incident = self.open_incident(run)
        if incident is not None:
            self._timeline(incident.id, "relaunched", text + f"; incident closed in state {incident.state}"
                           " (its playbook does not carry over to the new launch)",
                           launch=new, previous=old, state=incident.state)
            self._set_incident(incident.id, state="resolved")
        log.warning("run %s %s", run, text)
        return self._end_escalation(run, f"relaunched as launch {new!r}")

    def restore(self, open_alerts: list[Event]) -> None:
        """Take over escalations a previous daemon left firing."""
        for e in open_alerts:
            if e.rule == ESCALATION_RULE:
                self.escalations[e.run] = e

    # -- writing state ------------------------------------------------------------------

    def _timeline(self, incident_id: int, kind: str, text: str, **detail: Any) -> None:
        now = self.clock()
        self.conn.execute("INSERT INTO incident_events (incident_id, time, kind, text, detail)"
                          " VALUES (?, ?, ?, ?, ?)", (incident_id, now, kind, text, json.dumps(detail)))
        self.conn.execute("UPDATE incidents SET updated = ? WHERE id = ?", (now, incident_id))
        log.info("incident %d: %s: %s", incident_id, kind, text)

    def _set_incident(self, incident_id: int, **values: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        self.conn.execute(f"UPDATE incidents SET {sets}, updated = ? WHERE id = ?",
                          (*values.values(), self.clock(), incident_id))

    def _open(self, run: str, rule: str, rank: int | None, metric: str | None, step: int,
              summary: str) -> Incident:
        now = self.clock()
        cur = self.conn.execute(
            "INSERT INTO incidents (run, opened, updated, state, rule, rank, metric, first_step, summary)"
            " VALUES (?, ?, ?, 'open', ?, ?, ?, ?, ?)", (run, now, now, rule, rank, metric, step, summary))
        return Incident(int(cur.lastrowid or 0), run, "open", rule, step, 0, None)

    def _command(self, run: str, action: str, args: dict[str, Any], by: str,
                 incident_id: int | None) -> int:
        now = self.clock()
        cur = self.conn.execute(
            "INSERT INTO commands (run, action, args, created, created_by, incident_id, state, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, 'pending', ?)",
            (run, action, json.dumps(args), now, by, incident_id, now))
        cid = int(cur.lastrowid or 0)
        if incident_id is not None:
            shown = ", ".join(f"{k}={v}" for k, v in args.items())
            self._timeline(incident_id, "command", f"{action}({shown}) sent by {by}", command=cid,
                           action=action, args=args)
        return cid

    def _run_control(self, run: str, **values: Any) -> None:
        now = self.clock()
        self.conn.execute("INSERT INTO run_control (run, state, updated) VALUES (?, 'running', ?)"
                          " ON CONFLICT (run) DO NOTHING", (run, now))
        if values:
            sets = ", ".join(f"{k} = ?" for k in values)
            self.conn.execute(f"UPDATE run_control SET {sets}, updated = ? WHERE run = ?",
                              (*values.values(), now, run))
        if values.get("state") == "paused":
            self.paused_runs = self.paused_runs | {run}
        elif "state" in values:
            self.paused_runs = self.paused_runs - {run}

    def rewind_args(self, run: str, before_step: int, lr_scale: float, skip: int) -> dict[str, Any] | None:
        """A rewind to the newest clean checkpoint the run registered before ``before_step``, or
        None. Clean as retention means it: no warning or critical alert in the ``confirm_steps``
        after it was saved (the firing that asks for this rewind is already stored, so a
        checkpoint saved just before the spike is suspect and never the target)."""
        row = self.conn.execute(
            "SELECT c.step FROM checkpoints c WHERE c.run = ? AND c.step >= 0 AND c.step < ? AND NOT EXISTS ("
            " SELECT 1 FROM alert_events a WHERE a.run = c.run AND a.state = 'firing'"
            " AND a.severity IN ('warning', 'critical') AND a.rule != ?"
            " AND a.step BETWEEN c.step AND c.step + ?) ORDER BY c.step DESC LIMIT 1",
            (run, before_step, ESCALATION_RULE, self.confirm_steps())).fetchone()
        if row is None:
            return None
        return {"to": int(row[0]), "before_step": before_step, "lr_scale": lr_scale,
                "skip_batches": skip, "resume": True}

    # -- rule firings ------------------------------------------------------------------

    def on_alerts(self, events: list[Event]) -> list[Event]:
        """Act on firings that name interventions; returns escalation alerts to record."""
        out: list[Event] = []
        if not self.config().enabled:
            return out
        with self.conn:
            for e in events:
                actions = set(e.actions) & INTERVENTIONS
                if e.state != "firing" or not actions or e.rule == ESCALATION_RULE:
                    continue
                if not self.owns(e.run):
                    actions &= NODE_LOCAL  # the owner's daemon pauses, rewinds and escalates
                    self._not_owner(e.run, e.rule)
                    if not actions:
                        continue
                elif not self._controllable(e.run):
                    out += self._uncontrolled(e, actions)
                    continue
                out += self._act(e, actions)
        if out or events:
            self._push_touched({e.run for e in events})
        return out

    def _act(self, e: Event, actions: set[str]) -> list[Event]:
        cfg = self.config()
        incident = self.open_incident(e.run)
        decision = decide(incident, actions, cfg)
        if incident is None:
            incident = self._open(e.run, e.rule, e.rank, e.metric, e.step, e.summary)
        value = e.value if math.isfinite(e.value) else str(e.value)
        self._timeline(incident.id, "alert", f"{e.rule} fired on rank {e.rank} at step {e.step}: {e.summary}",
                       rule=e.rule, rank=e.rank, step=e.step, metric=e.metric, value=value,
                       baseline=e.baseline if math.isfinite(e.baseline) else None, shard=e.shard)
        reason = decision.reason.format(**decision.fields) if decision.fields else str(decision.reason)
        self._timeline(incident.id, "decision", reason, commands=decision.commands, state=decision.state)
        escalate = decision.escalate
        for action in decision.commands:
            args: dict[str, Any] = {}
            if action == "rewind":
                found = self.rewind_args(e.run, e.step, cfg.lr_scale, cfg.skip_batches)
                if found is None:
                    reason = (f"no clean checkpoint registered before step {e.step}: nothing to rewind"
                              " to; staying paused for a person")
                    self._timeline(incident.id, "decision", reason)
                    decision.state, escalate = "escalated", True
                    continue
                args = found
            elif action == "skip_shard":
                if e.shard is None:
                    self._timeline(incident.id, "decision", "skip_shard: the alert names no shard")
                    continue
                args = {"shard": int(e.shard)}
            elif action == "dump_batch":
                args = {"incident": incident.id}
            elif action == "dump_stacks":
                args = {"incident": incident.id}
                if self._asked_for_stacks(incident.id):
                    continue  # every rank's stall fires; one dump covers them all
            self._command(e.run, action, args, f"rule {e.rule}", incident.id)
        if "verify_shard" in actions and e.shard is not None:
            self._verify_shard(e.run, incident.id, int(e.shard))
        watching = decision.state == "watching" and incident.watch_from is None
        self._set_incident(incident.id, state=decision.state, **({"watch_from": e.step} if watching else {}))
        # The rule's decisions (stored with its firing) now belong to this incident.
        self.conn.execute("UPDATE decisions SET status = ? WHERE rule = ? AND run = ? AND rank = ?"
                          " AND step = ? AND status = 'pending'",
                          (f"incident {incident.id}", e.rule, e.run, e.rank, e.step))
        if not escalate:
            return []
        text = (reason if decision.reason is not Reason.ALREADY_HANDLING
                else "the run is paused and needs a person")
        return [self._escalation(e, incident.id, text)]

    def _not_owner(self, run: str, rule: str) -> None:
        if run not in self._told_not_owner:
            self._told_not_owner.add(run)
            log.info("run %s: %s fired here, but global rank 0 is connected to another node's daemon,"
                     " which runs this run's playbook; alerting only", run, rule)

    def _controllable(self, run: str) -> bool:
        launch = self.launch(run)
        if launch is None or "commands" in launch[3]:
            return True
        if run not in self._told_no_commands:
            self._told_no_commands.add(run)
            log.warning("run %s: its hooks take no commands (written before the control channel); "
                        "no pause or rewind: a fault that needs one is escalated to a person", run)
        return False

    def _uncontrolled(self, e: Event, actions: set[str]) -> list[Event]:
        """A fault that wants a run stopped, on a run whose hooks take no commands: nothing can
        pause it, so it goes to a person at once (once per incident)."""
        if not actions & {"pause", "rewind", "escalate"}:
            return []
        incident = self.open_incident(e.run)
        if incident is not None and incident.state == "escalated":
            return []
        if incident is None:
            incident = self._open(e.run, e.rule, e.rank, e.metric, e.step, e.summary)
        self._timeline(incident.id, "alert", f"{e.rule} fired on rank {e.rank} at step {e.step}: {e.summary}",
                       rule=e.rule, rank=e.rank, step=e.step, metric=e.metric)
        text = (f"the run's hooks take no commands (runwatch older than the control channel): it cannot be"
                f" paused or rewound ({', '.join(sorted(actions))} wanted); a person must stop it")
        self._timeline(incident.id, "decision", text, commands=[], state="escalated")
        self._set_incident(incident.id, state="escalated")
        self.conn.execute("UPDATE decisions SET status = ? WHERE rule = ? AND run = ? AND rank = ?"
                          " AND step = ? AND status = 'pending'",
                          (f"incident {incident.id}", e.rule, e.run, e.rank, e.step))
        return [self._escalation(e, incident.id, text)]

    def _asked_for_stacks(self, incident_id: int) -> bool:
        return self.conn.execute(
            "SELECT 1 FROM commands WHERE incident_id = ? AND action = 'dump_stacks' AND created > ?",
            (incident_id, self.clock() - STACKS_EVERY_SECONDS)).fetchone() is not None

    def _verify_shard(self, run: str, incident_id: int, shard: int) -> None:
        """Check the shard against the run's data manifest off this thread (hashing a shard can
        take minutes); the result lands in the incident's timeline."""
        row = self.conn.execute("SELECT data_dir FROM run_control WHERE run = ?", (run,)).fetchone()
        if not row or not row[0]:
            self._timeline(incident_id, "verify", f"shard {shard} not verified: the run named no data_dir")
            return
        data_dir, defer = Path(row[0]), self.defer

        def work() -> None:
            try:
                checks = verify_manifest(data_dir, shard)
                bad = [c for c in checks if c.status != "match"]
                text = (f"shard {shard} matches the manifest ({len(checks)} file(s))" if not bad else
                        f"shard {shard} differs from the manifest: "
                        + "; ".join(f"{c.path}: {c.status} ({c.detail})" for c in bad))
                detail: dict[str, Any] = {"shard": shard, "checks": [vars(c) for c in checks]}
            except (ManifestError, OSError) as exc:
                text, detail = f"shard {shard} not verified: {exc}", {"shard": shard}
            if defer is not None:
                defer(lambda _: self._note(incident_id, "verify", text, detail))

        threading.Thread(target=work, name="runwatch-verify-shard", daemon=True).start()

    def _note(self, incident_id: int, kind: str, text: str, detail: dict[str, Any]) -> None:
        with self.conn:
            self._timeline(incident_id, kind, text, **detail)

    def _escalation(self, cause: Event, incident_id: int, text: str) -> Event:
        summary = f"run {cause.run} paused at step {cause.step} (incident {incident_id}): {text}"
        event = Event(rule=ESCALATION_RULE, version="playbook", severity="critical", state="firing",
                      run=cause.run, rank=cause.rank, metric=cause.metric, step=cause.step,
                      sample_time=cause.sample_time, value=cause.value, baseline=cause.baseline,
                      window=cause.window, summary=summary, actions=("alert",),
                      labels={"incident": str(incident_id)}, shard=cause.shard)
        self.escalations[cause.run] = event
        self._timeline(incident_id, "escalated", summary)
        return event

    def _end_escalation(self, run: str, why: str) -> list[Event]:
        e = self.escalations.pop(run, None)
        if e is None:
            return []
        return [replace(e, state="resolved", summary=f"{e.summary} [{why}]")]

    # -- what runs say ----------------------------------------------------------------

    def hook_event(self, stream: StreamInfo, seq: int, event: dict[str, Any]) -> list[Event]:
        """Store an event a hook sent (once per ``seq``) and act on it; returns alerts to record."""
        kind = str(event.get("type", ""))
        now = self.clock()
        if kind == "heartbeat":
            with self.conn:
                self._run_control(stream.run, heartbeat=now)
            return []
        with self.conn:
            cur = self.conn.execute(
                "INSERT OR IGNORE INTO hook_events (stream_id, seq, time, type, body) VALUES (?, ?, ?, ?, ?)",
                (stream.id, seq, now, kind, json.dumps(event)))
            if not cur.rowcount:
                return []  # a replay of an event already handled
            # Acting on it happens in a savepoint: a malformed event is stored as sent and acted on
            # never (no half-applied update), and the connection carries on.
            self.conn.execute("SAVEPOINT act")
            try:
                _check_event(event)
                if kind == "checkpoint":
                    self._checkpoint(stream, event)
                elif kind == "phase":
                    self._phase(stream, event)
                elif kind == "command":
                    out = self._applied(stream, event)
                    self.conn.execute("RELEASE act")
                    return out
                else:
                    log.info("run %s rank %d sent an event of unknown type %r; stored",
                             stream.run, stream.rank, kind)
            except Exception as exc:
                self.conn.execute("ROLLBACK TO act")
                log.warning("run %s rank %d: malformed %s event (%r); stored, not acted on",
                            stream.run, stream.rank, kind, exc)
            self.conn.execute("RELEASE act")
        return []

    def _checkpoint(self, stream: StreamInfo, e: dict[str, Any]) -> None:
        self.conn.execute(
            "INSERT INTO checkpoints (run, step, path, format, size_bytes, saved_at, registered)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run, path) DO UPDATE SET step = excluded.step,"
            " size_bytes = excluded.size_bytes, saved_at = excluded.saved_at",
            (stream.run, int(e["step"]), str(e["path"]), str(e.get("format", "runwatch")),
             int(e.get("size_bytes") or 0), float(e.get("saved_at") or self.clock()), self.clock()))

    def _phase(self, stream: StreamInfo, e: dict[str, Any]) -> None:
        key = (stream.run, stream.rank)
        phases = dict(self.phases)
        if e.get("state") == "begin":
            phases[key] = (str(e.get("phase", "phase")), self.clock())
        else:
            phases.pop(key, None)
        self.phases = phases

    def disconnected(self, stream: StreamInfo) -> None:
        """A rank's connection ended: no phase of its run holds the stall rules any longer (the
        others may be hung in the phase's collective waiting for it)."""
        if any(run == stream.run for run, _ in self.phases):
            self.phases = {k: v for k, v in self.phases.items() if k[0] != stream.run}

    def _applied(self, stream: StreamInfo, e: dict[str, Any]) -> list[Event]:
        """A rank's answer to a command. Every answer is kept (``command_acks``) and a failure
        goes into the timeline as it arrives; the command's own state is set once its outcome
        on all ranks is known: from the outcome the ranks agreed on (every answer carries it), or
        from every rank's answer where they could not agree (no gloo group)."""
        if e.get("origin") != self.origin:
            return self._followed(stream, e)  # the daemon owning the run sent it (another node's)
        cid, own, step = int(e["id"]), str(e.get("state")), e.get("step")
        result = e.get("result") or {}
        if own != "applied":
            result = {**result, "detail": str(e.get("detail") or "no detail")}
        row = self.conn.execute("SELECT action, state, incident_id, run FROM commands WHERE id = ?",
                                (cid,)).fetchone()
        if row is None or row[3] != stream.run:
            return []
        action, before, incident_id, run = row
        self.conn.execute(
            "INSERT OR REPLACE INTO command_acks (command_id, rank, step, state, result, time)"
            " VALUES (?, ?, ?, ?, ?, ?)", (cid, stream.rank, step, own, json.dumps(result), self.clock()))
        if action == "dump_stacks":
            self._stacks_answer(stream, cid, incident_id, own, result)
        elif own != "applied" and incident_id is not None:
            self._timeline(incident_id, "failed", f"{action} failed on rank {stream.rank}: "
                           f"{result['detail']}", command=cid, step=step, rank=stream.rank)
        if before != "pending":
            return []
        state, failed, size = self._outcome(stream, cid, action, own, e)
        if state is None:
            return []  # waiting for the other ranks' answers
        if state != "applied" and own == "applied":
            result = {**result, "detail": f"failed on rank(s) {', '.join(map(str, failed))} (rank"
                                          f" {stream.rank} applied it; every rank's answer is kept)"}
        self.conn.execute("UPDATE commands SET state = ?, step = ?, result = ?, updated = ? WHERE id = ?",
                          (state, step, json.dumps(result), self.clock(), cid))
        out: list[Event] = []
        if state != "applied":
            text = f"{action} failed on rank(s) {', '.join(map(str, failed))} of {size}"
            if action in STATEFUL_ACTIONS:
                self._run_control(run, state="paused", step=step)
                text += "; every rank stays paused"
                if action == "rewind" and len(failed) < size:
                    text += ("; the ranks that applied it now hold the checkpoint's state and the others"
                             " do not, so they refuse to resume until a rewind succeeds on every rank")
            if incident_id is not None:
                self._timeline(incident_id, "outcome", text, command=cid, step=step, failed_ranks=failed)
            if action == "rewind" and incident_id is not None:
                self._set_incident(incident_id, state="escalated")
                fake = self._synthetic(run, stream.rank, step)
                out.append(self._escalation(fake, incident_id, f"rewind failed: {text}"))
            return out
        where = "every rank (the run has one)" if size == 1 else f"every rank (all {size} agreed)"
        if action == "pause":
            self._run_control(run, state="paused", step=step)
            text = f"paused before step {step} on {where}"
        elif action == "resume":
            self._run_control(run, state="running", step=step)
            text = f"resumed at step {step}"
            incident = self.open_incident(run)
            if incident is not None and incident.state in ("paused", "escalated"):
                self._set_incident(incident.id, state="watching", watch_from=step)
            out += self._end_escalation(run, f"resumed by a person at step {step}")
        elif action == "rewind":
            self._run_control(run, state="running" if result.get("resumed") else "paused", step=step,
                              lr_scale=float(result.get("lr_scale", 1.0)))
            text = (f"rewound to the checkpoint of step {result.get('checkpoint_step')}"
                    f" ({result.get('checkpoint')}); learning rate now x{result.get('lr_scale')} of the"
                    f" original; {result.get('skipped_batches', 0)} batches skipped beyond those since"
                    f" the checkpoint; {'resumed' if result.get('resumed') else 'still paused'}"
                    f" at step {step}")
            for refused in result.get("refused", []):
                text += f"; refused {refused}"
            if incident_id is not None:
                self.conn.execute("UPDATE incidents SET rewinds = rewinds + 1 WHERE id = ?", (incident_id,))
                self._set_incident(incident_id, state="watching", watch_from=step)
            out += self._end_escalation(run, f"rewound at step {step}")
        elif action == "dump_batch":
            text = f"dumped {result.get('batches', 0)} batches to {result.get('path')}"
        elif action == "dump_stacks":
            return out  # each rank's answer is in the timeline already
        elif action == "skip_shard":
            text = f"skipping shard {result.get('shard')} from step {step}"
        else:
            text = f"{action} applied at step {step}"
        if incident_id is not None:
            self._timeline(incident_id, "applied", text, command=cid, step=step, result=result)
        return out

    def _outcome(self, stream: StreamInfo, cid: int, action: str, own: str,
                 e: dict[str, Any]) -> tuple[str | None, list[int], int]:
        """(applied | failed | None while unknown, the ranks that failed, how many ranks)."""
        agreed = e.get("all_ranks")
        if isinstance(agreed, dict):
            failed = sorted(int(r) for r in agreed.get("failed", []))
            return ("failed" if failed else "applied"), failed, int(agreed.get("size", stream.world_size))
        size = stream.world_size
        if action == "dump_stacks" or size == 1:
            # Stacks are dumped by each rank on its own (no agreement): the first answer stands.
            return own, ([] if own == "applied" else [stream.rank]), size
        answers = dict(self.conn.execute("SELECT rank, state FROM command_acks WHERE command_id = ?", (cid,)))
        failed = sorted(r for r, st in answers.items() if st != "applied")
        if failed:
            return "failed", failed, size
        # Without the ranks' agreement only this node's ranks answer here: wait for those.
        here = self.connected_ranks(stream.run) if self.connected_ranks else size
        expected = min(size, max(here, 1))
        return ("applied" if len(answers) >= expected else None), [], size

    def _followed(self, stream: StreamInfo, e: dict[str, Any]) -> list[Event]:
        """A rank of this node applied a command of the daemon that owns its run: follow the
        run's state (so this node's stall rules hold while it is paused), act on nothing."""
        action, step, result = str(e.get("action")), e.get("step"), e.get("result") or {}
        agreed = e.get("all_ranks")
        ok = not agreed.get("failed") if isinstance(agreed, dict) else e.get("state") == "applied"
        with_step = {"step": step} if isinstance(step, int) else {}
        if not ok:
            if action in STATEFUL_ACTIONS:
                self._run_control(stream.run, state="paused", **with_step)
        elif action == "pause":
            self._run_control(stream.run, state="paused", **with_step)
        elif action == "resume":
            self._run_control(stream.run, state="running", **with_step)
        elif action == "rewind":
            self._run_control(stream.run, state="running" if result.get("resumed") else "paused",
                              lr_scale=float(result.get("lr_scale", 1.0)), **with_step)
        else:
            return []
        log.info("run %s rank %d: %s from %s %s before step %s", stream.run, stream.rank, action,
                 e.get("origin"), "applied" if ok else "failed", step)
        return []

    def _stacks_answer(self, stream: StreamInfo, cid: int, incident_id: int | None, state: str,
                       result: dict[str, Any]) -> None:
        """Every rank's stack dump goes into the timeline; once all ranks answered, say which
        are behind (finished the fewest steps, or have not begun the next one) and where."""
        if incident_id is None:
            return
        if state != "applied":
            self._timeline(incident_id, "failed", f"rank {stream.rank} could not dump its stacks: "
                           f"{result.get('detail')}", command=cid)
            return
        files = ", ".join(str(Path(str(result.get("path", ""))) / f) for f in result.get("files", []))
        self._timeline(incident_id, "dump", f"rank {stream.rank} stacks: {files}; {_where(result)}",
                       command=cid, rank=stream.rank, result=result)
        answers = {rank: json.loads(body) for rank, body, st in self.conn.execute(
            "SELECT rank, result, state FROM command_acks WHERE command_id = ?", (cid,)) if st == "applied"}
        expected = self.connected_ranks(stream.run) if self.connected_ranks else stream.world_size
        if len(answers) < min(stream.world_size, max(expected, 1)) or self.conn.execute(
                "SELECT 1 FROM incident_events WHERE incident_id = ? AND kind = 'diagnosis' AND"
                " json_extract(detail, '$.command') = ?", (incident_id, cid)).fetchone():
            return

        def progress(r: dict[str, Any]) -> tuple[int, bool]:
            return int(r.get("last_step", -1)), bool(r.get("began_next_step"))

        low = min(progress(r) for r in answers.values())
        behind = sorted(rank for rank, r in answers.items() if progress(r) == low)
        if len(behind) == len(answers):
            text = f"all {len(answers)} ranks are at the same point ({_where(answers[behind[0]])})"
        else:
            waiting = sorted(set(answers) - set(behind))
            def show(ranks: list[int]) -> str:
                return "; ".join(f"rank {r} ({_where(answers[r])})" for r in ranks)

            text = f"behind: {show(behind)} | waiting for them: {show(waiting)}"
        if len(answers) < stream.world_size:
            text += (f" (the {len(answers)} of {stream.world_size} ranks on this node; the other nodes'"
                     " daemons diagnose theirs)")
        self._timeline(incident_id, "diagnosis", text, command=cid, behind=behind)

    def _synthetic(self, run: str, rank: int, step: Any) -> Event:
        return Event(rule=ESCALATION_RULE, version="playbook", severity="critical", state="firing",
                     run=run, rank=rank, metric="", step=int(step or 0), sample_time=self.clock(),
                     value=math.nan, baseline=math.nan, window="", summary="", actions=("alert",))

    # -- people ------------------------------------------------------------------------

    def request(self, run: str, action: str, args: dict[str, Any], uid: int) -> dict[str, Any]:
        """A person's command; refused unless ``uid`` owns the run or is root."""
        if action not in ACTIONS:
            raise ControlRefused(f"unknown action {action!r}; known: {', '.join(ACTIONS)}")
        self.check_owner(run, uid, action)
        launch = self.launch(run)
        if launch is not None and not launch[2]:
            raise ControlRefused(f"run {run!r}: global rank 0 is connected to another node's daemon, which"
                                 " owns its interventions; send the command there (it reaches every rank)")
        if launch is not None and "commands" not in launch[3]:
            raise ControlRefused(f"run {run!r}: its hooks take no commands (a runwatch hook older than the"
                                 " control channel); upgrade runwatch where it trains to control it")
        clean = self._validate(run, action, args)
        with self.conn:
            incident = self.open_incident(run)
            if incident is None and action in ("pause", "rewind", "skip_shard"):
                incident = self._open(run, "person", None, None, self.last_step(run),
                                      f"{action} requested by uid {uid}")
                self._set_incident(incident.id, state="paused" if action == "pause" else "watching")
            cid = self._command(run, action, clean, f"uid {uid}", incident.id if incident else None)
        self._push_touched({run})
        return {"command": cid, "incident": incident.id if incident else None, "args": clean}

    def check_owner(self, run: str, uid: int, action: str) -> None:
        """Refuse (and log) ``action`` on ``run`` unless ``uid`` owns it or is root."""
        owner = self.conn.execute("SELECT owner_uid FROM runs WHERE name = ?", (run,)).fetchone()
        if owner is None:
            raise ControlRefused(f"no run named {run!r}")
        if uid != 0 and uid != owner[0]:
            log.warning("control refused: uid %d asked to %s run %s, which belongs to uid %d",
                        uid, action, run, owner[0])
            raise ControlRefused(f"run {run!r} belongs to uid {owner[0]}; only its owner or root may "
                                 f"{action} it (you are uid {uid})")

    def pin(self, run: str, step: int, uid: int, pinned: bool) -> dict[str, Any]:
        """Pin (or unpin) a run's checkpoint of ``step``: retention never deletes a pinned one."""
        self.check_owner(run, uid, "pin" if pinned else "unpin")
        with self.conn:
            if pinned:
                self.conn.execute("INSERT OR IGNORE INTO pins (run, step, created, created_by)"
                                  " VALUES (?, ?, ?, ?)", (run, step, self.clock(), f"uid {uid}"))
            else:
                self.conn.execute("DELETE FROM pins WHERE run = ? AND step = ?", (run, step))
        return {"run": run, "step": step, "pinned": pinned}

    def _validate(self, run: str, action: str, args: dict[str, Any]) -> dict[str, Any]:
        if action == "rewind":
            to = args.get("to", "last_clean")
            lr_scale = args.get("lr_scale", self.config().lr_scale)
            skip = args.get("skip_batches", 0)
            if not (to == "last_clean" or (isinstance(to, int) and to >= 0)):
                raise ControlRefused(f"--to: a step number or last_clean, not {to!r}")
            if not isinstance(lr_scale, int | float) or not 0 < lr_scale <= 10:
                raise ControlRefused(f"--lr-scale: a factor above 0 and at most 10, not {lr_scale!r}")
            if not isinstance(skip, int) or skip < 0:
                raise ControlRefused(f"--skip: a number of batches (0 or more), not {skip!r}")
            steps = [r[0] for r in self.conn.execute(
                "SELECT step FROM checkpoints WHERE run = ? ORDER BY step", (run,))]
            if isinstance(to, int) and steps and to not in steps:
                raise ControlRefused(f"run {run!r} registered no checkpoint at step {to}; it has: "
                                     + ", ".join(map(str, steps[-20:])))
            resume = bool(args.get("resume", True))
            if to == "last_clean":
                # The newest checkpoint retention calls clean, not merely the newest intact one.
                found = self.rewind_args(run, self.last_step(run) + 1, float(lr_scale), skip)
                to = found["to"] if found else "last_clean"
            return {"to": to, "lr_scale": float(lr_scale), "skip_batches": skip, "resume": resume}
        if action == "skip_shard":
            shard = args.get("shard")
            if not isinstance(shard, int | str) or str(shard) == "":
                raise ControlRefused("skip-shard: name a shard")
            return {"shard": shard}
        return {}

    # -- the clock ---------------------------------------------------------------------

    def tick(self) -> list[Event]:
        """Resolve incidents whose run stayed healthy ``watch_steps`` after a rewind or resume."""
        cfg = self.config()
        firing = self.firing_runs()
        rows = self.conn.execute("SELECT id, run, watch_from FROM incidents WHERE state = 'watching'"
                                 " AND watch_from IS NOT NULL").fetchall()
        with self.conn:
            for incident_id, run, watch_from in rows:
                if run in firing or self.last_step(run) < watch_from + cfg.watch_steps:
                    continue
                self._timeline(incident_id, "resolved",
                               f"healthy for {cfg.watch_steps} steps since step {watch_from}; resolved")
                self._set_incident(incident_id, state="resolved")
        return []

    def _push_touched(self, runs: set[str]) -> None:
        for run in runs:
            pending = self.pending(run)
            if pending:
                self.deliver(run, pending)


def _check_event(event: dict[str, Any]) -> None:
    """Refuse an event whose numbers would not fit the store (ValueError, with what is wrong)."""
    for key in ("step", "id", "size_bytes"):
        value = event.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not -1 <= value < 1 << 62):
            raise ValueError(f"{key}: an integer in range, not {value!r}")
    saved_at = event.get("saved_at")
    if saved_at is not None and (not isinstance(saved_at, int | float) or not math.isfinite(saved_at)):
        raise ValueError(f"saved_at: a finite number, not {saved_at!r}")
    if not isinstance(event.get("result", {}), dict):
        raise ValueError("result: an object")
    agreed = event.get("all_ranks")
    if agreed is not None:
        failed, size = (agreed.get("failed"), agreed.get("size")) if isinstance(agreed, dict) \
            else (None, None)
        if not (isinstance(failed, list) and all(isinstance(r, int) and 0 <= r < 1 << 24 for r in failed)
                and isinstance(size, int) and 1 <= size <= 1 << 24):
            raise ValueError("all_ranks: {failed: [rank, ...], size: world size}")


def _origin(conn: Any) -> str:
    """This daemon's name in the commands it sends: host and an id kept in the store. A store
    that sent commands before the id existed keeps the bare host name, so the answers to
    those commands still match."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'daemon_id'").fetchone()
    if row is None:
        legacy = conn.execute("SELECT 1 FROM commands LIMIT 1").fetchone() is not None
        with conn:
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('daemon_id', ?)",
                         ("" if legacy else uuid.uuid4().hex[:12],))
        row = conn.execute("SELECT value FROM meta WHERE key = 'daemon_id'").fetchone()
    host = socket.gethostname()
    return f"{host}/{row[0]}" if row[0] else host


# -- reads for the CLI (any thread, own connection) -------------------------------------------


def incidents(conn: Any, run: str | None = None, limit: int = 50,
              incident_id: int | None = None) -> list[dict[str, Any]]:
    where, args = ("WHERE id = ?", [incident_id]) if incident_id is not None else \
        ("WHERE run = ?", [run]) if run else ("", [])
    cur = conn.execute(f"SELECT id, run, state, rule, rank, metric, first_step, rewinds, opened, updated,"
                       f" summary FROM incidents {where} ORDER BY id DESC LIMIT ?", (*args, limit))
    keys = [d[0] for d in cur.description]
    return [dict(zip(keys, row, strict=True)) for row in cur.fetchall()]


def incident(conn: Any, incident_id: int) -> dict[str, Any] | None:
    found = incidents(conn, incident_id=incident_id)
    if not found:
        return None
    head = found[0]
    head["timeline"] = [
        {"time": t, "kind": k, "text": text, "detail": json.loads(d)}
        for t, k, text, d in conn.execute(
            "SELECT time, kind, text, detail FROM incident_events WHERE incident_id = ? ORDER BY id",
            (incident_id,))]
    head["commands"] = [
        {"id": cid, "action": a, "args": json.loads(args), "state": s, "step": step,
         "created_by": by, "result": json.loads(r) if r else None}
        for cid, a, args, s, step, by, r in conn.execute(
            "SELECT id, action, args, state, step, created_by, result FROM commands"
            " WHERE incident_id = ? ORDER BY id", (incident_id,))]
    return head


def command(conn: Any, command_id: int) -> dict[str, Any] | None:
    row = conn.execute("SELECT id, run, action, args, state, step, result, created_by FROM commands"
                       " WHERE id = ?", (command_id,)).fetchone()
    if row is None:
        return None
    cid, run, action, args, state, step, result, by = row
    acks = [{"rank": r, "state": s, "step": st,
             **({"detail": json.loads(res or "{}").get("detail")} if s != "applied" else {})}
            for r, s, st, res in conn.execute(
                "SELECT rank, state, step, result FROM command_acks WHERE command_id = ? ORDER BY rank",
                (cid,))]
    return {"id": cid, "run": run, "action": action, "args": json.loads(args), "state": state, "step": step,
            "result": json.loads(result) if result else None, "created_by": by, "acks": acks}


def checkpoints(conn: Any, run: str) -> list[dict[str, Any]]:
    cur = conn.execute("SELECT step, path, format, size_bytes, saved_at, registered FROM checkpoints"
                       " WHERE run = ? ORDER BY step", (run,))
    keys = [d[0] for d in cur.description]
    return [dict(zip(keys, row, strict=True)) for row in cur.fetchall()]


def run_control(conn: Any, run: str) -> dict[str, Any] | None:
    cur = conn.execute("SELECT run, state, step, lr_scale, heartbeat, checkpoint_dir, data_dir, updated"
                       " FROM run_control WHERE run = ?", (run,))
    row = cur.fetchone()
    return dict(zip([d[0] for d in cur.description], row, strict=True)) if row else None
