"""The Hugging Face Trainer with snapd: ``python examples/hf_trainer.py [OUTPUT_DIR]`` (run it from
outside snapd's clone, whose ``kernels/`` folder hides the package of that name transformers uses).

A tiny GPT-2 built from a config (nothing downloaded); ``SnapdCallback`` replaces the Trainer's own
save at its ``save_steps``: the state goes to snapd's daemon (spawned if none runs) and training
goes on. A second run resumes from the latest snapshot, laid out as the Trainer's checkpoint.
"""

import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from snapd.integrations.hf import SnapdCallback, checkpoint_dir

out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/snapd-examples/hf"
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=1000, n_positions=64))
ids = torch.randint(0, 1000, (256, 64))
data = [{"input_ids": row, "labels": row} for row in ids]
args = TrainingArguments(output_dir=out, max_steps=60, save_steps=20, per_device_train_batch_size=8,
                         report_to=[], use_cpu=True, logging_steps=20)
trainer = Trainer(model=model, args=args, train_dataset=data,
                  callbacks=[SnapdCallback("hf-example")])  # <- the snapd line
trainer.train(resume_from_checkpoint=checkpoint_dir("hf-example", out))  # (None on the first run)
print(f"trained to step {trainer.state.global_step}")
