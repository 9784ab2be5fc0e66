"""Checkpoint retention decisions (daemon/retention/policy.py): one scenario per reason, then
random training timelines checked against a plain oracle, over several passes whose deletions
are carried out: nothing protected is ever deleted, every open incident keeps its rollback
target, and what every_nth keeps stays kept."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from runwatch.daemon.retention.policy import (
    Candidate,
    Decision,
    Health,
    Incident,
    Plan,
    Policy,
    Reason,
    health,
    plan,
    thin_for_space,
)

CLEAN, PENDING, SUSPECT = Health.CLEAN, Health.PENDING, Health.SUSPECT
NOW = 1_000_000.0
HOUR = 3600.0
#: Every keep policy off: each table test turns on only the one it is about.
OFF = Policy(every_nth=0, recent_hours=0, latest_k=0)


def ck(step: int, **kw: object) -> Candidate:
    """A complete, finished, clean checkpoint of ``step``, saved long before NOW."""
    return replace(Candidate(f"step-{step}", step, float(step), 100, True, health=CLEAN), **kw)  # type: ignore[arg-type]


def decided(p: Plan) -> dict[str, Decision]:
    return {d.path: d for d in p.decisions}


def reasons(p: Plan) -> dict[int, Reason]:
    return {d.step: d.reason for d in p.decisions}


# -- health -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("saved", "last", "alerts", "confirm", "want"),
    [
        (100, 120, [], 50, PENDING),  # the window [100, 150] has not passed
        (100, 150, [], 50, CLEAN),  # it just has
        (100, 400, [99, 151], 50, CLEAN),  # alerts just outside the window
        (100, 400, [100], 50, SUSPECT),  # on the save step itself
        (100, 400, [150], 50, SUSPECT),  # on the last step of the window
        (100, 110, [105], 50, SUSPECT),  # suspect even before the window has passed
        (100, 100, [], 0, CLEAN),  # no window: clean at once
    ],
)
def test_health(saved: int, last: int, alerts: list[int], confirm: int, want: Health) -> None:
    assert health(saved, last, alerts, confirm) is want


# -- one scenario per reason --------------------------------------------------------------


def test_incomplete_and_writing_are_never_touched() -> None:
    p = plan([ck(10, complete=False), ck(20, writing=True), ck(30), ck(40)], OFF, [], NOW)
    d = decided(p)
    assert (d["step-10"].reason, d["step-10"].keep) == (Reason.INCOMPLETE, True)
    assert (d["step-20"].reason, d["step-20"].keep) == (Reason.INCOMPLETE, True)
    assert d["step-10"].text == "incomplete or still being written: never touched"
    assert p.delete == ["step-30"]


def test_latest_complete_even_when_suspect_and_a_newer_one_is_being_written() -> None:
    p = plan([ck(10), ck(20, health=SUSPECT), ck(30, writing=True)], OFF, [], NOW)
    assert reasons(p) == {10: Reason.NOT_KEPT, 20: Reason.LATEST_COMPLETE, 30: Reason.INCOMPLETE}
    assert decided(p)["step-20"].keep


def test_rollback_target_is_the_newest_clean_one_before_the_incident() -> None:
    cands = [ck(10), ck(20), ck(30, health=SUSPECT), ck(40, health=PENDING), ck(60), ck(70)]
    p = plan(cands, OFF, [Incident(7, first_step=50)], NOW)
    d = decided(p)["step-20"]
    assert (d.keep, d.reason, d.incident) == (True, Reason.ROLLBACK_TARGET, 7)
    assert d.text == "rollback target of incident 7"
    assert p.rollback_targets == {7: "step-20"} and p.no_rollback_target == []
    assert p.delete == ["step-10", "step-30", "step-40", "step-60"]


def test_rollback_target_unconfirmed_when_nothing_before_is_clean() -> None:
    cands = [ck(10, health=SUSPECT), ck(20, health=PENDING), ck(30, health=PENDING), ck(40, health=SUSPECT)]
    p = plan([*cands, ck(90)], OFF, [Incident(3, first_step=45)], NOW)
    d = decided(p)["step-30"]
    assert (d.keep, d.reason, d.incident) == (True, Reason.ROLLBACK_TARGET_UNCONFIRMED, 3)
    assert "not yet confirmed clean" in d.text and "incident 3" in d.text
    assert p.rollback_targets == {3: "step-30"}


def test_no_rollback_target_when_everything_before_is_suspect() -> None:
    p = plan([ck(10, health=SUSPECT), ck(20, writing=True), ck(90)], OFF, [Incident(4, first_step=50)], NOW)
    assert p.rollback_targets == {} and p.no_rollback_target == [4]
    assert reasons(p)[10] is Reason.NOT_KEPT


def test_one_target_for_two_incidents_names_the_lower_id() -> None:
    p = plan([ck(10), ck(90)], OFF, [Incident(9, first_step=50), Incident(8, first_step=60)], NOW)
    assert decided(p)["step-10"].incident == 8 and p.rollback_targets == {8: "step-10", 9: "step-10"}


def test_pinned() -> None:
    p = plan([ck(10, pinned=True), ck(20), ck(30)], OFF, [], NOW)
    assert reasons(p) == {10: Reason.PINNED, 20: Reason.NOT_KEPT, 30: Reason.LATEST_COMPLETE}


def test_resume_pointer() -> None:
    p = plan([ck(10, resume_target=True), ck(20), ck(30)], OFF, [], NOW)
    assert (decided(p)["step-10"].reason, decided(p)["step-10"].keep) == (Reason.RESUME_POINTER, True)


def test_every_nth_by_ordinal_and_stable_when_others_go() -> None:
    policy = OFF.model_copy(update={"every_nth": 2})
    cands = [ck(10 * i, ordinal=i) for i in range(6)] + [ck(100)]  # ordinal None: never every_nth
    p = plan(cands, policy, [], NOW)
    kept = {d.step for d in p.decisions if d.reason is Reason.EVERY_NTH}
    assert kept == {0, 20, 40}
    assert p.delete == ["step-10", "step-30", "step-50"]
    # Once the odd ones are gone the same ones are kept, and the next ones continue the count.
    survivors = [c for c in cands if c.path not in p.delete] + [ck(110, ordinal=6), ck(120, ordinal=7)]
    again = plan(survivors, policy, [], NOW)
    assert {d.step for d in again.decisions if d.reason is Reason.EVERY_NTH} == {0, 20, 40, 110}
    assert again.delete == ["step-100"]


def test_recent_window_includes_its_edge_and_future_times() -> None:
    policy = OFF.model_copy(update={"recent_hours": 1.0})
    cands = [ck(10, saved_at=NOW - HOUR - 1), ck(20, saved_at=NOW - HOUR), ck(30, saved_at=NOW + 5), ck(40)]
    p = plan(cands, policy, [], NOW)
    assert reasons(p) == {
        10: Reason.NOT_KEPT,
        20: Reason.RECENT,
        30: Reason.RECENT,
        40: Reason.LATEST_COMPLETE,
    }


def test_latest_k_slots_are_not_filled_by_suspect_ones() -> None:
    policy = OFF.model_copy(update={"latest_k": 3})
    cands = [ck(10), ck(20, health=PENDING), ck(30), ck(40, health=SUSPECT), ck(50, writing=True), ck(60)]
    assert reasons(plan(cands, policy, [], NOW)) == {
        10: Reason.NOT_KEPT,
        20: Reason.LATEST_K,
        30: Reason.LATEST_K,
        40: Reason.NOT_KEPT,
        50: Reason.INCOMPLETE,
        60: Reason.LATEST_COMPLETE,
    }


def test_explicit_steps() -> None:
    p = plan([ck(10), ck(20), ck(30)], OFF.model_copy(update={"steps": [20, 999]}), [], NOW)
    assert reasons(p) == {10: Reason.NOT_KEPT, 20: Reason.EXPLICIT, 30: Reason.LATEST_COMPLETE}


# min: 1.0 and 2.0; max: 9.0 and 3.0 (pending is not suspect, so it counts).
@pytest.mark.parametrize(("mode", "want"), [("min", {20, 40}), ("max", {10, 70})])
def test_best_n_skips_unknown_nan_and_suspect(mode: str, want: set[int]) -> None:
    policy = OFF.model_copy(update={"best_n": 2, "best_metric": "loss", "best_mode": mode})
    cands = [
        ck(10, metric=3.0),
        ck(20, metric=1.0),
        ck(30, metric=0.1, health=SUSPECT),  # the best number, but suspect
        ck(40, metric=2.0),
        ck(50, metric=None),
        ck(60, metric=math.nan),
        ck(70, metric=9.0, health=PENDING),
        ck(80),
    ]
    p = plan(cands, policy, [], NOW)
    assert {d.step for d in p.decisions if d.reason is Reason.BEST_N} == want


def test_not_kept_and_totals() -> None:
    cands = [
        ck(30, size_bytes=3),
        ck(10, size_bytes=1),
        ck(20, size_bytes=2, pinned=True),
        ck(40, size_bytes=4),
    ]
    p = plan(cands, OFF, [], NOW)
    d = decided(p)["step-10"]
    assert (d.keep, d.reason, d.text) == (False, Reason.NOT_KEPT, "no policy keeps it")
    assert [d.step for d in p.decisions] == [10, 20, 30, 40]  # oldest first
    assert p.delete == ["step-10", "step-30"]
    assert (p.freed_bytes, p.kept_bytes) == (4, 6)
    assert p.by_tier["not_kept"] == 2 and p.by_tier["pinned"] == 1 and p.by_tier["latest_complete"] == 1
    assert sum(p.by_tier.values()) == 4 and set(p.by_tier) == {r.name.lower() for r in Reason}


def test_protections_win_over_policies_and_first_row_names_the_reason() -> None:
    policy = Policy(every_nth=1, recent_hours=1000, latest_k=5, steps=[10, 20])
    p = plan(
        [ck(10, pinned=True, ordinal=0), ck(20, resume_target=True, ordinal=1), ck(30, ordinal=2)],
        policy,
        [],
        NOW,
    )
    assert reasons(p) == {10: Reason.PINNED, 20: Reason.RESUME_POINTER, 30: Reason.LATEST_COMPLETE}


def test_empty_and_duplicate_paths() -> None:
    p = plan([], Policy(), [Incident(1, 10)], NOW)
    assert (p.decisions, p.delete, p.no_rollback_target) == ([], [], [1])
    with pytest.raises(ValueError, match="share a path"):
        plan([ck(10), ck(20, path="step-10")], Policy(), [], NOW)


# -- the [retention] config table ---------------------------------------------------------


def test_policy_from_toml_and_refusals() -> None:
    data = tomllib.loads("""
        [retention]
        every_nth = 10
        recent_hours = 6.5
        steps = [1000, 2000]
        best_n = 2
        best_metric = "loss"
    """)
    policy = Policy(**data["retention"])
    assert (policy.every_nth, policy.recent_hours, policy.steps, policy.best_n) == (10, 6.5, [1000, 2000], 2)
    assert (Policy().latest_k, Policy().confirm_steps, Policy().min_free_bytes, Policy().dry_run) == (
        3,
        50,
        0,
        False,
    )
    with pytest.raises(ValidationError):
        Policy(keep_all=True)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="best_metric"):
        Policy(best_n=1)
    with pytest.raises(ValidationError):
        Policy(latest_k=-1)
    with pytest.raises(ValidationError):
        policy.every_nth = 3  # type: ignore[misc]


# -- thin_for_space -----------------------------------------------------------------------


def test_thin_for_space_table() -> None:
    cands = [
        ck(10, size_bytes=5),
        ck(20, size_bytes=7, pinned=True),
        ck(30, size_bytes=3),
        ck(40, size_bytes=9),
    ]
    p = plan(cands, OFF, [], NOW)  # NOT_KEPT: 10 (5 bytes), 30 (3 bytes)
    floor = OFF.model_copy(update={"min_free_bytes": 100})
    assert thin_for_space(p, 100, floor) == ([], False)  # at the floor: nothing to do
    assert thin_for_space(p, 0, OFF) == ([], False)  # floor 0: off
    assert thin_for_space(p, 96, floor) == (["step-10"], False)  # oldest first, no more than needed
    assert thin_for_space(p, 92, floor) == (["step-10", "step-30"], False)
    assert thin_for_space(p, 91, floor) == (["step-10", "step-30"], True)  # 99 < 100: short
    protected_only = plan([ck(10, pinned=True), ck(20)], OFF, [], NOW)
    assert thin_for_space(protected_only, 0, floor) == ([], True)


# -- random candidate sets against a plain oracle -----------------------------------------


def oracle(
    cands: list[Candidate], policy: Policy, incidents: list[Incident], now: float
) -> dict[str, Reason]:
    """The reason of every path, each protection and policy computed on its own, plainly."""

    def newest(cs: list[Candidate]) -> Candidate:
        return max(cs, key=lambda c: (c.step, c.saved_at, c.path))

    usable = [c for c in cands if c.complete and not c.writing]
    tiers: list[tuple[Reason, set[str]]] = [(Reason.INCOMPLETE, {c.path for c in cands if c not in usable})]
    tiers.append((Reason.LATEST_COMPLETE, {newest(usable).path} if usable else set()))
    confirmed, unconfirmed = set(), set()
    for inc in incidents:
        clean = [c for c in usable if c.step < inc.first_step and c.health is CLEAN]
        pending = [c for c in usable if c.step < inc.first_step and c.health is PENDING]
        if clean:
            confirmed.add(newest(clean).path)
        elif pending:
            unconfirmed.add(newest(pending).path)
    tiers.append((Reason.ROLLBACK_TARGET, confirmed))
    tiers.append((Reason.ROLLBACK_TARGET_UNCONFIRMED, unconfirmed))
    tiers.append((Reason.PINNED, {c.path for c in usable if c.pinned}))
    tiers.append((Reason.RESUME_POINTER, {c.path for c in usable if c.resume_target}))
    every = set()
    if policy.every_nth:
        every = {c.path for c in usable if c.ordinal is not None and c.ordinal % policy.every_nth == 0}
    tiers.append((Reason.EVERY_NTH, every))
    recent = set()
    if policy.recent_hours:
        recent = {c.path for c in usable if now - c.saved_at <= policy.recent_hours * HOUR}
    tiers.append((Reason.RECENT, recent))
    healthy = sorted(
        (c for c in usable if c.health is not SUSPECT), key=lambda c: (c.step, c.saved_at, c.path)
    )
    latest_k = healthy[-policy.latest_k :] if policy.latest_k else []
    tiers.append((Reason.LATEST_K, {c.path for c in latest_k}))
    tiers.append((Reason.EXPLICIT, {c.path for c in usable if c.step in policy.steps}))
    scored = [
        c for c in usable if c.health is not SUSPECT and c.metric is not None and not math.isnan(c.metric)
    ]
    better = -1 if policy.best_mode == "max" else 1
    scored.sort(key=lambda c: (better * c.metric, -c.step, -c.saved_at, c.path))  # type: ignore[operator]
    tiers.append((Reason.BEST_N, {c.path for c in scored[: policy.best_n]}))
    return {c.path: next((r for r, paths in tiers if c.path in paths), Reason.NOT_KEPT) for c in cands}


PROTECTED = {
    Reason.INCOMPLETE,
    Reason.LATEST_COMPLETE,
    Reason.ROLLBACK_TARGET,
    Reason.ROLLBACK_TARGET_UNCONFIRMED,
    Reason.PINNED,
    Reason.RESUME_POINTER,
}

policies = st.builds(
    Policy,
    every_nth=st.integers(0, 4),
    recent_hours=st.sampled_from([0.0, 0.5, 2.0]),
    latest_k=st.integers(0, 3),
    steps=st.lists(st.integers(0, 30).map(lambda k: 50 * k), max_size=4),
    best_n=st.integers(0, 2),
    best_metric=st.just("loss"),
    best_mode=st.sampled_from(["min", "max"]),
    confirm_steps=st.integers(0, 200),
)


# Arbitrary checkpoints: repeated steps and save times, odd ordinals, any flags; candidate_sets
# gives each its own path.
candidates = st.builds(
    Candidate,
    path=st.just(""),
    step=st.sampled_from([-1, 0, 10, 20, 30, 40, 50, 60, 70, 80]),
    saved_at=st.sampled_from([NOW, NOW - 600.0, NOW - HOUR, NOW - 3 * HOUR, NOW + 60.0]),
    size_bytes=st.integers(0, 50),
    complete=st.booleans(),
    writing=st.sampled_from([True, False, False, False]),
    health=st.sampled_from(list(Health)),
    pinned=st.sampled_from([True] + [False] * 5),
    resume_target=st.sampled_from([True] + [False] * 5),
    ordinal=st.none() | st.integers(0, 10),
    metric=st.none() | st.sampled_from([0.0, 1.0, 2.0, math.nan]),
)


def candidate_sets() -> st.SearchStrategy[list[Candidate]]:
    return st.lists(candidates, max_size=12).map(
        lambda cs: [replace(c, path=f"c{i}") for i, c in enumerate(cs)]
    )


@settings(max_examples=300, deadline=None)
@given(
    cands=candidate_sets(),
    policy=policies,
    incidents=st.lists(st.builds(Incident, id=st.integers(1, 6), first_step=st.integers(0, 90)), max_size=3),
)
def test_plan_matches_the_oracle(cands: list[Candidate], policy: Policy, incidents: list[Incident]) -> None:
    incidents = list({i.id: i for i in incidents}.values())
    p = plan(cands, policy, incidents, NOW)
    want = oracle(cands, policy, incidents, NOW)
    assert {d.path: d.reason for d in p.decisions} == want
    assert all(d.keep == (d.reason is not Reason.NOT_KEPT) for d in p.decisions)
    assert set(p.delete) == {path for path, r in want.items() if r is Reason.NOT_KEPT}
    by_path = {c.path: c for c in cands}
    assert p.delete == sorted(p.delete, key=lambda path: (by_path[path].step, by_path[path].saved_at, path))
    assert p.freed_bytes == sum(by_path[path].size_bytes for path in p.delete)
    assert p.kept_bytes + p.freed_bytes == sum(c.size_bytes for c in cands)
    for d in p.decisions:
        if d.reason in (Reason.ROLLBACK_TARGET, Reason.ROLLBACK_TARGET_UNCONFIRMED):
            assert p.rollback_targets[d.incident] == d.path  # type: ignore[index]
        else:
            assert d.incident is None


@settings(max_examples=300, deadline=None)
@given(cands=candidate_sets(), policy=policies, free=st.integers(0, 300), floor=st.integers(0, 300))
def test_thin_for_space_never_takes_a_kept_one(
    cands: list[Candidate], policy: Policy, free: int, floor: int
) -> None:
    policy = policy.model_copy(update={"min_free_bytes": floor})
    p = plan(cands, policy, [], NOW)
    paths, short = thin_for_space(p, free, policy)
    sizes = {d.path: d.size_bytes for d in p.decisions}
    assert paths == p.delete[: len(paths)]  # only NOT_KEPT ones, oldest first
    deletable = sum(sizes[path] for path in p.delete)
    assert short == (free < floor and free + deletable < floor)
    if free >= floor:
        assert paths == []
    elif not short:
        assert free + sum(sizes[x] for x in paths) >= floor  # enough...
        assert free + sum(sizes[x] for x in paths[:-1]) < floor  # ...and no more than needed
    else:
        assert paths == p.delete


# -- random timelines over several passes -------------------------------------------------


@dataclass
class Saved:
    """The test's model of one checkpoint on disk."""

    path: str
    step: int
    saved_at: float
    size: int
    complete: bool
    writing: bool
    metric: float | None
    ordinal: int | None = None
    pinned: bool = False


