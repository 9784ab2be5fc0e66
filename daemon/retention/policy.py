"""Which checkpoints of a run to keep, which to delete, and why.

Pure decisions: no filesystem and no clock of its own. The retention manager gathers the facts
(the run's checkpoints, their health, its open incidents, the time), asks :func:`plan`, and
carries the :class:`Plan` out; :func:`thin_for_space` says what of it to delete first when the
disk runs short.

:func:`plan` is one readable table (see its docstring). Protections come first and always win;
then the keep policies, OR-ed as Orbax's preservation policies are: a checkpoint that any one
of them keeps is kept. Whatever nothing keeps is deleted.

Words used throughout:

- *complete* means complete and no longer being written: a checkpoint still being written is
  never judged, only kept;
- *newest*, *latest* and *oldest* follow the order ``(step, saved_at, path)``, the order in
  which :func:`runwatch.daemon.checkpoints.scan` lists checkpoints (an unknown step, -1, is
  oldest).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SECONDS_PER_HOUR = 3600.0


class Health(StrEnum):
    """What the alerts around a checkpoint's step say about it (see :func:`health`)."""

    PENDING = "pending"  # the confirmation window has not passed yet
    CLEAN = "clean"  # the window passed without a warning or critical alert
    SUSPECT = "suspect"  # an alert fired inside the window


class Reason(StrEnum):
    """Why :func:`plan` keeps or deletes a checkpoint, in the order it checks them."""

    # Protections: never deleted, whatever the policies say.
    INCOMPLETE = "incomplete or still being written: never touched"
    LATEST_COMPLETE = "the newest complete checkpoint"
    ROLLBACK_TARGET = "rollback target of incident {incident}"
    ROLLBACK_TARGET_UNCONFIRMED = (
        "rollback target of incident {incident}, not yet confirmed clean (no clean checkpoint before it)"
    )
    PINNED = "pinned"
    RESUME_POINTER = "the trainer's resume pointer points at it"
    # Keep policies.
    EVERY_NTH = "every Nth checkpoint: kept for good"
    RECENT = "saved within recent_hours"
    LATEST_K = "one of the latest_k checkpoints that are not suspect"
    EXPLICIT = "its step is listed in steps"
    BEST_N = "one of the best_n by best_metric"
    # Nothing keeps it.
    NOT_KEPT = "no policy keeps it"


#: Reasons that protect a checkpoint: :func:`thin_for_space` never deletes these either.
PROTECTIONS = frozenset(
    {
        Reason.INCOMPLETE,
        Reason.LATEST_COMPLETE,
        Reason.ROLLBACK_TARGET,
        Reason.ROLLBACK_TARGET_UNCONFIRMED,
        Reason.PINNED,
        Reason.RESUME_POINTER,
    }
)


@dataclass(frozen=True)
class Candidate:
    """One checkpoint of a run, as the retention manager knows it.

    ``saved_at`` is the save time the checkpoint records (not its mtime, which a copy or a
    touch changes). ``writing`` is true while it is still being written or not quiet yet.
    ``ordinal`` is its place among all complete checkpoints the run ever registered, 0 for the
    first, assigned once when it is first seen complete and never reused (see
    :attr:`Policy.every_nth`); None when the manager never registered it. ``metric`` is its
    value of :attr:`Policy.best_metric`, None when unknown.
    """

    path: str
    step: int
    saved_at: float
    size_bytes: int
    complete: bool
    writing: bool = False
    health: Health = Health.PENDING
    pinned: bool = False
    resume_target: bool = False
    ordinal: int | None = None
    metric: float | None = None

    @property
    def usable(self) -> bool:
        """Complete and finished: the only checkpoints :func:`plan` judges."""
        return self.complete and not self.writing


@dataclass(frozen=True)
class Incident:
    """An open incident of the run: training went bad at ``first_step``."""

    id: int
    first_step: int


