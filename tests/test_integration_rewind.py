"""Rewinds through the framework callbacks: a real Hugging Face Trainer and a real Lightning
Trainer (tiny models, CPU) save their own checkpoints, the callbacks register them with a real
daemon process, and ``runwatch rewind`` (the CLI, as a user runs it) is applied in the training
process while it trains.

What each test proves, read back independently of the watch: the checkpoints the daemon lists
are the ones on disk; the weights and optimizer state in force right after the rewind are the
checkpoint's, read from its files; every learning rate used before and after the rewind is the
schedule's, restarted from the checkpoint's position and halved; step numbers keep counting
forward; and a second rewind, to a checkpoint saved after the first, does not scale twice.
"""

from __future__ import annotations

import copy
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import DaemonProcess, cli, cli_run, wait_for

from runwatch.daemon.store import Store, series

SAVE_EVERY = 5
REWIND_TO = 10
LR_SCALE = 0.5
BASE_LR = 1e-3
MAX_STEPS = 300  # a bound, not the length: training is stopped a few steps after the rewind
STEPS_AFTER = 6  # steps trained after the rewind before stopping
STEP_SLEEP = 0.05  # slow steps: time for the CLI to start and the command to arrive


class Rewinder(threading.Thread):
    """Waits until the daemon lists the run's checkpoint of ``REWIND_TO``, then runs
    ``runwatch rewind RUN --to REWIND_TO --lr-scale 0.5`` (which waits for the run to apply it)
    while the training goes on in the test's thread."""

    def __init__(self, d: DaemonProcess, run: str) -> None:
        super().__init__(daemon=True)
        self.d, self.run_name = d, run
        self.listed: list[dict[str, Any]] = []
        self.reply: subprocess.CompletedProcess[str] | None = None
        self.error: BaseException | None = None
        self.start()

    def _listed(self) -> list[dict[str, Any]]:
        r = cli_run(self.d, "checkpoints", self.run_name)
        found = json.loads(r.stdout)["checkpoints"] if r.returncode == 0 else []
        return found if any(c["step"] == REWIND_TO for c in found) else []

    def run(self) -> None:
        try:
            self.listed = wait_for(self._listed, timeout=40, what=f"checkpoint {REWIND_TO} registered")
            self.reply = cli_run(self.d, "rewind", self.run_name, "--to", str(REWIND_TO),
                                 "--lr-scale", str(LR_SCALE), "--wait", "40")
        except BaseException as exc:
            self.error = exc

    def result(self) -> dict[str, Any]:
        self.join(timeout=60)
        if self.error is not None:
            raise self.error
        assert self.reply is not None and self.reply.returncode == 0, self.reply
        return json.loads(self.reply.stdout)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def linear(step: int) -> float:
    """The schedule both tests use: the learning rate of the update made at 0-based ``step``."""
    return BASE_LR * (MAX_STEPS - step) / MAX_STEPS


def expected_lr(step: int, rewound_before: int) -> float:
    """The rate of the update at 0-based optimizer ``step``, for a rewind applied before step
    ``rewound_before``: the schedule's until then, after it the schedule restarted from the
    checkpoint's position (``REWIND_TO`` steps taken), times ``LR_SCALE``."""
    if step < rewound_before:
        return linear(step)
    return LR_SCALE * linear(REWIND_TO + step - rewound_before)


def assert_same_optimizer_state(got: dict[str, Any], saved: dict[str, Any]) -> None:
    assert got["state"].keys() == saved["state"].keys() and got["state"]
    for index, state in saved["state"].items():
        for key, value in state.items():
            mine = torch.as_tensor(got["state"][index][key])
            assert torch.equal(mine, torch.as_tensor(value)), (index, key)


def _data(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 64, (16,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(16, dtype=torch.long), "labels": ids})
    return rows


# -- Hugging Face ------------------------------------------------------------------------------


