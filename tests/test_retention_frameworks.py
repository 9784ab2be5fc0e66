"""Retention against the frameworks' own rotation, with the real frameworks on CPU: Hugging Face
Trainer's ``save_total_limit`` and Lightning's ``ModelCheckpoint(save_top_k=...)`` delete
checkpoints behind runwatch's back. The integrations warn when training starts, and the daemon
raises ``retention_protected_checkpoint_lost`` when one it protects (here: a pinned step) goes."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import DaemonProcess, cli, short_tmpdir, wait_for

from runwatch.daemon.checkpoints import CompetingRetentionWarning
from runwatch.daemon.retention import manager as mgr
from runwatch.daemon.store import Store, alert_events

LOST = "retention_protected_checkpoint_lost"


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    """One daemon for the module: runwatch itself deletes nothing here (latest_k = 10), so every
    checkpoint that goes was deleted by the framework."""
    root = short_tmpdir()
    config = root / "runwatch.toml"
    config.write_text("retention_quiet_seconds = 0\nretention_rescan_seconds = 0.3\n"
                      "[playbook]\nenabled = false\n"
                      "[retention]\nevery_nth = 0\nrecent_hours = 0\nlatest_k = 10\nconfirm_steps = 0\n")
    d = DaemonProcess(root, ["--config", str(config)]).start()
    yield d
    with contextlib.suppress(Exception):
        d.terminate()
    shutil.rmtree(root, ignore_errors=True)


def _data(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 64, (16,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(16, dtype=torch.long), "labels": ids})
    return rows


def _pin_and_wait(d: DaemonProcess, run: str, step: int, path: Path) -> None:
    """Pin ``step`` of ``run`` and wait until a retention pass has recorded ``path`` as pinned (so the
    daemon knew it protected it before the framework deletes it)."""
    assert cli(d, "pin", run, str(step))["pinned"]

    def pinned() -> bool:
        conn = Store.reader(d.store_path)
        try:
            return any(r["path"] == str(path) and r["state"] == "pinned" for r in mgr.decisions(conn, run))
        finally:
            conn.close()
    wait_for(pinned, timeout=30, what=f"a retention pass that protects {path}")


def _lost_alert(d: DaemonProcess, run: str) -> dict[str, Any]:
    def fired() -> dict[str, Any] | None:
        conn = Store.reader(d.store_path)
        try:
            return next((e for e in alert_events(conn, run=run)
                         if e["rule"] == LOST and e["state"] == "firing"), None)
        finally:
            conn.close()
    return wait_for(fired, timeout=30, what=f"{LOST} for {run}")


def test_hf_save_total_limit_is_warned_and_its_deleting_a_pinned_checkpoint_alerted(
        daemon: DaemonProcess) -> None:
    transformers = pytest.importorskip("transformers")
    from runwatch.hooks import RunwatchCallback

    out = daemon.root / "hf"
    d = daemon

    class PinStep2(transformers.TrainerCallback):  # type: ignore[misc]
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 2:  # checkpoint-2 is saved; the Trainer deletes it at step 4
                _pin_and_wait(d, "hf", 2, out / "checkpoint-2")

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=2, report_to=[], save_strategy="steps",
        save_steps=1, save_total_limit=2, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_data(8),
                                   callbacks=[RunwatchCallback(run="hf", socket=d.socket), PinStep2()])
    with pytest.warns(CompetingRetentionWarning, match=r"save_total_limit=2\).*Set save_total_limit=None"):
        trainer.train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]

    alert = _lost_alert(d, "hf")
    assert str(out / "checkpoint-2") in alert["summary"] and "save_total_limit" in alert["summary"]
    assert "checkpoint-1" not in alert["summary"]  # it was only kept by a policy, not protected
    firing = cli(d, "alerts", "--run", "hf")["firing"]
    assert [a["rule"] for a in firing] == [LOST]
    [lost] = cli(d, "checkpoints", "hf")["gone"]
    assert (lost["state"], lost["step"], lost["path"]) == ("lost", 2, str(out / "checkpoint-2"))
    assert lost["reason"].startswith("pinned; deleted outside runwatch, likely by the Hugging Face Trainer")


def test_lightning_save_top_k_is_warned_and_its_deleting_a_pinned_checkpoint_alerted(
        daemon: DaemonProcess) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import ModelCheckpoint

    from runwatch.hooks import RunwatchLightningCallback
    from runwatch.hooks.tinygpt import TinyGPT

    folder = daemon.root / "pl"
    d = daemon

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = TinyGPT(context=16)

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.gpt(batch["input_ids"], labels=batch["labels"]).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class PinStep2(pl.Callback):
        # Lightning runs ModelCheckpoint after the other callbacks: at step 3's batch end the
        # step=2 file is still there, and ModelCheckpoint (save_top_k=1) deletes it right after.
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == 3:
                _pin_and_wait(d, "pl", 2, folder / "epoch=0-step=2.ckpt")

    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=daemon.root, callbacks=[
            RunwatchLightningCallback(run="pl", socket=d.socket), PinStep2(),
            ModelCheckpoint(dirpath=folder, every_n_train_steps=1)])  # save_top_k defaults to 1
    loader = torch.utils.data.DataLoader(_data(8), batch_size=2)
    with pytest.warns(CompetingRetentionWarning, match=r"ModelCheckpoint\(save_top_k=1\).*save_top_k=-1"):
        trainer.fit(Module(), loader)
    assert [p.name for p in folder.glob("*.ckpt")] == ["epoch=0-step=4.ckpt"]

    alert = _lost_alert(d, "pl")
    summary = alert["summary"]
    assert str(folder / "epoch=0-step=2.ckpt") in summary and "save_top_k" in summary
    # step 1 and 3 went too, but nothing protected them once a newer one existed: not reported
    assert "step=1" not in summary and "step=3" not in summary
    [lost] = cli(d, "checkpoints", "pl")["gone"]
    assert (lost["state"], lost["step"]) == ("lost", 2)


def test_no_warning_when_the_framework_keeps_every_checkpoint(daemon: DaemonProcess, tmp_path: Path) -> None:
    """save_total_limit=None and save_top_k=-1 delete nothing: no warning (and none for a
    ModelCheckpoint writing elsewhere than the folder runwatch manages)."""
    import warnings

    transformers = pytest.importorskip("transformers")
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import ModelCheckpoint

    from runwatch.hooks import RunwatchCallback
    from runwatch.hooks import lightning as rw_lightning

    model = torch.nn.Linear(2, 2)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), save_strategy="steps",
                                          save_steps=1, save_total_limit=None, use_cpu=True, report_to=[])
    callback = RunwatchCallback(run="hf-keeps-all", socket=daemon.socket)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        callback.on_train_begin(args, transformers.TrainerState(), None, model=model,
                                optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        callback.on_train_end(args, None, None)
        trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[
            ModelCheckpoint(dirpath=tmp_path / "pl", save_top_k=-1),
            ModelCheckpoint(dirpath=tmp_path / "elsewhere", save_top_k=1, every_n_train_steps=5)])
        rw_lightning._warn_competing_retention(trainer, (tmp_path / "pl").absolute())
    assert not [w for w in seen if issubclass(w.category, CompetingRetentionWarning)]
    with pytest.warns(CompetingRetentionWarning, match="save_top_k=1"):
        rw_lightning._warn_competing_retention(trainer, (tmp_path / "elsewhere").absolute())
