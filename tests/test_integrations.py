"""One line in Hugging Face Trainer and in Lightning: real frameworks, tiny models, CPU."""

from __future__ import annotations

import numpy as np
import pytest

from runwatch.daemon.store import Store, series
from tests.conftest import DaemonProcess

torch = pytest.importorskip("torch")


def _data(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(0, 64, (16,), generator=g)
        mask = torch.ones(16, dtype=torch.long)
        mask[16 - (i % 5) * 2:] = 0  # some padding
        labels = ids.masked_fill(mask == 0, -100)
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


def test_huggingface_trainer_callback(daemon: DaemonProcess, tmp_path, monkeypatch) -> None:
    transformers = pytest.importorskip("transformers")
    from runwatch.hooks import RunwatchCallback

    monkeypatch.setenv("RUNWATCH_SOCKET", str(daemon.socket))
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, max_grad_norm=0.5, learning_rate=1e-3,
        dataloader_num_workers=0, disable_tqdm=True)
    data = _data(24)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[RunwatchCallback(run="hf")])
    trainer.train()
    conn = Store.reader(daemon.store_path)
    steps, grad_norm = series(conn, "hf", 0, "grad_norm")
    assert steps.tolist() == list(range(6))
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    np.testing.assert_allclose(grad_norm, logged, rtol=1e-5)  # the pre-clip norm, as HF reports it
    _, loss = series(conn, "hf", 0, "loss")
    np.testing.assert_allclose(loss, [h["loss"] for h in trainer.state.log_history if "loss" in h],
                               rtol=1e-4)
    _, efficiency = series(conn, "hf", 0, "token_efficiency")
    # HF shuffles, but 6 steps of 4 are exactly one epoch of the 24 samples, and every batch
    # holds 64 tokens: the mean of the steps' efficiencies is the data set's.
    dataset_mean = float(torch.stack([d["labels"] for d in data]).ne(-100).double().mean())
    assert float(np.mean(efficiency)) == pytest.approx(dataset_mean, rel=1e-12)
    assert len(set(efficiency.tolist())) > 1
    blocks = {k for k in ("activation_norm/transformer.h.0", "activation_norm/transformer.h.1")
              if len(series(conn, "hf", 0, k)[0]) == 6}
    assert len(blocks) == 2, "each GPT-2 block's output is watched by default"


def test_lightning_callback(daemon: DaemonProcess, tmp_path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from runwatch.hooks import RunwatchLightningCallback
    from runwatch.hooks.tinygpt import TinyGPT

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = TinyGPT(context=16)
            self.seen_loss: list[float] = []
            self.seen_norm: list[float] = []

        def training_step(self, batch, batch_idx):
            loss = self.gpt(batch["input_ids"], labels=batch["labels"]).loss
            self.seen_loss.append(loss.item())
            return loss

        def on_before_optimizer_step(self, optimizer):
            self.seen_norm.append(torch.nn.utils.get_total_norm(
                [p.grad for p in self.parameters() if p.grad is not None]).item())

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    module = Module()
    data = _data(24)
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[RunwatchLightningCallback(run="lightning", socket=daemon.socket)])
    trainer.fit(module, loader)
    conn = Store.reader(daemon.store_path)
    steps, loss = series(conn, "lightning", 0, "loss")
    assert steps.tolist() == list(range(6)), steps
    np.testing.assert_allclose(loss, module.seen_loss, rtol=1e-6)
    norm_steps, norm = series(conn, "lightning", 0, "grad_norm")
    assert norm_steps.tolist() == list(range(6)), norm_steps
    np.testing.assert_allclose(norm, module.seen_norm, rtol=1e-5)
    _, efficiency = series(conn, "lightning", 0, "token_efficiency")
    expected = [float((torch.stack([d["labels"] for d in data[i * 4:(i + 1) * 4]]) != -100)
                      .double().mean()) for i in range(6)]
    np.testing.assert_allclose(efficiency, expected, rtol=1e-12)
