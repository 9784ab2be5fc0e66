"""DDP on CPU with gloo: every rank reports, tagged with its rank, including its local norm."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runwatch.daemon.store import Store, series
from tests.conftest import REPO, DaemonProcess, free_port

pytest.importorskip("torch")


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_report_local_norms_before_the_all_reduce(daemon: DaemonProcess, rootdir: Path,
                                                       world: int) -> None:
    steps, poison = 8, 5
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
         f"--rdzv-endpoint=127.0.0.1:{free_port()}",
         "--rdzv-backend=c10d", str(REPO / "tests" / "ddp_worker.py"), str(daemon.socket),
         str(rootdir / "ref-%d.json"), str(steps), str(poison)],
        capture_output=True, text=True, timeout=240, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    conn = Store.reader(daemon.store_path)
    local, total = {}, {}
    for rank in range(world):
        ref = json.loads((rootdir / f"ref-{rank}.json").read_text())["local"]
        got_steps, got = series(conn, "ddp", rank, "local_grad_norm")
        assert got_steps.tolist() == list(range(steps)), f"rank {rank}"
        np.testing.assert_allclose(got, ref, rtol=1e-4, err_msg=f"rank {rank}")
        local[rank] = got
        total[rank] = series(conn, "ddp", rank, "grad_norm")[1]
    # After the all-reduce every rank holds the same gradient; before it, each its own.
    for rank in range(1, world):
        np.testing.assert_allclose(total[rank], total[0], rtol=1e-5)
        assert not np.allclose(local[rank], local[0])
    spread = np.std(np.stack([local[r] for r in range(world)]), axis=0)
    print(f"\ncross-rank spread of local grad norms ({world} ranks): {np.round(spread, 3).tolist()}")
    assert spread[poison] > 5 * np.median(spread), "one rank's poisoned batch shows in the spread"
    assert local[1][poison] > 10 * local[0][poison]
    runs = daemon.query("runs", all=True)["runs"]
    assert runs[0]["ranks"] == list(range(world)) and runs[0]["world_size"] == world