class Timeline:
    """A run as the retention manager sees it: steps go up, saves land, alerts fire, incidents
    open and close, people pin, the trainer moves its resume pointer, the clock runs; a pass
    plans and carries out the deletions. Each pass checks the plan's promises."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.step = 0
        self.clock = NOW
        self.disk: dict[str, Saved] = {}
        self.alerts: list[int] = []
        self.open: dict[int, int] = {}  # incident id -> first step
        self.next_incident = 1
        self.next_ordinal = 0
        self.resume: str | None = None
        self.ever_every_nth: set[str] = set()
        self.had_clean_target: set[int] = set()  # open incidents a pass saw a clean target for
        self.deleted: set[str] = set()

    def _pick(self, items: list[str], k: int) -> str | None:
        return sorted(items)[k % len(items)] if items else None

    def _register(self, s: Saved) -> None:
        s.ordinal, self.next_ordinal = self.next_ordinal, self.next_ordinal + 1

    def apply(self, event: tuple[object, ...]) -> None:
        kind, *args = event
        if kind == "save":
            how, gap, size, metric, seconds = args
            self.step = -(-(self.step + gap) // 50) * 50  # saves land on multiples of 50, as policy.steps
            self.clock += seconds
            # partial: a save that died half-way, incomplete and quiet for good.
            s = Saved(
                f"step-{self.step:06d}",
                self.step,
                self.clock,
                size,
                how == "complete",
                how == "writing",
                metric,
            )
            self.disk[s.path] = s
            if s.complete:
                self._register(s)
        elif kind == "finish":  # a save still being written completes (its ordinal comes now)
            path = self._pick([p for p, s in self.disk.items() if s.writing], args[0])
            if path:
                s = self.disk[path]
                s.complete, s.writing, s.saved_at = True, False, self.clock
                self._register(s)
        elif kind == "alert":  # an alert at a new step (alerts come in step order)
            self.step += args[0]
            self.alerts.append(self.step)
        elif kind == "advance":
            self.step += args[0]
        elif kind == "clock":
            self.clock += args[0]
        elif kind == "open":
            self.open[self.next_incident] = max(0, self.step - args[0])
            self.next_incident += 1
        elif kind == "close":
            if (i := self._pick([str(i) for i in self.open], args[0])) is not None:
                del self.open[int(i)]
                self.had_clean_target.discard(int(i))
        elif kind == "pin":
            if path := self._pick(list(self.disk), args[0]):
                self.disk[path].pinned = not self.disk[path].pinned
        elif kind == "resume":
            self.resume = self._pick(
                [p for p, s in self.disk.items() if s.complete and not s.writing], args[0]
            )
        elif kind == "pass":
            self.run_pass()

    def candidates(self) -> list[Candidate]:
        return [
            Candidate(
                path=s.path,
                step=s.step,
                saved_at=s.saved_at,
                size_bytes=s.size,
                complete=s.complete,
                writing=s.writing,
                health=health(s.step, self.step, self.alerts, self.policy.confirm_steps),
                pinned=s.pinned,
                resume_target=s.path == self.resume,
                ordinal=s.ordinal,
                metric=s.metric,
            )
            for s in self.disk.values()
        ]

    def run_pass(self) -> None:
        cands = self.candidates()
        incidents = [Incident(i, first) for i, first in self.open.items()]
        p = plan(cands, self.policy, incidents, self.clock)
        want = oracle(cands, self.policy, incidents, self.clock)
        d = {x.path: x for x in p.decisions}
        delete = set(p.delete)
        usable = [c for c in cands if c.complete and not c.writing]

        # (1) nothing protected is deleted; (3) in particular nothing incomplete.
        assert not delete & {path for path, r in want.items() if r in PROTECTED}
        assert not delete & {c.path for c in cands if not c.complete or c.writing}
        assert not delete & {c.path for c in cands if c.pinned or c.resume_target}
        if usable:
            assert max(usable, key=lambda c: c.step).path not in delete
        # (4) the keep set is the union of what each protection and policy keeps on its own.
        assert {x.path for x in p.decisions if x.keep} == {
            path for path, r in want.items() if r is not Reason.NOT_KEPT
        }
        assert {x.path: x.reason for x in p.decisions} == want
        # (2) every open incident keeps the newest clean checkpoint before it, when one is here.
        for i, first in self.open.items():
            clean = [c for c in usable if c.step < first and c.health is CLEAN]
            if clean:
                target = max(clean, key=lambda c: c.step).path
                assert p.rollback_targets[i] == target
                assert d[target].keep and d[target].reason in (Reason.LATEST_COMPLETE, Reason.ROLLBACK_TARGET)
                self.had_clean_target.add(i)
            else:
                # (5) ... and no pass ever deleted the last clean one while the incident was open.
                assert i not in self.had_clean_target, f"incident {i} lost its clean rollback target"
        # (5) what every_nth kept once is never deleted later; nor is any every-Nth ordinal.
        assert not delete & self.ever_every_nth
        if self.policy.every_nth:
            nth = {c.path for c in usable if c.ordinal is not None and c.ordinal % self.policy.every_nth == 0}
            assert not delete & nth
        self.ever_every_nth |= {x.path for x in p.decisions if x.reason is Reason.EVERY_NTH}
        assert not delete & self.deleted  # a deleted checkpoint never comes back

        for path in p.delete:  # carry the plan out
            del self.disk[path]
        self.deleted |= delete


saves = st.tuples(
    st.just("save"),
    st.sampled_from(["complete"] * 6 + ["writing", "partial"]),
    st.integers(1, 100),  # steps since the last event
    st.integers(1, 100),  # size
    st.none() | st.floats(0, 5, allow_nan=False),  # metric
    st.sampled_from([0.0, 600.0, 1800.0, 3600.0]),  # seconds it took
)
others = st.one_of(
    st.tuples(st.just("finish"), st.integers(0, 9)),
    st.tuples(st.just("alert"), st.integers(1, 60)),
    st.tuples(st.just("advance"), st.integers(1, 150)),
    st.tuples(st.just("clock"), st.sampled_from([60.0, 1800.0, 7200.0])),
    st.tuples(st.just("open"), st.integers(0, 200)),
    st.tuples(st.just("close"), st.integers(0, 9)),
    st.tuples(st.just("pin"), st.integers(0, 9)),
    st.tuples(st.just("resume"), st.integers(0, 9)),
    st.tuples(st.just("pass")),
)
# Rounds of a save and what happens until the next one: a flat list of events drawn evenly
# holds too few saves for the policies to have anything to delete.
timelines = st.lists(st.tuples(saves, st.lists(others, max_size=4)), min_size=3, max_size=40).map(
    lambda rounds: [event for save, rest in rounds for event in (save, *rest)]
)


@settings(max_examples=300, deadline=None)
@given(policy=policies, timeline=timelines)
def test_random_timelines_over_passes(policy: Policy, timeline: list[tuple[object, ...]]) -> None:
    run = Timeline(policy)
    for event in timeline:
        run.apply(event)
    run.run_pass()  # and always at least one pass, on whatever the events left


def test_a_clean_target_survives_later_saves_and_passes() -> None:
    """The scenario the timeline property guards, spelled out: an incident at step 500 keeps
    the clean step-300 checkpoint through passes in which newer checkpoints come and go."""
    policy = Policy(every_nth=0, recent_hours=0, latest_k=1, confirm_steps=50)
    run = Timeline(policy)
    for event in [
        ("save", "complete", 100, 10, None, 0.0),
        ("save", "complete", 100, 10, None, 0.0),
        ("save", "complete", 100, 10, None, 0.0),
        ("advance", 200),
        ("open", 0),
        ("pass",),
    ]:
        run.apply(event)
    assert set(run.disk) == {"step-000300"}  # the rollback target (and the latest)
    for _ in range(3):
        for event in [("save", "complete", 100, 10, None, 0.0), ("advance", 100), ("pass",)]:
            run.apply(event)
    assert "step-000300" in run.disk and 1 in run.had_clean_target
    p = plan(run.candidates(), policy, [Incident(1, 500)], run.clock)
    assert replace(decided(p)["step-000300"], size_bytes=0) == Decision(
        "step-000300", 300, True, Reason.ROLLBACK_TARGET, 0, 1
    )
