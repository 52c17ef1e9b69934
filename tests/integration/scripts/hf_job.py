"""``hf_job.py MODE ENDPOINT OUT_DIR``: a tiny GPT-2 (built from a config, never downloaded) trained
by the Hugging Face Trainer for 9 steps, saving every 3.

- ``full``: the Trainer alone, uninterrupted; prints ``FINAL <digest of the weights>``.
- ``killed``: with ``SnapdCallback``; right after step 6's snapshot was handed over, the model's
  and optimizer's state are written with torch.save (``own-6.pt``: the framework's own
  serialization of the same state) and the process SIGKILLs itself.
- ``... share``: the callback shares the model and optimizer with the daemon (``share=True``).
- ``resume``: a new process lays the latest snapshot out for the Trainer (``checkpoint_dir``),
  checks it against ``own-6.pt`` bit for bit, resumes to step 9; prints ``EQUAL``, ``RESUMED <step>``
  and ``FINAL <digest>``.
Under ``torchrun`` (gloo), the same on each rank: each rank prints its lines. (Run from a
directory other than snapd's clone: its ``kernels/`` folder would hide the package of
that name transformers looks for.)
"""

import hashlib
import os
import signal
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from snapd.integrations.hf import SnapdCallback, checkpoint_dir

mode, endpoint, out = sys.argv[1:4]
share = sys.argv[4:] == ["share"]  # the callback shares the model and optimizer with the daemon


def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=16))


def data() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (64, 16), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def say(line: str) -> None:
    """One line in one write: the two ranks share the pipe (a print's newline can come apart from it)."""
    os.write(1, (line + "\n").encode())


def digest(m) -> str:
    h = hashlib.sha256()
    for k, v in sorted(m.state_dict().items()):
        h.update(k.encode() + v.detach().numpy().tobytes())
    return h.hexdigest()[:16]


class KillAfter6(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        if state.global_step == 6:
            if args.process_index == 0:
                own = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
                torch.save(own, f"{out}/own-6.pt")
            if args.world_size > 1:  # (every rank's part handed over before any dies)
                torch.distributed.barrier()
            os.kill(os.getpid(), signal.SIGKILL)


class PerRankSeed(TrainerCallback):
    """Each rank its own random stream (else the ranks' RNG states are all alike, and a resume that
    gave each rank another's would not show)."""

    def on_train_begin(self, args, state, control, **kw):
        torch.manual_seed(1000 + args.process_index)  # (on resume, the restored states replace it)


class Started(TrainerCallback):
    def on_train_begin(self, args, state, control, **kw):
        say(f"RESUMED {args.process_index} {state.global_step}")


args = TrainingArguments(output_dir=out, max_steps=9, save_steps=3, save_strategy="steps",
                         per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, report_to=[],
                         use_cpu=True, seed=0, dataloader_num_workers=0,
                         ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)
snapd_callback = SnapdCallback("hf", endpoint=endpoint, spawn=False, share=share)
callbacks = [PerRankSeed()] + {"full": [], "killed": [snapd_callback, KillAfter6()],
                               "resume": [snapd_callback, Started()]}[mode]
m = model()
trainer = Trainer(model=m, args=args, train_dataset=data(), callbacks=callbacks)
if mode == "resume":
    ckpt = checkpoint_dir("hf", f"{out}/restored", endpoint=endpoint)
    own = torch.load(f"{out}/own-6.pt", weights_only=True)
    laid = {"model": torch.load(f"{ckpt}/pytorch_model.bin", weights_only=True),
            "optimizer": torch.load(f"{ckpt}/optimizer.pt", weights_only=True)}
    for k, v in own["model"].items():
        assert torch.equal(v, laid["model"][k]), k
    for p, s in own["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(laid["optimizer"]["state"][p][k])), (p, k)
    assert own["optimizer"]["param_groups"] == laid["optimizer"]["param_groups"]
    say(f"EQUAL {trainer.args.process_index}")
    trainer.train(resume_from_checkpoint=ckpt)
else:
    trainer.train()
say(f"FINAL {trainer.args.process_index} {digest(m)}")
if torch.distributed.is_initialized():  # (every rank done before gloo's pairs close: one leaving early
    torch.distributed.barrier()         # aborted another's exit with "terminate called")
    torch.distributed.destroy_process_group()
