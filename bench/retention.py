"""What a retention pass costs: scanning a checkpoint folder and deciding, at folder sizes a long
run reaches.

Builds a folder of ``--checkpoints`` runwatch-format checkpoints (small files, real markers,
real manifests), registers it with a store as a run's checkpoint folder, and times a dry-run
pass (scan + health + plan + recording decisions) and ``policy.plan`` alone on as many
candidates.

    python bench/retention.py [--checkpoints 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from runwatch.daemon import checkpoints as ck
from runwatch.daemon.retention import manager as mgr
from runwatch.daemon.retention import policy as pol
from runwatch.daemon.store import Store


def build(folder: Path, n: int) -> None:
    for i in range(n):
        step = (i + 1) * 100
        path = folder / ck.folder_name(step)
        path.mkdir(parents=True)
        (path / ck.STATE).write_bytes(b"x" * 1024)
        manifest = json.dumps(
            {"files": {ck.STATE: {"size": 1024, "sha256": "0" * 64}}, "step": step, "format": 1}
        )
        (path / ck.MANIFEST).write_text(manifest)
        (path / ck.MARKER).write_text(
            json.dumps({"step": step, "saved_at": time.time() - (n - i) * 600, "manifest_sha256": "0" * 64})
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoints", type=int, default=2000)
    p.add_argument("--json")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root / "ckpt", a.checkpoints)
        store = Store.open(root / "runwatch.db")
        mgr.ensure_schema(store)
        with store.conn:
            # Retention manages only folders owned by the run's owner: the run needs its row.
            store.conn.execute("INSERT INTO runs (name, owner_uid, created) VALUES ('b', ?, 0)",
                               (os.geteuid(),))
            store.conn.execute(
                "INSERT INTO run_control (run, state, checkpoint_dir, updated) VALUES ('b', 'running', ?, 0)",
                (str(root / "ckpt"),),
            )
        m = mgr.RetentionManager(store.path, lambda: pol.Policy(), quiet_seconds=0)
        t0 = time.perf_counter()
        first = m.run_pass(dry_run=True)  # assigns ordinals: the first pass writes one row each
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        m.run_pass(dry_run=True)
        t_pass = time.perf_counter() - t0
        cands = [
            pol.Candidate(
                path=str(i),
                step=i,
                saved_at=float(i),
                size_bytes=1,
                complete=True,
                health=pol.Health.CLEAN,
                ordinal=i,
            )
            for i in range(a.checkpoints)
        ]
        t0 = time.perf_counter()
        pol.plan(cands, pol.Policy(), [pol.Incident(1, a.checkpoints // 2)], now=float(a.checkpoints))
        t_plan = time.perf_counter() - t0
        deletions = len(first.plans["b"].delete)
        t0 = time.perf_counter()
        deleting = m.run_pass()  # carries the plan out: marker, trash (one store row each), purge
        t_delete = time.perf_counter() - t0
        assert len(deleting.deleted) == deletions and len(deleting.purged) == deletions
        m.conn.close()
        store.close()
    out = {
        "checkpoints": a.checkpoints,
        "first_pass_s": t_first,
        "pass_s": t_pass,
        "plan_only_s": t_plan,
        "would_delete": deletions,
        "deleting_pass_s": t_delete,
    }
    print(
        f"{a.checkpoints} checkpoints: first pass {t_first:.2f} s, later passes {t_pass:.2f} s,"
        f" plan() alone {t_plan * 1e3:.1f} ms; the default policy would delete {deletions};"
        f" the pass that deletes and purges them {t_delete:.2f} s"
    )
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
