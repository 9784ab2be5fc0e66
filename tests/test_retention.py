"""The retention manager on real folders: each checkpoint format, writes in progress, the trash,
interrupted passes, protections and a rewind's quarantine. The facts (runs, alerts, incidents,
pins, commands) are rows in a real store, as the daemon writes them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from runwatch.daemon.retention import manager as mgr
from runwatch.daemon.retention.manager import RetentionManager
from runwatch.daemon.retention.policy import Policy
from runwatch.daemon.store import Store
from runwatch.hooks import checkpoint as ckpt_io


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Any]:
    store = Store.open(tmp_path / "state" / "runwatch.db")
    mgr.ensure_schema(store)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    with store.conn:
        store.conn.execute("INSERT INTO runs (name, owner_uid, created) VALUES ('r', ?, 0)", (os.geteuid(),))
        store.conn.execute("INSERT INTO run_control (run, state, checkpoint_dir, updated)"
                           " VALUES (?, ?, ?, ?)", ("r", "running", str(folder), time.time()))
    yield {"store": store, "folder": folder, "db": store.path}
    store.close()


def manager(world: dict[str, Any], alerts: list[Any] | None = None, **policy: Any) -> RetentionManager:
    chosen = Policy(**{"every_nth": 0, "recent_hours": 0, "latest_k": 1, **policy})
    return RetentionManager(world["db"], lambda: chosen, quiet_seconds=0,
                            alert=(alerts.append if alerts is not None else None))


def save_runwatch(folder: Path, step: int) -> Path:
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return ckpt_io.save(folder, step, model=model, optimizer=opt).path


def save_hf(folder: Path, step: int) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir()
    (path / "pytorch_model.bin").write_bytes(b"weights" * 100)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def save_lightning(folder: Path, step: int) -> Path:
    path = folder / f"epoch=0-step={step}.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": step}, path)
    assert zipfile.is_zipfile(path)
    return path


def save_dcp(folder: Path, step: int) -> Path:
    path = folder / f"step_{step}"
    path.mkdir()
    (path / "__0_0.distcp").write_bytes(b"x" * 100)
    (path / ".metadata").write_bytes(b"meta")
    return path


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if not p.name.startswith(".")}


def test_every_format_is_judged_and_deleted_through_the_trash(world: dict[str, Any]) -> None:
    folder = world["folder"]
    old = [save_runwatch(folder, 10), save_hf(folder, 20), save_lightning(folder, 30), save_dcp(folder, 40)]
    newest = save_runwatch(folder, 50)
    report = manager(world).run_pass()
    assert sorted(report.deleted) == sorted(str(p) for p in old)
    assert names(folder) == {newest.name}  # only the newest complete one (latest_k = 1)
    assert sorted(report.purged) and not list((folder / mgr.TRASH).iterdir())  # purged too
    decided = {d["step"]: d for d in mgr.decisions(world["store"].conn, "r")}
    assert decided[50]["keep"] == 1 and decided[50]["reason"] == "the newest complete checkpoint"
    assert decided[10]["keep"] == 0 and decided[10]["reason"] == "no policy keeps it"


def test_dry_run_deletes_nothing_and_says_what_it_would(world: dict[str, Any]) -> None:
    folder = world["folder"]
    save_runwatch(folder, 10)
    save_runwatch(folder, 20)
    report = manager(world, dry_run=True).run_pass()
    assert report.deleted == [] and names(folder) == {"step-000000010", "step-000000020"}
    assert report.plans["r"].delete == [str(folder / "step-000000010")]


def test_writes_in_progress_and_late_markers_are_never_touched(world: dict[str, Any]) -> None:
    folder = world["folder"]
    save_runwatch(folder, 10)
    save_runwatch(folder, 20)
    partial = save_runwatch(folder, 30)
    (partial / "COMPLETE").unlink()  # its marker has not appeared yet
    hf = save_hf(folder, 40)
    (hf / "trainer_state.json").unlink()
    m = manager(world)
    report = m.run_pass()
    # step 30 and 40 are incomplete: kept untouched; step 20 is the newest complete one.
    assert report.deleted == [str(folder / "step-000000010")]
    assert {"step-000000030", "checkpoint-40", "step-000000020"} <= names(folder)
    # Still being written (changed within the quiet period): judged only once it settles.
    (hf / "trainer_state.json").write_text("{}")
    m.quiet_seconds = 3600
    assert m.run_pass().deleted == []
    m.quiet_seconds = 0
    assert m.run_pass().deleted == [str(folder / "step-000000020")]  # checkpoint-40 is now newest


def test_protections_win_over_every_policy(world: dict[str, Any]) -> None:
    folder, conn = world["folder"], world["store"].conn
    for step in (10, 20, 30, 40, 50, 60):
        save_runwatch(folder, step)
    with conn:
        conn.execute("INSERT INTO pins (run, step, created, created_by) VALUES ('r', 20, 0, 'uid 0')")
        # An open incident at step 45: its rollback target is the newest clean one before it.
        conn.execute("INSERT INTO incidents (run, opened, updated, state, rule, first_step, summary)"
                     " VALUES ('r', 0, 0, 'watching', 'x', 45, 's')")
    (folder / "latest").write_text("step-000000010")  # the trainer's resume pointer (DeepSpeed)
    m = manager(world, confirm_steps=0)
    m._last_step = lambda run: 100  # type: ignore[method-assign]  # health: every one confirmed clean
    report = m.run_pass()
    assert names(folder) == {"step-000000010", "step-000000020", "step-000000040", "step-000000060", "latest"}
    reasons = {d["step"]: d["reason"] for d in mgr.decisions(conn, "r")}
    assert reasons[10] == "the trainer's resume pointer points at it"
    assert reasons[20] == "pinned"
    assert reasons[40].startswith("rollback target of incident")
    assert sorted(report.deleted) == [str(folder / "step-000000030"), str(folder / "step-000000050")]


def test_a_pass_cut_off_after_renaming_a_marker_is_finished_by_the_next(world: dict[str, Any]) -> None:
    """The cut-off checkpoints are whole: their markers go back and the new pass decides again, so
    one still doomed is deleted and one pinned while the daemon was down is kept, unchanged."""
    folder, conn = world["folder"], world["store"].conn
    doomed = save_runwatch(folder, 10)
    pinned = save_runwatch(folder, 15)
    hf = save_hf(folder, 17)
    save_runwatch(folder, 20)
    for path, marker in ((doomed, "COMPLETE"), (pinned, "COMPLETE"), (hf, "trainer_state.json")):
        os.rename(path / marker, path / (marker + mgr.DELETING))  # then the daemon died
    with conn:
        conn.execute("INSERT INTO pins (run, step, created, created_by) VALUES ('r', 15, 0, 'uid 0')")
    report = manager(world).run_pass()  # a new daemon's first pass
    assert sorted(report.restored) == sorted(str(p) for p in (doomed, pinned, hf))
    assert set(report.deleted) == {str(doomed), str(hf)} and not doomed.exists()
    assert names(folder) == {"step-000000015", "step-000000020"}
    assert not list(pinned.glob(f"*{mgr.DELETING}"))
    from runwatch.daemon import checkpoints as ck
    ck.verify(ck.identify(pinned))  # whole, as saved


def test_a_failing_purge_is_alerted_and_retried(world: dict[str, Any],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Root ignores file permissions, so the failure is injected: the first rmtree raises.
    folder = world["folder"]
    save_runwatch(folder, 10)
    save_runwatch(folder, 20)
    real, calls = shutil.rmtree, []

    def flaky(path: Any, *a: Any, **k: Any) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise PermissionError(13, "Permission denied", str(path))
        real(path, *a, **k)

    monkeypatch.setattr(mgr.shutil, "rmtree", flaky)
    alerts: list[Any] = []
    m = manager(world, alerts)
    first = m.run_pass()
    assert first.deleted == [str(folder / "step-000000010")] and first.purged == []
    assert any("Permission denied" in e for e in first.errors)
    assert [a["kind"] for a in alerts[0]] == ["purge_failed"]
    # `runwatch checkpoints` lists it: in the trash, why it was deleted, why it is still there
    [trash] = mgr.gone(world["store"].conn, "r")
    assert (trash["state"], trash["step"], trash["reason"]) == ("trash", 10, "no policy keeps it")
    assert trash["original"] == str(folder / "step-000000010") and trash["size_bytes"] > 0
    assert Path(trash["path"]).parent == folder / mgr.TRASH and "Permission denied" in trash["note"]
    second = m.run_pass()
    assert len(second.purged) == 1 and not list((folder / mgr.TRASH).iterdir())
    assert alerts[1] == []  # resolved: the next pass no longer says so
    assert mgr.gone(world["store"].conn, "r") == []  # purged: no longer listed


def test_one_deleter_per_folder(world: dict[str, Any]) -> None:
    import fcntl

    folder = world["folder"]
    save_runwatch(folder, 10)
    save_runwatch(folder, 20)
    with open(folder / mgr.LOCK, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another deleter (a second daemon, a cleanup script)
        assert manager(world).run_pass().deleted == []
    assert manager(world).run_pass().deleted == [str(folder / "step-000000010")]


def test_a_rewind_quarantines_what_it_abandoned(world: dict[str, Any]) -> None:
    folder, conn = world["folder"], world["store"].conn
    for step in (10, 20, 30):
        save_runwatch(folder, step)
    applied = time.time() + 1
    with conn:
        conn.execute("INSERT INTO commands (id, run, action, args, created, created_by, incident_id, state,"
                     " step, result, updated) VALUES (1, 'r', 'rewind', '{}', 0, 'rule', 7, 'applied', 31, ?,"
                     " 0)", (json.dumps({"checkpoint_step": 10}),))
        conn.execute("INSERT INTO command_acks VALUES (1, 0, 31, 'applied', '{}', ?)", (applied,))
    report = manager(world, latest_k=5).run_pass()
    abandoned = folder / mgr.ABANDONED / "incident-7"
    assert sorted(p.name for p in abandoned.iterdir()) == ["step-000000020", "step-000000030"]
    assert sorted(report.quarantined) == [str(folder / "step-000000020"), str(folder / "step-000000030")]
    assert names(folder) == {"step-000000010", mgr.ABANDONED}
    assert manager(world, latest_k=5).run_pass().quarantined == []  # once per rewind
    listed = mgr.gone(conn, "r")
    assert [(g["step"], g["state"], g["incident"], g["path"]) for g in listed] == [
        (s, "abandoned", 7, str(abandoned / f"step-{s:09d}")) for s in (20, 30)]
    assert listed[0]["reason"] == "abandoned by the rewind to step 10 (incident 7)"
    # Nothing of this was lost: runwatch moved it (no protected_checkpoint_lost for the newest, 30).
    assert not any(a["kind"] == "protected_checkpoint_lost" for a in manager(world).run_pass().alerts)


def _rewound(conn: Any, target: int, applied_step: int) -> None:
    with conn:
        conn.execute("INSERT INTO commands (id, run, action, args, created, created_by, incident_id, state,"
                     " step, result, updated) VALUES (1, 'r', 'rewind', '{}', 0, 'rule', 7, 'applied', ?, ?,"
                     " 0)", (applied_step, json.dumps({"checkpoint_step": target})))


def test_a_rewind_points_the_resume_pointer_at_its_target(world: dict[str, Any]) -> None:
    """DeepSpeed-style ``latest`` (a tag file) names the target after the rewind, not an
    abandoned checkpoint, so a restarted trainer resumes from the clean one."""
    folder, conn = world["folder"], world["store"].conn
    for step in (10, 20, 30):
        save_runwatch(folder, step)
    (folder / "latest").write_text("step-000000030")
    _rewound(conn, 10, 31)
    manager(world, latest_k=5).run_pass()
    assert (folder / "latest").read_text() == "step-000000010"
    assert (folder / "step-000000010").is_dir() and not (folder / "step-000000030").exists()


def test_a_rewind_leaves_a_pointer_to_a_checkpoint_saved_after_it(world: dict[str, Any]) -> None:
    """The trainer saved step 40 after the rewind (applied before step 31) and pointed at it before
    retention's pass: that is where a restart must resume, not the rewind's target."""
    folder, conn = world["folder"], world["store"].conn
    for step in (10, 20, 30, 40):
        save_runwatch(folder, step)
    (folder / "latest").write_text("step-000000040")
    _rewound(conn, 10, 31)
    manager(world, latest_k=5).run_pass()
    assert not (folder / "step-000000030").exists()  # abandoned, quarantined
    assert (folder / "latest").read_text() == "step-000000040"


@pytest.mark.parametrize("pointer", ["symlink", "copy"])
def test_a_rewind_points_lightning_last_ckpt_at_its_target(world: dict[str, Any], pointer: str) -> None:
    folder, conn = world["folder"], world["store"].conn
    for step in (10, 20, 30):
        save_lightning(folder, step)
    newest = folder / "epoch=0-step=30.ckpt"
    if pointer == "symlink":
        (folder / "last.ckpt").symlink_to(newest.name)
    else:
        shutil.copy2(newest, folder / "last.ckpt")
    _rewound(conn, 10, 31)
    manager(world, latest_k=5).run_pass()
    target = folder / "epoch=0-step=10.ckpt"
    assert not newest.exists()  # quarantined
    if pointer == "symlink":
        assert os.readlink(folder / "last.ckpt") == target.name
    assert (folder / "last.ckpt").read_bytes() == target.read_bytes()
    assert not list(folder.glob(".*runwatch-tmp"))


def test_the_daemon_keeps_tiers_quarantines_after_a_rewind_and_honours_pins() -> None:
    """A real run saving every 5 steps with a bad batch at 110, on a daemon whose policy keeps
    the latest 2 and every 4th: the rollback target survives, the checkpoint the rewind
    abandoned is quarantined, a pin holds, and the CLI says why each one is kept or goes."""
    import subprocess
    import sys

    from conftest import REPO, DaemonProcess, cli, short_tmpdir, wait_for

    root = short_tmpdir()
    config = root / "runwatch.toml"
    config.write_text("retention_quiet_seconds = 0\nretention_rescan_seconds = 0.5\n"
                      "[playbook]\nwatch_steps = 1000\n"
                      "[retention]\nevery_nth = 4\nrecent_hours = 0\nlatest_k = 2\nconfirm_steps = 5\n")
    d = DaemonProcess(root, ["--config", str(config)]).start()

    try:
        subprocess.run([sys.executable, str(REPO / "tests" / "intervene_train.py"), "--name", "tiers",
                        "--socket", str(d.socket), "--ckpt-dir", str(root / "ckpt"), "--out",
                        str(root / "out"), "--steps", "140", "--bad", "110", "--ckpt-every", "5",
                        "--step-seconds", "0.03"], check=True, timeout=240)
        abandoned = root / "ckpt" / mgr.ABANDONED / "incident-1"
        wait_for(lambda: abandoned.is_dir() and list(abandoned.iterdir()), what="the quarantine")
        rewind = next(c for c in cli(d, "incident", "show", "1")["commands"] if c["action"] == "rewind")
        target = rewind["result"]["checkpoint_step"]
        # 105 is suspect (the spike came within 5 steps of it): the rewind went to 100.
        assert target == 100 and (root / "ckpt" / f"step-{target:09d}").is_dir()
        assert sorted(int(p.name.split("-")[1]) for p in abandoned.iterdir()) == [105, 110]
        pinned = cli(d, "pin", "tiers", "25")
        assert pinned == {"run": "tiers", "step": 25, "pinned": True}

        def settled() -> dict[int, dict[str, Any]] | None:
            rows = {r["step"]: r for r in cli(d, "checkpoints", "tiers")["retention"]}
            return rows if rows.get(25, {}).get("reason") == "pinned" and 140 in rows else None

        rows = wait_for(settled, timeout=30, what="a pass after the pin")
        on_disk = {int(p.name.split("-")[1]) for p in (root / "ckpt").glob("step-*")}
        assert on_disk == set(rows)
        assert rows[target]["reason"] == "rollback target of incident 1"
        assert {135, 140} <= on_disk and 25 in on_disk
        every_4th = {s for s, r in rows.items() if r["reason"] == "every Nth checkpoint: kept for good"}
        assert every_4th and all(r["keep"] for r in rows.values())
        assert 30 not in on_disk  # nothing keeps it: gone
        plan = cli(d, "retention", "plan", "tiers")
        assert plan["delete"] == [] and plan["enabled"]
        # `runwatch checkpoints` lists the quarantined ones too, with their incident.
        gone = cli(d, "checkpoints", "tiers")["gone"]
        assert [(g["step"], g["state"], g["incident"]) for g in gone] == [(105, "abandoned", 1),
                                                                          (110, "abandoned", 1)]
        table = subprocess.run([sys.executable, "-m", "runwatch.daemon", "checkpoints", "tiers", "--socket",
                                str(d.socket)], capture_output=True, text=True, timeout=120, check=True)
        assert "abandoned by the rewind to step 100 (incident 1)" in table.stdout
        firing = cli(d, "alerts", "--run", "tiers")["firing"]
        assert not any(a["rule"].startswith("retention_") for a in firing)  # the moves were runwatch's
        metrics = d.metrics_text()
        assert 'runwatch_retention_checkpoints{run="tiers",tier="pinned"} 1.0' in metrics
        assert "runwatch_retention_freed_bytes_total" in metrics
    finally:
        d.terminate()


def test_folders_and_trash_that_lead_elsewhere_are_refused(world: dict[str, Any], tmp_path: Path) -> None:
    folder = world["folder"]
    save_runwatch(folder, 10)
    save_runwatch(folder, 20)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    (folder / mgr.TRASH).symlink_to(victim)  # a trash that is a symlink: never followed
    report = manager(world).run_pass()
    assert (victim / "precious").read_text() == "keep me"
    assert report.deleted == [] and any("not a real folder" in e for e in report.errors)
    (folder / mgr.TRASH).unlink()
    if os.geteuid() == 0:  # a folder owned by someone else than the run's owner is not managed
        os.chown(folder, 65534, 65534)
        with world["store"].conn:
            world["store"].conn.execute("UPDATE runs SET owner_uid = 1234")
        assert manager(world).run_pass().plans == {}


def test_runs_sharing_a_folder_protect_each_others_checkpoints(world: dict[str, Any]) -> None:
    """A relaunch under a new run name into the same folder: the new run's pin holds in the old
    run's pass too (the folder is planned once, with every run's protections)."""
    folder, conn = world["folder"], world["store"].conn
    for step in (10, 20, 30):
        save_runwatch(folder, step)
    save_lightning(folder, 25)
    os.rename(folder / "epoch=0-step=25.ckpt", folder / "last.ckpt")  # Lightning's save_last copy
    with conn:
        conn.execute("INSERT INTO runs (name, owner_uid, created) VALUES ('r2', ?, 0)", (os.geteuid(),))
        conn.execute("INSERT INTO run_control (run, state, checkpoint_dir, updated) VALUES ('r2', 'running',"
                     " ?, 0)", (str(folder),))
        conn.execute("INSERT INTO pins (run, step, created, created_by) VALUES ('r2', 10, 0, 'uid 0')")
    report = manager(world).run_pass()
    assert report.deleted == [str(folder / "step-000000020")]
    assert names(folder) == {"step-000000010", "step-000000030", "last.ckpt"}
    for run in ("r", "r2"):
        reasons = {d["step"]: d["reason"] for d in mgr.decisions(conn, run)}
        assert reasons[10] == "pinned" and reasons[-1] == "the trainer's resume pointer points at it"


def test_best_n_keeps_the_checkpoints_with_the_best_stored_metric(world: dict[str, Any]) -> None:
    import numpy as np

    folder, store = world["folder"], world["store"]
    for step in (10, 20, 30, 40):
        save_runwatch(folder, step)
    info = store.register_stream("r", 0, 1, "host", 1, os.geteuid(), "test")
    loss = {s: 2.0 - 0.01 * s for s in range(41)}
    loss[20] = 0.1  # the best loss the run saw at a checkpoint (40 is the newest, kept anyway)
    with store.conn:
        set_id = store.metric_set_id(("loss",))
        store.insert_rows([(info.id, s, float(s), set_id, np.array([v]).tobytes()) for s, v in loss.items()])
    manager(world, best_n=1, best_metric="loss").run_pass()
    reasons = {d["step"]: d["reason"] for d in mgr.decisions(store.conn, "r")}
    assert reasons[20] == "one of the best_n by best_metric"
    assert names(folder) == {"step-000000020", "step-000000040"}


def _train_and_save(socket: Path, folder: Path, run: str, steps: int) -> None:
    """A real hook: ``steps`` optimizer steps of a tiny model, a runwatch checkpoint after each."""
    from runwatch.hooks.watch import Watch

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = Watch(model, opt, run, socket=socket, checkpoint_dir=folder, guard="off", flush_every=1)
    try:
        for _ in range(steps):
            loss = model(torch.randn(4, 8)).pow(2).mean()
            w.record_loss(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
            w.checkpoint()
    finally:
        w.close()


def test_a_daemon_killed_in_the_middle_of_a_pass_is_finished_by_the_next() -> None:
    """kill -9 of a real daemon while its pass is deleting: one checkpoint in the trash, one with
    its marker renamed, the rest untouched. A new daemon on the same store and folder finishes the
    pass: what the plan kept (pin, every Nth, latest) is all there and whole, everything it meant
    to delete is gone and purged, and the store's listing matches the disk."""
    from conftest import DaemonProcess, cli, short_tmpdir, wait_for

    from runwatch.daemon import checkpoints as ck
    from runwatch.daemon.store import Store

    root = short_tmpdir()
    folder = root / "ckpt"
    policy = ("retention_quiet_seconds = 0\nretention_rescan_seconds = 0.3\n[playbook]\nenabled = false\n"
              "[retention]\nevery_nth = 4\nrecent_hours = 0\nlatest_k = 2\nconfirm_steps = 0\n")
    (root / "runwatch.toml").write_text(policy)
    deleting = ["--config", str(root / "runwatch.toml")]
    plan_only = [*deleting, "--retention-dry-run"]
    try:
        # 1. A daemon that only plans (deletes nothing): the run saves 16 checkpoints, step 6 is pinned.
        d = DaemonProcess(root, plan_only).start()
        _train_and_save(d.socket, folder, "crash", 16)
        assert cli(d, "pin", "crash", "6")["pinned"]

        def decided() -> list[dict[str, Any]]:
            conn = Store.reader(d.store_path)
            try:
                return mgr.decisions(conn, "crash")
            finally:
                conn.close()
        # (the store polled, not the CLI: each CLI call is a Python start)
        wait_for(lambda: len(rows := decided()) == 16 and any(r["reason"] == "pinned" for r in rows),
                 what="a pass over the 16 checkpoints after the pin")
        plan = cli(d, "retention", "plan", "crash")
        assert not plan["enabled"] and len(ck.scan(folder)) == 16  # --retention-dry-run: all still there
        kept = {x["step"] for x in plan["decisions"] if x["keep"]}
        doomed = {x["step"] for x in plan["decisions"] if not x["keep"]}
        # every 4th by ordinal (1, 5, 9, 13), the pin, the latest 2
        assert kept == {1, 5, 6, 9, 13, 15, 16}
        d.terminate()
        path = {c.step: c.path for c in ck.scan(folder)}

        # 2. A deleting daemon, frozen by the fault knob after renaming its 3rd marker: kill -9.
        d = DaemonProcess(root, deleting, env={"RUNWATCH_FAULT_RETENTION_HOLD_AFTER": "3"}).start()

        def frozen() -> bool:
            trash = folder / mgr.TRASH
            return (path[4] / f"COMPLETE{mgr.DELETING}").exists() and trash.is_dir() and \
                len(list(trash.iterdir())) == 2
        wait_for(frozen, timeout=30, what="the pass to hold after its 3rd marker")
        d.kill9()
        on_disk = {c.step: c for c in ck.scan(folder)}
        assert not on_disk[4].complete  # half-deleted: nothing counts it as a checkpoint
        assert 2 not in on_disk and 3 not in on_disk  # moved to the trash, not purged
        assert doomed - {2, 3, 4} <= {s for s, c in on_disk.items() if c.complete}  # not reached
        assert all(on_disk[s].complete for s in kept)
        conn = Store.reader(d.store_path)
        in_trash = {r["step"]: r for r in mgr.gone(conn, "crash")}
        conn.close()
        assert {2, 3} <= set(in_trash) and in_trash[2]["state"] == "trash"

        # 3. A new daemon on the same store and folder finishes the pass.
        d = DaemonProcess(root, deleting).start()

        def finished() -> bool:
            steps = {r["step"] for r in decided()}
            return steps == kept and not list((folder / mgr.TRASH).iterdir())
        wait_for(finished, timeout=30, what="the next daemon to finish the pass")
        reply = cli(d, "checkpoints", "crash")
        assert reply["gone"] == []  # nothing left in the trash, no stale row from the cut-off move
        on_disk = {c.step: c for c in ck.scan(folder)}
        assert set(on_disk) == kept and all(c.complete for c in on_disk.values())
        for step in kept:
            ck.verify(on_disk[step])  # every byte as saved: the marker put back on step 4 went too
        assert not any(path[s].exists() for s in doomed)
        assert not list(folder.glob(f"*/*{mgr.DELETING}"))
        rows = {r["step"]: r for r in reply["retention"]}
        assert {r["path"] for r in rows.values()} == {str(c.path) for c in on_disk.values()}
        assert all(r["keep"] for r in rows.values()), rows
        # Never "writing": a restored marker keeps the folder's mtime. 16 was saved after the last
        # step the daemon saw, so its confirmation window has not passed.
        assert {s: r["state"] for s, r in rows.items()} == {
            **{s: "clean" for s in kept}, 6: "pinned", 16: "complete"}
        assert rows[6]["reason"] == "pinned"
        assert f"{path[4]}: a pass was cut off after renaming its marker; marker restored" in d.log()
    finally:
        with contextlib.suppress(Exception):
            d.terminate()
        shutil.rmtree(root, ignore_errors=True)
