"""Checkpoints a run can come back from: saved atomically, recognised in every supported format,
refused when damaged (saying why), loaded bit-exactly and without unpickling anything; and the
data manifest that says whether a suspect shard changed. Real files, tiny real models on CPU."""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from runwatch.daemon import checkpoints  # noqa: E402
from runwatch.daemon.checkpoints import CheckpointError, inside, latest_clean, scan, verify  # noqa: E402
from runwatch.daemon.manifest import (  # noqa: E402
    MANIFEST_NAME,
    ManifestError,
    verify_manifest,
    write_manifest,
)
from runwatch.daemon.protocol import shard_id  # noqa: E402
from runwatch.hooks.checkpoint import load, restore_latest_clean, save  # noqa: E402


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _setup(seed: int) -> tuple[Any, Any, Any]:
    """A small model with dropout (so training consumes torch's RNG), AdamW and a StepLR."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def _train(model: Any, optimizer: Any, scheduler: Any, steps: int) -> None:
    # Inputs from numpy, targets scaled by Python's random, dropout from torch: continuing
    # identically needs all three RNGs restored.
    for _ in range(steps):
        x = torch.from_numpy(np.random.standard_normal((4, 8)).astype(np.float32))
        target = torch.ones(4, 1) * random.random()
        loss = (model(x) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    """Recursive equality where tensors must be bit-identical (torch.equal, same dtype)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _draws() -> tuple[list[float], list[float], list[float]]:
    return torch.rand(5).tolist(), np.random.random(5).tolist(), [random.random() for _ in range(5)]


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _weights(model: Any) -> dict[str, Any]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------- runwatch format


def test_round_trip_restores_state_bit_exactly_and_the_next_random_numbers(tmp_path: Path) -> None:
    _seed_all(0)
    model, optimizer, scheduler = _setup(0)
    _train(model, optimizer, scheduler, 3)
    ckpt = save(
        tmp_path,
        3,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        data_position={"shard": 17, "offset": 4096},
        extra={"note": "before spike", "ids": [1, 2]},
    )
    expected = _draws()

    assert ckpt.path == tmp_path / "step-000000003" and ckpt.format == "runwatch" and ckpt.complete
    assert scan(tmp_path) == [ckpt]
    assert {p.name for p in ckpt.path.iterdir()} == {"state.pt", "manifest.json", "COMPLETE"}
    assert ckpt.size_bytes == sum(p.stat().st_size for p in ckpt.path.iterdir())

    _seed_all(123)  # a different process state that load must overwrite
    other, other_opt, other_sched = _setup(1)
    restored = load(ckpt.path, model=other, optimizer=other_opt, scheduler=other_sched)

    assert restored.step == 3 and restored.checkpoint == ckpt
    assert restored.data_position == {"shard": 17, "offset": 4096}
    assert restored.extra == {"note": "before spike", "ids": [1, 2]}
    _assert_same(model.state_dict(), other.state_dict(), "model")
    _assert_same(optimizer.state_dict(), other_opt.state_dict(), "optimizer")
    assert scheduler.state_dict() == other_sched.state_dict()
    assert _draws() == expected


def test_training_continued_after_load_equals_training_never_interrupted(tmp_path: Path) -> None:
    _seed_all(0)
    model, optimizer, scheduler = _setup(0)
    _train(model, optimizer, scheduler, 3)
    save(tmp_path, 3, model=model, optimizer=optimizer, scheduler=scheduler)
    _train(model, optimizer, scheduler, 4)

    def resumed(restore_rng: bool) -> Any:
        _seed_all(99)
        again, again_opt, again_sched = _setup(1)
        load(
            tmp_path / "step-000000003",
            model=again,
            optimizer=again_opt,
            scheduler=again_sched,
            restore_rng=restore_rng,
        )
        _train(again, again_opt, again_sched, 4)
        return again

    continued = resumed(restore_rng=True)
    for (name, a), b in zip(model.named_parameters(), continued.parameters(), strict=True):
        assert torch.equal(a, b), name
    # The comparison above depends on the RNG restore: without it the runs part ways.
    unseeded = resumed(restore_rng=False)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), unseeded.parameters(), strict=True))