def test_huggingface_trainer_registers_its_checkpoints_and_rewinds_in_process(
        daemon: DaemonProcess, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from runwatch.hooks import RunwatchCallback

    class Recorder(transformers.TrainerCallback):  # type: ignore[misc]
        """Listed after RunwatchCallback, so its forward pre-hook is registered after the
        watch's and runs after it: at the first forward after the rewind it sees the restored
        state. Trainer calls on_step_begin before that forward, so the snapshot taken there is
        the state the rewind replaced."""

        def __init__(self, rw: Any) -> None:
            self.rw = rw
            self.begin: dict[str, torch.Tensor] = {}
            self.before: dict[str, torch.Tensor] = {}
            self.after: dict[str, torch.Tensor] = {}
            self.optimizer_after: dict[str, Any] = {}
            self.rewound_before: int | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                           optimizer: Any = None, lr_scheduler: Any = None, **kw: Any) -> None:
            self.state, self.optimizer = state, optimizer
            # What the Trainer steps and saves: accelerate's wrapper around the optimizer the
            # watch restores into, and a scheduler accelerate left unwrapped (created after
            # prepare()), which is the one whose state_dict goes to scheduler.pt.
            self.objects = (type(optimizer).__name__, self.rw.watch.optimizer is optimizer.optimizer,
                            self.rw.watch.scheduler is lr_scheduler)
            model.register_forward_pre_hook(self.forward)

        def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            self.begin = snapshot(model)

        def forward(self, module: torch.nn.Module, args: Any) -> None:
            if self.rewound_before is None and self.rw.watch.control.rewinds:
                self.rewound_before = self.state.global_step
                self.before, self.after = self.begin, snapshot(module)
                self.optimizer_after = copy.deepcopy(self.optimizer.optimizer.state_dict())

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            time.sleep(STEP_SLEEP)
            if self.rewound_before is not None and state.global_step >= self.rewound_before + STEPS_AFTER:
                control.should_training_stop = True

    run, out = "hf-rewind", tmp_path / "out"
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=MAX_STEPS, per_device_train_batch_size=4, logging_steps=1,
        report_to=[], save_strategy="steps", save_steps=SAVE_EVERY, use_cpu=True, learning_rate=BASE_LR,
        lr_scheduler_type="linear", warmup_steps=0, dataloader_num_workers=0, disable_tqdm=True)
    rw = RunwatchCallback(run=run, socket=daemon.socket)
    recorder = Recorder(rw)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_data(64), callbacks=[rw, recorder])
    rewinder = Rewinder(daemon, run)
    trainer.train()
    reply = rewinder.result()
    assert recorder.objects == ("AcceleratedOptimizer", True, True)

    # Registered as the Trainer saved them, before the rewind was asked for, and all of them by
    # the end: exactly the checkpoint-N folders on disk.
    assert [(c["step"], c["format"]) for c in rewinder.listed if c["step"] <= REWIND_TO] == \
        [(s, "huggingface") for s in range(SAVE_EVERY, REWIND_TO + 1, SAVE_EVERY)]
    on_disk = sorted((p for p in out.glob("checkpoint-*")), key=lambda p: int(p.name.split("-")[1]))
    listed = cli(daemon, "checkpoints", run)["checkpoints"]
    assert [(c["step"], c["path"], c["format"]) for c in listed] == \
        [(int(p.name.split("-")[1]), str(p), "huggingface") for p in on_disk]
    assert len(listed) >= 3

    # The rewind: applied, to checkpoint-10, before the step the recorder saw it at.
    assert reply["state"] == "applied", reply
    result = reply["result"]
    ckpt = out / f"checkpoint-{REWIND_TO}"
    assert result["checkpoint_step"] == REWIND_TO and result["checkpoint"] == str(ckpt)
    assert result["lr_scale"] == pytest.approx(LR_SCALE) and result["resumed"] is True
    g = reply["step"]
    assert g == recorder.rewound_before and g > REWIND_TO  # watch steps are HF's global_step

    # Weights right after the rewind are checkpoint-10's (not those the step began with); the
    # optimizer state is optimizer.pt's, with the learning rate halved.
    saved_weights = load_file(ckpt / "model.safetensors")
    assert all(torch.equal(recorder.after[k], v) for k, v in saved_weights.items())
    assert not all(torch.equal(recorder.before[k], v) for k, v in saved_weights.items())
    saved_optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert_same_optimizer_state(recorder.optimizer_after, saved_optimizer)
    assert recorder.optimizer_after["param_groups"][0]["lr"] == pytest.approx(
        LR_SCALE * saved_optimizer["param_groups"][0]["lr"], rel=1e-12)

    # Every rate used, as the Trainer logged it (log step j is 0-based optimizer step j - 1).
    logged = {h["step"] - 1: h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h}
    final = trainer.state.global_step
    assert sorted(logged) == list(range(final)) and final == g + STEPS_AFTER
    for step, lr in logged.items():
        assert lr == pytest.approx(expected_lr(step, g), rel=1e-12), step
    # ...and the rate in force now, for a next step: the scheduler kept the scale.
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected_lr(final, g), rel=1e-12)

    # The daemon saw the same: learning_rate/0 and lr_scale at the watch's (forward-counting) steps.
    conn = Store.reader(daemon.store_path)
    steps, rates = series(conn, run, 0, "learning_rate/0")
    assert steps.tolist() == list(range(final))
    assert rates.tolist() == pytest.approx([expected_lr(s, g) for s in range(final)], rel=1e-12)
    scale_steps, scales = series(conn, run, 0, "lr_scale")
    assert scale_steps.tolist() == list(range(g, final)) and set(scales.tolist()) == {LR_SCALE}

    # Checkpoints record the scale in force when saved (1 before the rewind, 0.5 after).
    sidecars = {int(p.name.split("-")[1]): json.loads((p / "runwatch.json").read_text()) for p in on_disk}
    assert {s: c["lr_scale"] for s, c in sidecars.items()} == \
        {s: (1.0 if s <= g else LR_SCALE) for s in sidecars}


