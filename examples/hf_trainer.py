"""Hugging Face Trainer with runwatch: one callback.

    pip install transformers accelerate
    python examples/hf_trainer.py
"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from runwatch.hooks import RunwatchCallback

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
rows = []
for i in range(64):
    ids = torch.randint(0, 64, (32,))
    mask = torch.ones(32, dtype=torch.long)
    mask[32 - (i % 8):] = 0  # some padding, so token efficiency is below 1
    rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})

args = TrainingArguments(output_dir="/tmp/runwatch-hf-example", max_steps=20, per_device_train_batch_size=8,
                         report_to=[], save_strategy="no", use_cpu=True, logging_steps=10)
trainer = Trainer(model=model, args=args, train_dataset=rows,
                  callbacks=[RunwatchCallback(run="example-hf")])
trainer.train()