class Policy(BaseModel):
    """What to keep: the ``[retention]`` table of the daemon's TOML config.

    The keep policies are OR-ed: a checkpoint any of them keeps is kept. Protections (see
    :func:`plan`) are not configurable.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Stability: a checkpoint every_nth keeps must stay kept as later ones arrive and older ones
    # are deleted. An index among the checkpoints present now is not stable: deleting one
    # shifts the index of every later one, so the one kept as index 5 becomes index 4 and goes
    # at the next pass. Nor is ``step % (every_nth * save_interval)``: it needs the interval
    # fixed for the life of the run, and on-demand saves, a changed interval or a rewind break
    # it. The ordinal among all complete checkpoints ever registered (Candidate.ordinal) never
    # changes once given, so ``ordinal % every_nth == 0`` picks the same checkpoints on every
    # pass, whatever was deleted in between: 0 (the first), N, 2N, ... counting from the oldest.
    every_nth: int = Field(
        default=5,
        ge=0,
        description="Keep for good every Nth complete checkpoint the run ever registered "
        "(ordinals 0, N, 2N, ...); 0 turns it off.",
    )
    recent_hours: float = Field(
        default=24.0, ge=0, description="Keep every checkpoint saved within this many hours; 0 turns it off."
    )
    latest_k: int = Field(
        default=3, ge=0, description="Keep the newest K complete checkpoints that are not suspect."
    )
    steps: list[int] = Field(default_factory=list, description="Keep the checkpoints of these steps.")
    best_n: int = Field(default=0, ge=0, description="Keep the N best checkpoints by best_metric.")
    best_metric: str | None = Field(default=None, description="The metric best_n ranks by.")
    best_mode: Literal["min", "max"] = Field(
        default="min", description="Whether lower (min) or higher (max) best_metric is better."
    )
    confirm_steps: int = Field(
        default=50,
        ge=0,
        description="Steps after a save without a warning or critical alert that make it clean.",
    )
    min_free_bytes: int = Field(
        default=0,
        ge=0,
        description="Below this much free space, delete what no policy keeps at once; 0 turns it off.",
    )
    dry_run: bool = Field(default=False, description="Say what would be deleted; delete nothing.")

    @model_validator(mode="after")
    def _best_needs_metric(self) -> Policy:
        if self.best_n and not self.best_metric:
            raise ValueError("best_n needs best_metric (the metric to rank checkpoints by)")
        return self


@dataclass(frozen=True)
class Decision:
    """What :func:`plan` decided for one checkpoint. ``incident`` is set for rollback targets."""

    path: str
    step: int
    keep: bool
    reason: Reason
    size_bytes: int = 0
    incident: int | None = None

    @property
    def protected(self) -> bool:
        return self.reason in PROTECTIONS

    @property
    def text(self) -> str:
        """The reason as a person reads it: ``rollback target of incident 7``."""
        return self.reason.format(incident=self.incident)


@dataclass(frozen=True)
class Plan:
    """The decisions of one pass, oldest first, and what carrying them out would do.

    ``delete`` lists the paths to delete, oldest first; ``by_tier`` counts the decisions per
    reason (``Reason.X.name.lower()``, every reason present, 0 when none). ``rollback_targets``
    maps each open incident to the checkpoint kept to roll back to; ``no_rollback_target``
    lists the incidents that have none (the caller alerts).
    """

    decisions: list[Decision]
    delete: list[str]
    kept_bytes: int
    freed_bytes: int
    by_tier: dict[str, int]
    rollback_targets: dict[int, str]
    no_rollback_target: list[int]


def health(saved_step: int, last_step: int, alert_steps: Sequence[int], confirm_steps: int) -> Health:
    """The health of a checkpoint saved at ``saved_step`` when the run has reached ``last_step``.

    ``alert_steps`` are the steps of the run's warning and critical alerts (the caller leaves
    info alerts out). Suspect when one fell in ``[saved_step, saved_step + confirm_steps]``;
    else clean once the run has trained past that window; else pending.
    """
    end = saved_step + confirm_steps
    if any(saved_step <= s <= end for s in alert_steps):
        return Health.SUSPECT
    return Health.CLEAN if last_step >= end else Health.PENDING


def _order(c: Candidate) -> tuple[int, float, str]:
    return (c.step, c.saved_at, c.path)


def _rollback_targets(
    usable: list[Candidate], incidents: Iterable[Incident]
) -> tuple[dict[int, tuple[str, bool]], list[int]]:
    """Per incident: (path, confirmed clean) of the checkpoint to roll back to; and those with none.

    The newest clean checkpoint before the incident; failing that, the newest pending one (it
    may yet prove clean, and is better than nothing). Never a suspect one.
    """
    targets: dict[int, tuple[str, bool]] = {}
    missing: list[int] = []
    for incident in sorted(incidents, key=lambda i: i.id):
        before = [c for c in usable if c.step < incident.first_step]
        clean = [c for c in before if c.health is Health.CLEAN]
        pending = [c for c in before if c.health is Health.PENDING]
        if clean:
            targets[incident.id] = (clean[-1].path, True)
        elif pending:
            targets[incident.id] = (pending[-1].path, False)
        else:
            missing.append(incident.id)
    return targets, missing


def _best(usable: list[Candidate], policy: Policy) -> set[str]:
    if not policy.best_n:
        return set()
    sign = 1.0 if policy.best_mode == "min" else -1.0
    # On equal metrics the newer checkpoint wins: it trained longer for the same result.
    ranked = sorted(
        (sign * c.metric, -c.step, -c.saved_at, c.path)
        for c in usable
        if c.health is not Health.SUSPECT and c.metric is not None and not math.isnan(c.metric)
    )
    return {path for *_, path in ranked[: policy.best_n]}


def plan(candidates: Iterable[Candidate], policy: Policy, incidents: Iterable[Incident], now: float) -> Plan:
    """Decide, for each of a run's checkpoints, whether to keep it and why.

    ``incidents`` are the run's open incidents only; ``now`` is the time ``saved_at`` is
    measured against. The first row that holds decides:

    ======================================================  ===============================
    check                                                   reason
    ======================================================  ===============================
    not complete, or still being written                    INCOMPLETE (kept, never touched)
    the newest complete checkpoint                          LATEST_COMPLETE
    per open incident, the newest clean one before its      ROLLBACK_TARGET
    first step (none clean: the newest pending one)         ROLLBACK_TARGET_UNCONFIRMED
    pinned                                                  PINNED
    the trainer's resume pointer points at it               RESUME_POINTER
    ``ordinal % every_nth == 0``                            EVERY_NTH
    saved within ``recent_hours`` of ``now`` (or later)     RECENT
    among the ``latest_k`` newest that are not suspect      LATEST_K
    its step is in ``steps``                                EXPLICIT
    among the ``best_n`` best by metric, not suspect        BEST_N
    otherwise                                               NOT_KEPT (deleted)
    ======================================================  ===============================

    Raises ValueError when two candidates share a path.
    """
    ordered = sorted(candidates, key=_order)
    if len({c.path for c in ordered}) != len(ordered):
        raise ValueError("two checkpoints share a path")
    usable = [c for c in ordered if c.usable]
    newest = usable[-1].path if usable else None
    targets, missing = _rollback_targets(usable, incidents)
    # One checkpoint may be the target of several incidents: name a confirmed one, lowest id first.
    target_of: dict[str, tuple[int, bool]] = {}
    for incident_id, (path, confirmed) in sorted(targets.items(), key=lambda t: (not t[1][1], t[0])):
        target_of.setdefault(path, (incident_id, confirmed))
    not_suspect = [c for c in usable if c.health is not Health.SUSPECT]
    latest_k = {c.path for c in not_suspect[max(0, len(not_suspect) - policy.latest_k) :]}
    explicit = set(policy.steps)
    best = _best(usable, policy)
    recent_after = now - policy.recent_hours * SECONDS_PER_HOUR

    decisions: list[Decision] = []
    for c in ordered:
        target = target_of.get(c.path)
        table: tuple[tuple[bool, Reason], ...] = (
            (not c.usable, Reason.INCOMPLETE),
            (c.path == newest, Reason.LATEST_COMPLETE),
            (target is not None and target[1], Reason.ROLLBACK_TARGET),
            (target is not None, Reason.ROLLBACK_TARGET_UNCONFIRMED),
            (c.pinned, Reason.PINNED),
            (c.resume_target, Reason.RESUME_POINTER),
            (
                policy.every_nth > 0 and c.ordinal is not None and c.ordinal % policy.every_nth == 0,
                Reason.EVERY_NTH,
            ),
            (policy.recent_hours > 0 and c.saved_at >= recent_after, Reason.RECENT),
            (c.path in latest_k, Reason.LATEST_K),
            (c.step in explicit, Reason.EXPLICIT),
            (c.path in best, Reason.BEST_N),
        )
        reason = next((r for hit, r in table if hit), Reason.NOT_KEPT)
        rollback = reason in (Reason.ROLLBACK_TARGET, Reason.ROLLBACK_TARGET_UNCONFIRMED)
        decisions.append(
            Decision(
                c.path,
                c.step,
                keep=reason is not Reason.NOT_KEPT,
                reason=reason,
                size_bytes=c.size_bytes,
                incident=target[0] if rollback and target else None,
            )
        )

    by_tier = {r.name.lower(): 0 for r in Reason}
    for d in decisions:
        by_tier[d.reason.name.lower()] += 1
    return Plan(
        decisions=decisions,
        delete=[d.path for d in decisions if not d.keep],
        kept_bytes=sum(d.size_bytes for d in decisions if d.keep),
        freed_bytes=sum(d.size_bytes for d in decisions if not d.keep),
        by_tier=by_tier,
        rollback_targets={i: path for i, (path, _) in targets.items()},
        no_rollback_target=missing,
    )


def thin_for_space(plan: Plan, free_bytes: int, policy: Policy) -> tuple[list[str], bool]:
    """Under storage pressure, the checkpoints to delete to get back to ``min_free_bytes``.

    Only checkpoints ``plan`` marks NOT_KEPT, oldest first, and no more than needed: a
    protected or policy-kept checkpoint is never deleted to make room. Returns the paths and
    ``short``: true when deleting every one of them still leaves less than ``min_free_bytes``
    free (then only kept checkpoints remain, and the caller says so loudly). Nothing to do,
    ``([], False)``, when free space is at or above the floor or the floor is 0 (off).
    """
    floor = policy.min_free_bytes
    if floor <= 0 or free_bytes >= floor:
        return [], False
    chosen: list[str] = []
    free = free_bytes
    for d in plan.decisions:
        if free >= floor:
            break
        if d.reason is Reason.NOT_KEPT:
            chosen.append(d.path)
            free += d.size_bytes
    return chosen, free < floor