# -- Lightning ---------------------------------------------------------------------------------


def test_lightning_registers_its_checkpoints_and_rewinds_in_process(daemon: DaemonProcess,
                                                                     tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import ModelCheckpoint

    from runwatch.hooks import RunwatchLightningCallback
    from runwatch.hooks.tinygpt import TinyGPT

    class LitGPT(pl.LightningModule):
        def __init__(self, lr: float = BASE_LR) -> None:
            super().__init__()
            self.save_hyperparameters()  # plain numbers: the .ckpt still loads with weights_only
            self.gpt = TinyGPT(context=16)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            ids, labels = batch
            return self.gpt(ids, labels=labels).loss

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (MAX_STEPS - s) / MAX_STEPS)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    class Recorder(pl.Callback):
        """Listed after RunwatchLightningCallback, so its on_train_batch_start runs after the
        one that applies commands. Nothing changes the weights between a batch's end and the
        next batch's start but a rewind, so the snapshot at the previous batch end is the state
        the rewind replaced."""

        def __init__(self, rw: Any) -> None:
            self.rw = rw
            self.end: dict[str, torch.Tensor] = {}
            self.before: dict[str, torch.Tensor] = {}
            self.after: dict[str, torch.Tensor] = {}
            self.optimizer_after: dict[str, Any] = {}
            self.rewound_before: int | None = None
            self.lrs: dict[int, float] = {}

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            if self.rewound_before is None and self.rw.watch.control.rewinds:
                self.rewound_before = trainer.global_step
                self.before, self.after = self.end, snapshot(module)
                self.optimizer_after = copy.deepcopy(trainer.optimizers[0].state_dict())

        def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
            self.lrs[trainer.global_step] = optimizer.param_groups[0]["lr"]

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            self.end = snapshot(module)
            time.sleep(STEP_SLEEP)
            if self.rewound_before is not None and trainer.global_step >= self.rewound_before + STEPS_AFTER:
                trainer.should_stop = True

    run, ckpt_dir = "lightning-rewind", tmp_path / "ckpt"
    torch.manual_seed(0)
    module = LitGPT()
    # (ids, labels) pairs, not a mapping: commands are applied for any batch, not only for
    # those whose tokens the watch can count.
    loader = torch.utils.data.DataLoader([(r["input_ids"], r["labels"]) for r in _data(64)], batch_size=4)
    rw = RunwatchLightningCallback(run=run, socket=daemon.socket)
    recorder = Recorder(rw)
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=SAVE_EVERY, save_top_k=-1)
    trainer = pl.Trainer(max_steps=MAX_STEPS, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[rw, recorder, saver])
    rewinder = Rewinder(daemon, run)
    trainer.fit(module, loader)
    reply = rewinder.result()

    # Registered: exactly the .ckpt files Lightning wrote, with the steps their names carry.
    on_disk = sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: int(p.stem.split("step=")[1]))
    listed = cli(daemon, "checkpoints", run)["checkpoints"]
    assert [(c["step"], c["path"], c["format"]) for c in listed] == \
        [(int(p.stem.split("step=")[1]), str(p), "lightning") for p in on_disk]
    assert len(listed) >= 3 and "save_checkpoint" not in trainer.__dict__  # unwrapped at the end

    assert reply["state"] == "applied", reply
    result = reply["result"]
    ckpt = next(p for p in on_disk if p.stem.endswith(f"step={REWIND_TO}"))
    assert result["checkpoint_step"] == REWIND_TO and result["checkpoint"] == str(ckpt)
    assert result["lr_scale"] == pytest.approx(LR_SCALE) and result["resumed"] is True
    g = reply["step"]
    assert g == recorder.rewound_before and g > REWIND_TO  # watch steps are Lightning's global_step

    # Weights and optimizer state right after the rewind are the .ckpt's; the rate halved.
    saved = torch.load(ckpt, weights_only=True)
    assert saved["global_step"] == REWIND_TO and saved["runwatch"] == {"lr_scale": 1.0, "rewinds": 0}
    assert recorder.after.keys() == saved["state_dict"].keys()
    assert all(torch.equal(recorder.after[k], v) for k, v in saved["state_dict"].items())
    assert not all(torch.equal(recorder.before[k], v) for k, v in saved["state_dict"].items())
    assert_same_optimizer_state(recorder.optimizer_after, saved["optimizer_states"][0])
    assert recorder.optimizer_after["param_groups"][0]["lr"] == pytest.approx(
        LR_SCALE * saved["optimizer_states"][0]["param_groups"][0]["lr"], rel=1e-12)

    # Every rate used (seen by the optimizer before each step), and what the daemon stored.
    final = trainer.global_step
    assert sorted(recorder.lrs) == list(range(final)) and final == g + STEPS_AFTER
    for step, lr in recorder.lrs.items():
        assert lr == pytest.approx(expected_lr(step, g), rel=1e-12), step
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected_lr(final, g), rel=1e-12)
    conn = Store.reader(daemon.store_path)
    steps, rates = series(conn, run, 0, "learning_rate/0")
    assert steps.tolist() == list(range(final))
    assert rates.tolist() == pytest.approx([expected_lr(s, g) for s in range(final)], rel=1e-12)
    scale_steps, scales = series(conn, run, 0, "lr_scale")
    assert scale_steps.tolist() == list(range(g, final)) and set(scales.tolist()) == {LR_SCALE}

    # A checkpoint saved after the rewind still loads weights-only and records the scale.
    later = [p for p in on_disk if int(p.stem.split("step=")[1]) > g]
    assert later and torch.load(later[-1], weights_only=True)["runwatch"] == {"lr_scale": LR_SCALE,
                                                                            "rewinds": 1}


