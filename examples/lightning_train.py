"""PyTorch Lightning with runwatch: one callback.

    pip install lightning
    python examples/lightning_train.py
"""

import lightning.pytorch as pl
import torch

from runwatch.hooks import RunwatchLightningCallback
from runwatch.hooks.tinygpt import TinyGPT


class LitGPT(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.gpt = TinyGPT()

    def training_step(self, batch, batch_idx):
        return self.gpt(batch["input_ids"], labels=batch["labels"]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


torch.manual_seed(0)
ids = torch.randint(0, 64, (128, 32))
rows = [{"input_ids": x, "labels": x} for x in ids]
loader = torch.utils.data.DataLoader(rows, batch_size=8)
trainer = pl.Trainer(max_steps=20, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False,
                     callbacks=[RunwatchLightningCallback(run="example-lightning")])
trainer.fit(LitGPT(), loader)
