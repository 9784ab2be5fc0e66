"""The retention manager on real folders: each checkpoint format, writes in progress, the trash,
interrupted passes, protections and a rewind's quarantine. The facts (runs, alerts, incidents,
pins, commands) are rows in a real store, as the daemon writes them."""

from __future__ import annotations

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
    folder = world["folder"]
    doomed = save_runwatch(folder, 10)
    save_runwatch(folder, 20)
    os.rename(doomed / "COMPLETE", doomed / ("COMPLETE" + mgr.DELETING))  # then the daemon died
    report = manager(world).run_pass()  # a new daemon's first pass
    assert str(doomed) in report.deleted and not doomed.exists()
    assert names(folder) == {"step-000000020"}


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
    second = m.run_pass()
    assert len(second.purged) == 1 and not list((folder / mgr.TRASH).iterdir())
    assert alerts[1] == []  # resolved: the next pass no longer says so


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