def test_ddp_wrapped_model_saves_plain_keys_and_loads_into_a_plain_model(tmp_path: Path) -> None:
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model, optimizer, _ = _setup(0)
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        ckpt = save(tmp_path / "ck", 1, model=wrapped, optimizer=optimizer)
    finally:
        dist.destroy_process_group()
    plain, plain_opt, _ = _setup(1)
    load(ckpt.path, model=plain, optimizer=plain_opt)
    _assert_same(model.state_dict(), plain.state_dict())


def test_interrupted_save_is_ignored_and_a_failed_save_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer, _ = _setup(0)
    done = save(tmp_path, 100, model=model, optimizer=optimizer)
    # What a save killed half-way leaves: a tmp folder with a partial state.pt, no marker.
    leftover = tmp_path / ".tmp-step-000000200-4242"
    leftover.mkdir()
    (leftover / "state.pt").write_bytes(b"PK\x03\x04partial")
    assert scan(tmp_path) == [done]
    assert latest_clean(tmp_path) == (done, [])

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match=r"step-000000300.*No space left"):
        save(tmp_path, 300, model=model, optimizer=optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == [leftover.name, done.path.name]


def test_an_existing_step_is_never_overwritten(tmp_path: Path) -> None:
    model, optimizer, _ = _setup(0)
    first = save(tmp_path, 100, model=model, optimizer=optimizer)
    before = {p.name: p.read_bytes() for p in first.path.iterdir()}
    _train(model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1), 1)
    with pytest.raises(CheckpointError, match="step-000000100: already exists"):
        save(tmp_path, 100, model=model, optimizer=optimizer)
    assert {p.name: p.read_bytes() for p in first.path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000100"]


def test_save_refuses_extra_data_that_weights_only_loading_would_refuse(tmp_path: Path) -> None:
    model, optimizer, _ = _setup(0)
    with pytest.raises(CheckpointError, match=r"extra\['args'\] is a Namespace"):
        save(tmp_path, 1, model=model, optimizer=optimizer, extra={"args": argparse.Namespace(lr=1)})
    assert not any(tmp_path.iterdir())


def _rewrite_manifest(path: Path, files: dict[str, Any]) -> None:
    """Replace manifest.json and keep the marker's hash of it consistent (a forged checkpoint)."""
    body = json.dumps({"files": files, "step": 100, "format": 1}).encode()
    (path / "manifest.json").write_bytes(body)
    marker = json.loads((path / "COMPLETE").read_text())
    marker["manifest_sha256"] = __import__("hashlib").sha256(body).hexdigest()
    (path / "COMPLETE").write_text(json.dumps(marker))


def _damage_escape(path: Path) -> None:
    (path.parent / "secret").write_bytes(b"x")
    entry = json.loads((path / "manifest.json").read_text())["files"]["state.pt"]
    _rewrite_manifest(path, {"state.pt": entry, "../secret": {"size": 1, "sha256": "0" * 64}})


DAMAGE = {
    # name: (what is done to step-100, what verify must say)
    "flipped byte": (
        lambda p: _flip_byte(p / "state.pt", p.joinpath("state.pt").stat().st_size // 2),
        "sha256 mismatch in state.pt",
    ),
    "truncated": (lambda p: os.truncate(p / "state.pt", 100), "size mismatch in state.pt"),
    "state deleted": (lambda p: (p / "state.pt").unlink(), "state.pt is missing"),
    "extra file": (lambda p: (p / "notes.txt").write_text("hi"), "unlisted extra file notes.txt"),
    "manifest edited": (
        lambda p: (p / "manifest.json").write_text('{"files": {}}'),
        "manifest.json sha256 mismatch",
    ),
    "marker garbage": (
        lambda p: (p / "COMPLETE").write_text("{not json"),
        "COMPLETE marker is not valid JSON",
    ),
    "marker deleted": (lambda p: (p / "COMPLETE").unlink(), "incomplete"),
    "manifest escapes": (_damage_escape, "not inside"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_checkpoint_is_refused_with_the_reason_and_load_changes_nothing(
    tmp_path: Path, damage: str
) -> None:
    do, reason = DAMAGE[damage]
    model, optimizer, _ = _setup(0)
    ckpt = save(tmp_path / "ck", 100, model=model, optimizer=optimizer)
    do(ckpt.path)
    [found] = scan(tmp_path / "ck")
    assert found.complete is (damage != "marker deleted")
    with pytest.raises(CheckpointError, match=re.escape(reason)) as refused:
        verify(found)
    assert str(ckpt.path) in str(refused.value)

    other, other_opt, _ = _setup(1)
    before = _weights(other)
    with pytest.raises(CheckpointError, match=re.escape(reason)):
        load(ckpt.path, model=other, optimizer=other_opt)
    _assert_same(before, other.state_dict())
    assert other_opt.state_dict()["state"] == {}


def test_a_checkpoint_that_does_not_fit_is_refused_before_anything_changes(tmp_path: Path) -> None:
    model, optimizer, scheduler = _setup(0)
    _train(model, optimizer, scheduler, 1)
    ckpt = save(tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler)

    wider = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1)
    )
    before = _weights(wider)
    with pytest.raises(
        CheckpointError, match=r"shapes differ from this model: 0\.weight \(16, 8\) vs \(32, 8\)"
    ):
        load(ckpt.path, model=wider)
    _assert_same(before, wider.state_dict())

    # Model fits, optimizer does not: the model must not be half-restored either.
    other, _, _ = _setup(1)
    before = _weights(other)
    split = torch.optim.AdamW(
        [{"params": list(other.parameters())[:2]}, {"params": list(other.parameters())[2:]}]
    )
    with pytest.raises(
        CheckpointError, match=r"parameter groups hold \[4\] parameters, this optimizer's hold \[2, 2\]"
    ):
        load(ckpt.path, model=other, optimizer=split)
    _assert_same(before, other.state_dict())
    assert split.state_dict()["state"] == {}


def test_corrupt_newest_is_refused_and_the_next_older_offered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, optimizer, scheduler = _setup(0)
    _train(model, optimizer, scheduler, 1)
    step100 = save(tmp_path, 100, model=model, optimizer=optimizer, scheduler=scheduler)
    at_100 = _weights(model)
    _train(model, optimizer, scheduler, 1)
    step200 = save(tmp_path, 200, model=model, optimizer=optimizer, scheduler=scheduler)
    _train(model, optimizer, scheduler, 1)
    step300 = save(tmp_path, 300, model=model, optimizer=optimizer, scheduler=scheduler)
    _flip_byte(step200.path / "state.pt", step200.path.joinpath("state.pt").stat().st_size // 2)

    # Rewinding to before a spike at step 300: step-200 is the candidate, but it is corrupt.
    offered, refused = latest_clean(tmp_path, before_step=300)
    assert offered == step100
    assert [(c, "sha256 mismatch in state.pt" in why) for c, why in refused] == [(step200, True)]
    assert latest_clean(tmp_path) == (step300, [])
    assert latest_clean(tmp_path, before_step=100) == (None, [])
    assert latest_clean(tmp_path, exclude=[step300.path])[0] == step100

    caplog.set_level(logging.INFO, logger="runwatch.hooks")
    other, other_opt, other_sched = _setup(1)
    restored = restore_latest_clean(
        tmp_path, before_step=300, model=other, optimizer=other_opt, scheduler=other_sched
    )
    assert restored.step == 100 and restored.checkpoint == step100
    _assert_same(at_100, other.state_dict())
    assert "step-000000200 refused" in caplog.text and "sha256 mismatch in state.pt" in caplog.text
    assert "restored checkpoint step-000000100 (step 100) instead of step-000000200" in caplog.text

    with pytest.raises(CheckpointError, match=r"no clean checkpoint before step 100"):
        restore_latest_clean(tmp_path, before_step=100, model=other)


# ------------------------------------------------------------------------- other formats


def test_hugging_face_checkpoint_is_recognised_and_loads_tied_weights(tmp_path: Path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight  # as HF ties lm_head to the input embedding

    torch.manual_seed(0)
    model = Tied()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    model.head(model.embed(torch.tensor([1, 2]))).sum().backward()
    optimizer.step()
    scheduler.step()
    # What Trainer writes; safetensors stores a tied tensor once, so head.weight is absent.
    ckpt_dir = tmp_path / "checkpoint-50"
    ckpt_dir.mkdir()
    safetensors_torch.save_file({"embed.weight": model.embed.weight.detach()}, ckpt_dir / "model.safetensors")
    torch.save(optimizer.state_dict(), ckpt_dir / "optimizer.pt")
    torch.save(scheduler.state_dict(), ckpt_dir / "scheduler.pt")
    (ckpt_dir / "trainer_state.json").write_text(json.dumps({"global_step": 50, "epoch": 1.5}))
    # Trainer's rng_state.pth pickles numpy's state as an ndarray (allow-listed, as Trainer does).
    _seed_all(5)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    torch.save(rng, ckpt_dir / "rng_state.pth")
    expected = _draws()
    (tmp_path / "tmp-checkpoint-60").mkdir()  # Trainer's own in-progress folder
    (tmp_path / "checkpoint-70").mkdir()  # weights written, trainer_state.json not yet
    (tmp_path / "checkpoint-70" / "model.safetensors").write_bytes(b"partial")

    found = scan(tmp_path)
    assert [(c.path.name, c.step, c.format, c.complete) for c in found] == [
        ("checkpoint-50", 50, "huggingface", True),
        ("checkpoint-70", 70, "huggingface", False),
    ]
    assert found[0].saved_at == (ckpt_dir / "trainer_state.json").stat().st_mtime

    torch.manual_seed(1)
    other = Tied()
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-2)
    other_sched = torch.optim.lr_scheduler.StepLR(other_opt, 1, gamma=0.5)
    restored = restore_latest_clean(tmp_path, model=other, optimizer=other_opt, scheduler=other_sched)
    assert _draws() == expected
    assert restored.step == 50 and restored.data_position == {"epoch": 1.5}
    assert torch.equal(other.head.weight, model.head.weight)
    assert other.head.weight is other.embed.weight  # still tied
    _assert_same(optimizer.state_dict(), other_opt.state_dict())
    assert other_sched.state_dict() == scheduler.state_dict()

    (ckpt_dir / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is empty"):
        verify(scan(tmp_path)[0])


def _lightning_ckpt(
    path: Path, step: int, model: Any, optimizer: Any, scheduler: Any, hyper_parameters: Any
) -> None:
    torch.save(
        {
            "epoch": 0,
            "global_step": step,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": model.state_dict(),
            "optimizer_states": [optimizer.state_dict()],
            "lr_schedulers": [scheduler.state_dict()],
            "hyper_parameters": hyper_parameters,
        },
        path,
    )


def _leave_marker(path: str) -> None:
    Path(path).write_text("unpickled")


class _Trap:
    """Unpickling this calls _leave_marker: the file's existence proves code ran on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_leave_marker, (self.marker,))


def test_lightning_checkpoint_loads_and_one_with_pickled_objects_is_refused_unopened(tmp_path: Path) -> None:
    model, optimizer, scheduler = _setup(0)
    _train(model, optimizer, scheduler, 2)
    good = tmp_path / "epoch=0-step=100.ckpt"
    _lightning_ckpt(good, 100, model, optimizer, scheduler, {"lr": 0.01, "layers": [8, 16]})
    marker = tmp_path / "trap-sprung"
    trapped = tmp_path / "epoch=0-step=200.ckpt"
    _lightning_ckpt(
        trapped, 200, model, optimizer, scheduler, argparse.Namespace(lr=0.01, trap=_Trap(marker))
    )
    # The trap works: loading it the unsafe way runs the code.
    torch.load(trapped, weights_only=False)
    assert marker.exists()
    marker.unlink()

    found = scan(tmp_path)
    assert [(c.path.name, c.step, c.format, c.complete) for c in found] == [
        (good.name, 100, "lightning", True),
        (trapped.name, 200, "lightning", True),
    ]
    other, other_opt, other_sched = _setup(1)
    with pytest.raises(
        CheckpointError,
        match=r"epoch=0-step=200.ckpt: contains pickled Python objects.*"
        r"will not unpickle",
    ):
        load(trapped, model=other, optimizer=other_opt, scheduler=other_sched)
    assert not marker.exists()

    # Rewinding skips the one that will not load and restores the older one.
    restored = restore_latest_clean(tmp_path, model=other, optimizer=other_opt, scheduler=other_sched)
    assert not marker.exists()
    assert restored.step == 100 and restored.checkpoint.path == good
    _assert_same(model.state_dict(), other.state_dict())
    _assert_same(optimizer.state_dict(), other_opt.state_dict())


def test_lightning_truncated_or_corrupt_file_is_refused(tmp_path: Path) -> None:
    model, optimizer, scheduler = _setup(0)
    whole = tmp_path / "src.bin"
    _lightning_ckpt(whole, 5, model, optimizer, scheduler, {})
    data = whole.read_bytes()
    whole.unlink()
    (tmp_path / "last.ckpt").write_bytes(data[: len(data) // 2])  # still being written
    corrupt = tmp_path / "epoch=0-step=5.ckpt"
    corrupt.write_bytes(data)
    with zipfile.ZipFile(corrupt) as archive:
        member = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 0)
    # The member's bytes start after its 30-byte local header, name and extra field.
    with open(corrupt, "rb") as f:
        f.seek(member.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), dtype="<u2")
    _flip_byte(corrupt, member.header_offset + 30 + int(name_len) + int(extra_len))

    truncated, flipped = scan(tmp_path)
    assert (truncated.step, truncated.complete) == (-1, False)
    with pytest.raises(CheckpointError, match="incomplete"):
        verify(truncated)
    assert (flipped.step, flipped.complete) == (5, True)
    with pytest.raises(CheckpointError, match=re.escape(f"CRC mismatch in archive member {member.filename}")):
        verify(flipped)
    assert latest_clean(tmp_path)[0] is None


def test_dcp_folders_are_recognised_by_metadata_and_not_loaded_as_runwatch(tmp_path: Path) -> None:
    for name in ("step_300", "global_step400", "step-500"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".metadata").write_bytes(b"meta")
        (tmp_path / name / "__0_0.distcp").write_bytes(b"shard")
    (tmp_path / "step_600").mkdir()  # no .metadata: DCP has not finished, nothing to list
    found = scan(tmp_path)
    assert [(c.path.name, c.step, c.format, c.complete) for c in found] == [
        ("step_300", 300, "dcp", True),
        ("global_step400", 400, "dcp", True),
        ("step-500", 500, "dcp", True),
    ]
    assert found[0].size_bytes == len(b"meta") + len(b"shard")
    verify(found[0])
    model, _, _ = _setup(0)
    with pytest.raises(CheckpointError, match=r"torch\.distributed\.checkpoint"):
        load(found[0].path, model=model)


def test_a_runwatch_sharded_folder_without_its_marker_is_an_incomplete_runwatch_checkpoint(
        tmp_path: Path) -> None:
    # What a sharded save leaves when its COMPLETE is gone (retention renames it away first, or
    # someone deleted it): DCP's .metadata is there, but so is runwatch's state.pt. Taken for a
    # complete DCP folder, it would be offered as a rewind target with nothing checked.
    folder = tmp_path / "step-000000500"
    folder.mkdir()
    for name, data in ((".metadata", b"meta"), ("__0_0.distcp", b"shard"), ("state.pt", b"state"),
                       ("manifest.json", b"{}")):
        (folder / name).write_bytes(data)
    (found,) = scan(tmp_path)
    assert (found.format, found.complete, found.step) == ("runwatch", False, 500)
    with pytest.raises(CheckpointError, match=r"incomplete \(no COMPLETE marker\)"):
        verify(found)
    assert checkpoints.manifest_layout(found) is None
    assert latest_clean(tmp_path) == (None, [(found, f"{folder}: incomplete (no COMPLETE marker)")])


def test_scan_skips_odd_entries_and_lists_the_rest(tmp_path: Path) -> None:
    assert scan(tmp_path / "nothing-here") == []
    model, optimizer, _ = _setup(0)
    good = save(tmp_path, 7, model=model, optimizer=optimizer)
    (tmp_path / "step-000000008").write_text("a file where a folder belongs")
    (tmp_path / "checkpoint-9").write_text("likewise")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "step-000000010").symlink_to(good.path)  # listed once, as itself
    if os.geteuid() != 0:  # root reads through permissions
        locked = tmp_path / "step-000000011"
        locked.mkdir(mode=0)
    try:
        assert scan(tmp_path) == [good]
    finally:
        if os.geteuid() != 0:
            locked.chmod(0o700)
    assert [c.to_json()["path"] for c in scan(tmp_path)] == [str(good.path)]
    assert json.loads(json.dumps(good.to_json()))["step"] == 7


def test_inside_refuses_paths_that_leave_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ckpts"
    (folder / "step-000000001").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (folder / "out").symlink_to(tmp_path / "elsewhere")
    (folder / "in").symlink_to(folder / "step-000000001")

    assert inside(folder, Path("step-000000001")) == (folder / "step-000000001").resolve()
    assert (
        inside(folder, folder / "step-000000001" / "state.pt")
        == (folder / "step-000000001/state.pt").resolve()
    )
    assert inside(folder, Path("in")) == (folder / "step-000000001").resolve()
    for bad in (
        Path("../elsewhere"),
        Path("step-000000001/../../elsewhere"),
        tmp_path / "elsewhere",
        Path("/etc/passwd"),
        Path("out"),
        Path("out/x"),
        Path("."),
    ):
        with pytest.raises(CheckpointError, match="not inside"):
            inside(folder, bad)


# ------------------------------------------------------------------------- data manifest


def _data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    for i in range(3):
        (data / "train" / f"shard-{i + 16:05d}.jsonl.gz").write_bytes(bytes([i]) * 1000)
    (data / "train-00003-of-00010.parquet").write_bytes(b"parquet")
    (data / "README").write_text("not a shard")
    return data


def test_manifest_records_every_file_with_the_ids_a_hook_reports(tmp_path: Path) -> None:
    data = _data(tmp_path)
    path = write_manifest(data)
    assert path == data / MANIFEST_NAME
    files = json.loads(path.read_text())["files"]
    assert sorted(files) == [
        "README",
        "train-00003-of-00010.parquet",
        "train/shard-00016.jsonl.gz",
        "train/shard-00017.jsonl.gz",
        "train/shard-00018.jsonl.gz",
    ]
    entry = files["train/shard-00017.jsonl.gz"]
    assert entry["size"] == 1000
    assert entry["sha256"] == checkpoints.file_sha256(data / "train/shard-00017.jsonl.gz")
    assert entry["shard_id"] == shard_id("shard-00017")
    assert entry["shard_ids"] == [shard_id("shard-00017"), 17]
    # "-of-00010" is the shard count, not the shard.
    assert files["train-00003-of-00010.parquet"]["shard_ids"][1:] == [3]
    assert files["README"]["shard_ids"] == [shard_id("README")]
    assert not list(data.glob(f".{MANIFEST_NAME}*"))  # no temporary file left behind

    checks = verify_manifest(data)
    assert [(c.path, c.status) for c in checks] == [(p, "match") for p in sorted(files)]


def test_manifest_reports_mismatch_missing_and_new_per_file(tmp_path: Path) -> None:
    data = _data(tmp_path)
    write_manifest(data)
    _flip_byte(data / "train/shard-00017.jsonl.gz", 500)  # same size, different bytes
    (data / "train/shard-00018.jsonl.gz").unlink()
    (data / "train/shard-00019.jsonl.gz").write_bytes(b"late arrival")

    status = {c.path: c for c in verify_manifest(data)}
    assert {p: c.status for p, c in status.items()} == {
        "README": "match",
        "train-00003-of-00010.parquet": "match",
        "train/shard-00016.jsonl.gz": "match",
        "train/shard-00017.jsonl.gz": "mismatch",
        "train/shard-00018.jsonl.gz": "missing",
        "train/shard-00019.jsonl.gz": "new",
    }
    assert "sha256" in status["train/shard-00017.jsonl.gz"].detail

    # An alert names shard 17 however the hook reported it; only that shard is re-hashed.
    for shard in (17, "00017", "shard-00017", "shard-00017.jsonl.gz", "train/shard-00017.jsonl.gz"):
        assert [(c.path, c.status) for c in verify_manifest(data, shard)] == [
            ("train/shard-00017.jsonl.gz", "mismatch")
        ], shard
    assert [c.status for c in verify_manifest(data, shard_id("shard-00016"))] == ["match"]
    assert [c.status for c in verify_manifest(data, 18)] == ["missing"]
    assert [c.path for c in verify_manifest(data, 3)] == ["train-00003-of-00010.parquet"]


def test_manifest_refuses_unknown_shards_and_a_missing_manifest(tmp_path: Path) -> None:
    data = _data(tmp_path)
    with pytest.raises(
        ManifestError, match=re.escape(f"no {MANIFEST_NAME}; run `runwatch manifest {data}` first")
    ):
        verify_manifest(data)
    write_manifest(data)
    for unknown in (99, "shard-00099", 10):  # 10 is train-00003-of-00010's count, not a shard
        with pytest.raises(ManifestError, match=f"shard {unknown!r} matches no file"):
            verify_manifest(data, unknown)
    shutil.copy(data / MANIFEST_NAME, tmp_path / "saved.json")
    body = json.loads((tmp_path / "saved.json").read_text())
    body["files"]["../../etc/passwd"] = {"size": 1, "sha256": "0" * 64, "shard_id": 1, "shard_ids": [1]}
    (data / MANIFEST_NAME).write_text(json.dumps(body))
    with pytest.raises(ManifestError, match="not a path inside"):
        verify_manifest(data)