# -- two rewinds --------------------------------------------------------------------------------


def test_a_second_rewind_to_a_checkpoint_saved_after_the_first_keeps_the_scale(
        daemon: DaemonProcess, tmp_path: Path) -> None:
    """Rewind to checkpoint-10 at x0.5, then to a checkpoint saved after that (whose optimizer and
    scheduler already hold x0.5) at x0.5 again: x0.25 must be in force, not x0.125 (the watch
    remembers the scale in force when the callback registered each checkpoint). The commands
    are handed to the watch as its sender hands over a daemon's, at exact steps (their origin is
    not the daemon's, so it ignores their acks)."""
    transformers = pytest.importorskip("transformers")
    from runwatch.hooks import RunwatchCallback

    first_at, second_at, second_to, steps = 12, 22, 15, 30

    class Inject(transformers.TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            commands = {first_at: (1, REWIND_TO), second_at: (2, second_to)}
            if state.global_step in commands:
                cid, to = commands[state.global_step]
                rw.watch.control.receive({"origin": "test", "id": cid, "action": "rewind",
                                          "args": {"to": to, "lr_scale": LR_SCALE}})

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4, logging_steps=1,
        report_to=[], save_strategy="steps", save_steps=SAVE_EVERY, use_cpu=True, learning_rate=BASE_LR,
        dataloader_num_workers=0, disable_tqdm=True)
    rw = RunwatchCallback(run="twice", socket=daemon.socket)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_data(64), callbacks=[rw, Inject()])
    trainer.train()
    lrs = {h["step"] - 1: h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h}
    # Commands received after step N (1-based) apply before 0-based step N + 1.
    position = REWIND_TO + second_to - (first_at + 1)  # checkpoint-15's place in the schedule
    assert lrs[first_at + 1] == pytest.approx(LR_SCALE * BASE_LR * (steps - REWIND_TO) / steps, rel=1e-12)
    expected = LR_SCALE**2 * BASE_LR * (steps - position) / steps
    assert lrs[second_at + 1] == pytest.approx(expected, rel=1e-12)
