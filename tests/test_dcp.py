"""Sharded checkpoints: ``watch.checkpoint()`` on an FSDP2 model saves through
torch.distributed.checkpoint, and a rewind loads it on every rank.

One real run serves the whole file (``tests/dcp_train.py``: 2 gloo ranks on CPU, every
parameter a DTensor, a real daemon on a real Unix socket). It checkpoints at steps 3 and 6;
the test then removes one rank's shard from step 6 and asks the daemon for a rewind with LR
x0.5, as a person would (``runwatch rewind``). The ranks refuse the torn checkpoint, naming
the missing shard, rewind to step 3, and their state right after the rewind must equal, bit
for bit, what they held right after saving it. The other tests tear copies of the run's
checkpoints in other ways and load them in this process (no process group: DCP gathers whole
tensors).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import REPO, DaemonProcess, cli_run, free_port, short_tmpdir, wait_for
from test_interventions import cli_command

from runwatch.daemon.checkpoints import DCP_METADATA, MANIFEST, MARKER, RUNWATCH, identify, latest_clean, scan
from runwatch.hooks import checkpoint as ckpt_io

RUN = "sharded"
RANKS = 2


@dataclass
class Run:
    root: Path
    out: Path
    ckpts: dict[int, Path]  # step -> folder, as the run saved them
    intact_6: Path  # a copy of step 6 taken before the test tore it
    registered: list[dict[str, Any]]
    rewind: dict[str, Any]  # the command as the daemon recorded it, with every rank's ack
    results: list[dict[str, Any]]


def _torchrun(cmd: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={RANKS}",
                             f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-backend=c10d", *cmd],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    root = short_tmpdir()
    # The playbook acts on people's commands only: this tiny run's early gradient norms can trip
    # the default pack, and an automatic rewind (x0.1) would land beside the one this test sends.
    config = root / "runwatch.toml"
    config.write_text("[playbook]\nenabled = false\nwatch_steps = 5\n[retention]\nconfirm_steps = 5\n")
    d = DaemonProcess(root, extra_args=["--config", str(config)]).start()
    out = root / "out"
    out.mkdir()
    proc = _torchrun([str(REPO / "tests" / "dcp_train.py"), "--name", RUN, "--socket", str(d.socket),
                      "--ckpt-dir", str(root / "ckpt"), "--out", str(out)])
    try:
        def registered() -> list[dict[str, Any]]:
            if proc.poll() is not None:
                output = proc.communicate()[0].decode(errors="replace")
                raise AssertionError(f"training ended before the rewind:\n{output[-6000:]}")
            found = d.query("checkpoints", run=RUN)["checkpoints"]
            return found if len(found) >= 2 else []

        listed = wait_for(registered, timeout=240, what="two sharded checkpoints registered")
        ckpts = {c["step"]: Path(c["path"]) for c in listed}
        intact = root / "intact" / ckpts[6].name
        shutil.copytree(ckpts[6], intact)
        (ckpts[6] / "__1_0.distcp").unlink()  # rank 1's shard of the newest checkpoint is gone
        sent = cli_run(d, "rewind", RUN, "--lr-scale", "0.5")
        assert sent.returncode == 0, (sent.stdout, sent.stderr)
        command = wait_for(lambda: len((c := cli_command(d, json.loads(sent.stdout)["id"]))["acks"]) == RANKS
                           and c, timeout=120, what="both ranks' rewind acks")
        try:
            output = proc.communicate(timeout=240)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"training did not finish; daemon log:\n{d.log()[-4000:]}") from None
        assert proc.returncode == 0, output[-6000:]
        results = [json.loads((out / f"result.rank{r}.json").read_text()) for r in range(RANKS)]
        yield Run(root, out, ckpts, intact, listed, command, results)
    finally:
        if proc.poll() is None:
            proc.kill()
        d.terminate()


def _shards(run: Run, name: str) -> list[dict[str, torch.Tensor]]:
    return [torch.load(run.out / f"{name}.rank{r}.pt", weights_only=True) for r in range(RANKS)]


def test_every_rank_writes_its_shards_and_rank_0_registers_the_checkpoint(run: Run) -> None:
    for step, path in run.ckpts.items():
        assert path.name == f"step-{step:09d}"
        # Each rank's shards and RNG states, rank 0's small state and DCP's metadata, all in the
        # manifest that the COMPLETE marker seals.
        manifest = json.loads((path / MANIFEST).read_text())
        assert manifest["layout"] == "dcp" and manifest["world_size"] == RANKS
        expected = {"state.pt", DCP_METADATA, "rng-rank00000.pt", "rng-rank00001.pt", "__0_0.distcp"}
        if step == 3:
            expected.add("__1_0.distcp")
        assert expected <= set(os.listdir(path)) and MARKER in os.listdir(path)
        assert set(manifest["files"]) == expected | ({"__1_0.distcp"} if step == 6 else set())
    assert not [p for p in (run.root / "ckpt").iterdir() if p.name.startswith(".tmp")]
    # Registered once each (by rank 0), with the size on disk and the runwatch format.
    assert sorted(c["step"] for c in run.registered) == [3, 6]
    three = next(c for c in run.registered if c["step"] == 3)
    assert three["format"] == RUNWATCH
    assert three["size_bytes"] == sum(f.stat().st_size for f in run.ckpts[3].iterdir())
    # Every rank got the same checkpoints back from watch.checkpoint().
    assert run.results[0]["saved"] == run.results[1]["saved"]


def test_a_rewind_refuses_the_torn_checkpoint_and_restores_every_rank_bit_exactly(run: Run) -> None:
    command = run.rewind
    assert command["state"] == "applied", command
    acks = {a["rank"]: a for a in command["acks"]}
    assert {a["state"] for a in acks.values()} == {"applied"}
    assert acks[0]["step"] == acks[1]["step"]  # the same step on every rank
    # The daemon asked for the newest registered checkpoint (step 6); the ranks refused it with
    # its reason and went back to the next older clean one.
    assert command["args"]["to"] == 6
    assert command["result"]["checkpoint_step"] == 3, command
    assert f"{run.ckpts[6]}: __1_0.distcp is missing" in command["result"]["refused"], command

    saved, rewound = _shards(run, "saved-3"), _shards(run, "rewound")
    for rank in range(RANKS):
        before, after = saved[rank], rewound[rank]
        assert set(before) == set(after)
        params = [k for k in before if k.startswith("param/")]
        optim = [k for k in before if k.startswith("optim/")]
        assert len(params) == 4 and len(optim) == 12  # step, exp_avg, exp_avg_sq per parameter
        for key in params + optim + ["rng"]:
            assert torch.equal(before[key], after[key]), (rank, key)
        # The LR is the saved one x0.5, and stays scaled.
        assert torch.equal(after["lr"], before["lr"] * 0.5)
        assert run.results[rank]["lr_scale"] == pytest.approx(0.5)
    # Shards are the ranks' own halves, not copies of one another.
    assert not torch.equal(saved[0]["param/0.weight"], saved[1]["param/0.weight"])


def test_the_run_continues_from_the_restored_state(run: Run) -> None:
    # Each rank trains on one fixed batch, so the loss of a step is a function of the
    # parameters: the first step after the rewind computes exactly what the step after the save
    # at step 3 did (the root's gathered parameters included), then training goes on.
    for result in run.results:
        losses, at = result["losses"], result["rewound"]["at"]
        assert losses[at] == losses[3]
        assert losses[at] != losses[at - 1]
        assert len(losses) - at == 3 and losses[-1] < losses[at]
    assert run.results[0]["rewound"]["step"] == run.results[1]["rewound"]["step"]
    assert run.results[0]["final_step"] == run.results[1]["final_step"]


def test_a_collective_load_that_one_rank_cannot_do_is_refused_on_every_rank(run: Run) -> None:
    for result in run.results:
        torn = result["refusals"]["torn"]
        assert torn == f"{run.ckpts[6]}: __1_0.distcp is missing"
        # Rank 0 asked for step 3, which it could load; rank 1 for the torn one. Both refuse
        # with rank 1's reason, and neither waits for the other.
        assert result["refusals"]["disagree"] == torn
        assert result["unchanged_by_refusals"]


# -------------------------------------------------------------- one process, no process group


def _plain_model() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    sys.path.insert(0, str(REPO / "tests"))
    import dcp_train

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(dcp_train.WIDTH, 4 * dcp_train.WIDTH), torch.nn.GELU(),
                                torch.nn.Linear(4 * dcp_train.WIDTH, dcp_train.WIDTH))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + 0.1 * s))
    return model, optimizer, schedule


def _copy(run: Run, tmp_path: Path) -> dict[int, Path]:
    shutil.copytree(run.ckpts[3], tmp_path / run.ckpts[3].name)
    shutil.copytree(run.intact_6, tmp_path / run.intact_6.name)
    return {3: tmp_path / run.ckpts[3].name, 6: tmp_path / run.intact_6.name}


def test_a_sharded_checkpoint_loads_whole_into_an_unsharded_model(run: Run, tmp_path: Path) -> None:
    copies = _copy(run, tmp_path)
    model, optimizer, schedule = _plain_model()
    restored = ckpt_io.load(copies[6], model=model, optimizer=optimizer, scheduler=schedule)
    assert restored.step == 6 and restored.extra["lr_scale"] == 1.0
    assert restored.data_position == {"batches": 0}
    shards = _shards(run, "saved-6")
    for name, p in model.named_parameters():
        whole = torch.cat([s[f"param/{name}"] for s in shards])  # FSDP2 shards dim 0, in rank order
        assert torch.equal(p.detach(), whole), name
        exp_avg = torch.cat([s[f"optim/{name}/exp_avg"] for s in shards])
        assert torch.equal(optimizer.state[p]["exp_avg"], exp_avg), name
    assert torch.equal(torch.tensor([g["lr"] for g in optimizer.param_groups], dtype=torch.float64),
                       shards[0]["lr"])
    assert schedule.last_epoch == 6


@pytest.mark.parametrize("tear", ["no marker", "missing shard", "flipped byte", "empty metadata"])
def test_a_torn_sharded_checkpoint_is_refused_and_the_older_one_restored(
        run: Run, tmp_path: Path, tear: str, caplog: pytest.LogCaptureFixture) -> None:
    copies = _copy(run, tmp_path)
    newest = copies[6]
    if tear == "no marker":
        (newest / MARKER).unlink()
        reason = "incomplete (no COMPLETE marker)"
    elif tear == "missing shard":
        (newest / "__0_0.distcp").unlink()
        reason = "__0_0.distcp is missing"
    elif tear == "flipped byte":
        with open(newest / "__1_0.distcp", "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 1]))
        reason = "sha256 mismatch in __1_0.distcp"
    else:
        (newest / DCP_METADATA).write_bytes(b"")
        reason = "size mismatch in .metadata"
    # The daemon's view (stdlib only): the torn one is refused with its reason, the older offered.
    offered, refused = latest_clean(tmp_path)
    assert offered is not None and offered.path == copies[3]
    assert [(c.path, c.format) for c, _ in refused] == [(newest, RUNWATCH)] and reason in refused[0][1]
    # The hook's: loading it names the reason; restore_latest_clean goes back to step 3.
    model, optimizer, schedule = _plain_model()
    with pytest.raises(ckpt_io.CheckpointError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        ckpt_io.load(newest, model=model, optimizer=optimizer)
    caplog.set_level("WARNING", logger="runwatch.hooks")
    restored = ckpt_io.restore_latest_clean(tmp_path, model=model, optimizer=optimizer, scheduler=schedule)
    assert restored.step == 3
    assert any(newest.name in r.message and reason in r.message for r in caplog.records)


def test_a_retention_pass_that_renames_the_marker_leaves_an_incomplete_runwatch_checkpoint(
        run: Run, tmp_path: Path) -> None:
    # Not a complete DCP folder: .metadata is still there, but the folder is runwatch's.
    copies = _copy(run, tmp_path)
    os.rename(copies[6] / MARKER, copies[6] / f"{MARKER}.deleting")
    found = identify(copies[6])
    assert found is not None and (found.format, found.complete) == (RUNWATCH, False)
    assert [c.step for c in scan(tmp_path) if c.complete] == [3]


class _Exploit:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch pwned",))


def test_metadata_that_would_run_code_is_refused_unread(run: Run, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Someone who can write the folder rewrites .metadata and reseals manifest and marker, so
    # every integrity check passes; loading must still not unpickle it.
    copies = _copy(run, tmp_path)
    target = copies[6]
    payload = pickle.dumps(_Exploit())
    (target / DCP_METADATA).write_bytes(payload)
    manifest = json.loads((target / MANIFEST).read_text())
    manifest["files"][DCP_METADATA] = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"
    (target / MANIFEST).write_bytes(manifest_bytes)
    marker = json.loads((target / MARKER).read_text())
    marker["manifest_sha256"] = hashlib.sha256(manifest_bytes).hexdigest()
    (target / MARKER).write_text(json.dumps(marker))
    monkeypatch.chdir(tmp_path)
    model, optimizer, _ = _plain_model()
    with pytest.raises(ckpt_io.CheckpointError, match=r"pickled Python objects \((posix|os)\.system\)"):
        ckpt_io.load(target, model=model, optimizer=optimizer)
    assert not (tmp_path / "pwned").exists()


def test_every_default_signal_is_monitored_on_a_sharded_model(run: Run) -> None:
    """With FSDP2 the hook's gradient norms are each rank's shard's (no collective is added), and
    monitoring stays on: every rank streamed finite, positive gradient norms for its steps."""
    from runwatch.daemon.store import Store, series

    conn = Store.reader(run.root / "state" / "runwatch.db")
    for rank in range(RANKS):
        steps, norms = series(conn, RUN, rank, "grad_norm")
        assert len(steps) >= 6, rank
        assert np.isfinite(norms).all() and (norms > 0).all(), (rank, norms)
    conn.close()
