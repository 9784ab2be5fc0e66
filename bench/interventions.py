"""What interventions cost: checkpoints, the ranks' agreement, and how fast a pause lands.

Three measurements, printed as a table (``--json FILE`` for the numbers):

1. Checkpoint save / verify / load of a model with ``--params`` parameters and its AdamW state
   (fp32, CPU), in seconds and MB/s: what a rewind pays (verify + load) and what
   ``watch.checkpoint()`` pays.
2. The steady-state cost of the control channel: the hook's per-step check with no command
   pending (one process), and the gloo agreement every ``control_every`` steps among
   ``--ranks`` CPU processes (one all-reduce of one integer).
3. End to end on a real daemon and a real CPU training (``tests/intervene_train.py``, a bad
   batch at data index 110): seconds from the rule's firing to the pause applied on the run,
   and from the firing to the run training again after the rewind, read from the store.

    python bench/interventions.py [--params 25_000_000] [--ranks 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from runwatch.daemon import checkpoints
from runwatch.hooks import checkpoint as ckpt_io

REPO = Path(__file__).resolve().parent.parent


def checkpoint_costs(n_params: int, folder: Path) -> dict[str, float]:
    width = 1024
    layers = max(1, n_params // (width * width))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, width)).sum().backward()
    opt.step()  # AdamW state exists: a checkpoint is weights + 2x moments
    t0 = time.perf_counter()
    saved = ckpt_io.save(folder, 100, model=model, optimizer=opt)
    t_save = time.perf_counter() - t0
    t0 = time.perf_counter()
    checkpoints.verify(saved)
    t_verify = time.perf_counter() - t0
    t0 = time.perf_counter()
    ckpt_io.load(saved.path, model=model, optimizer=opt)  # verifies again, then loads
    t_load = time.perf_counter() - t0
    mb = saved.size_bytes / 1e6
    return {"params": sum(p.numel() for p in model.parameters()), "size_mb": mb, "save_s": t_save,
            "verify_s": t_verify, "load_s": t_load, "save_mb_s": mb / t_save, "verify_mb_s": mb / t_verify}


def idle_check_cost(steps: int = 200_000) -> float:
    """Seconds per step of the hook's control check with nothing pending (one process)."""
    from runwatch.hooks.control import Control

    class _W:  # only what at_step_end/at_step_start touch when idle
        step = 0

    c = Control(_W(), every=8)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    for s in range(steps):
        c.at_step_end(s)
        if c.agreed or c.paused:
            c.at_step_start()
    return (time.perf_counter() - t0) / steps


def _agree_worker(rank: int, world: int, port: int, n: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    flag = torch.zeros(1, dtype=torch.int64)
    for _ in range(50):
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(n):
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    elapsed = (time.perf_counter() - t0) / n
    if rank == 0:
        Path(out).write_text(json.dumps({"agreement_s": elapsed}))
    dist.destroy_process_group()


def agreement_cost(world: int, n: int = 2000) -> float:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        mp.spawn(_agree_worker, args=(world, port, n, f.name), nprocs=world)
        return float(json.loads(Path(f.name).read_text())["agreement_s"])


def end_to_end(root: Path) -> dict[str, float]:
    sock, config = root / "s.sock", root / "rw.toml"
    config.write_text("[playbook]\nwatch_steps = 30\n")
    env = {**os.environ, "RUNWATCH_SAMPLE_INTERVAL_SECONDS": "0"}
    daemon = subprocess.Popen([sys.executable, "-m", "runwatch.daemon", "daemon", "--socket", str(sock),
                               "--state-dir", str(root / "state"), "--exporter-port", "0", "--config",
                               str(config)], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        subprocess.run([sys.executable, str(REPO / "tests" / "intervene_train.py"), "--name", "bench",
                        "--socket", str(sock), "--ckpt-dir", str(root / "ckpt"), "--out", str(root / "out"),
                        "--bad", "110", "--step-seconds", "0.05"], check=True, env=env,
                       stderr=subprocess.DEVNULL)
    finally:
        daemon.terminate()
        daemon.wait()
    db = sqlite3.connect(root / "state" / "runwatch.db")
    fired = db.execute("SELECT time FROM alert_events WHERE rule = 'grad_norm_divergence'"
                       " AND state = 'firing' ORDER BY id LIMIT 1").fetchone()[0]
    acks = dict(db.execute("SELECT c.action, a.time FROM command_acks a"
                           " JOIN commands c ON c.id = a.command_id"))
    return {"firing_to_paused_s": acks["pause"] - fired, "firing_to_rewound_s": acks["rewind"] - fired}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=int, default=25_000_000)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--json")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ck = checkpoint_costs(a.params, Path(tmp) / "ckpt")
    idle = idle_check_cost()
    agree = agreement_cost(a.ranks)
    with tempfile.TemporaryDirectory(prefix="rw-bench-", dir="/tmp") as tmp:
        e2e = end_to_end(Path(tmp))
    out = {"checkpoint": ck, "idle_check_s_per_step": idle, f"gloo_agreement_s_{a.ranks}_ranks": agree,
           "end_to_end": e2e}
    print(f"checkpoint of {ck['params'] / 1e6:.1f}M params + AdamW state: {ck['size_mb']:.0f} MB")
    print(f"  save {ck['save_s']:.2f} s ({ck['save_mb_s']:.0f} MB/s), verify {ck['verify_s']:.2f} s"
          f" ({ck['verify_mb_s']:.0f} MB/s), load incl. verify {ck['load_s']:.2f} s")
    print(f"control check per step, nothing pending: {idle * 1e9:.0f} ns")
    print(f"gloo agreement ({a.ranks} ranks, one int64 all-reduce): {agree * 1e6:.0f} us"
          f" = {agree / 8 * 1e6:.1f} us per step at control_every=8")
    print(f"rule firing -> pause applied: {e2e['firing_to_paused_s'] * 1e3:.0f} ms;"
          f" -> rewound and training: {e2e['firing_to_rewound_s'] * 1e3:.0f} ms (0.05 s steps)")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
