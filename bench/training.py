"""Training stall: a real training loop (a GPT-style transformer with AdamW, on CPU)
snapshotting every N steps with each method.

Per method: the stall each snapshot adds to its step (the time the trainer is
blocked in the save call; for DCP async, until staging completes), and the
step time with snapshots against the same loop without, which also counts
what background work (compression, the DCP upload) takes from training on
this machine's cores.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bench.machine import Recorder


@dataclass(frozen=True)
class Size:
    vocab: int
    d: int
    layers: int
    heads: int
    seq: int
    batch: int


# "full": about GPT-2 small (110M parameters; 1.3 GiB with AdamW's two moments)
SIZES = {"full": Size(32000, 768, 12, 12, 64, 2), "quick": Size(2000, 128, 2, 4, 32, 2)}


class GPT(nn.Module):
    def __init__(self, s: Size) -> None:
        super().__init__()
        self.tok = nn.Embedding(s.vocab, s.d)
        self.pos = nn.Embedding(s.seq, s.d)
        layer = nn.TransformerEncoderLayer(s.d, s.heads, 4 * s.d, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, s.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(s.d)
        self.head = nn.Linear(s.d, s.vocab, bias=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(s.seq), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        return self.head(self.norm(self.blocks(h, mask=self.mask, is_causal=True)))


class Trainer:
    def __init__(self, size: str) -> None:
        torch.manual_seed(0)
        self.s = SIZES[size]
        self.model = GPT(self.s)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4)
        self.gen = torch.Generator().manual_seed(1)
        self.step_no = 0
        self.train(1)  # AdamW's moments exist from the first step on

    def train(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            x = torch.randint(0, self.s.vocab, (self.s.batch, self.s.seq + 1), generator=self.gen)
            loss = nn.functional.cross_entropy(self.model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=False)  # keep grads allocated: shared tensors stay put
            self.step_no += 1
            times.append(time.perf_counter() - t)
        return times

    def state(self) -> dict[str, torch.Tensor]:
        """Model and optimizer as one flat {key: tensor} dict (every method saves the same)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        for p, st in self.opt.state.items():
            for k, v in st.items():
                out[f"optim.{names[id(p)]}.{k}"] = v
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state().values())


def run(trainer: Trainer, methods: list[Any], rec: Recorder, steps: int, every: int) -> None:
    """Train ``steps`` steps per method, snapshotting every ``every`` (after the optimizer step)."""
    base = trainer.train(steps)
    rec.add("stall", f"no snapshots (baseline of {', '.join(m.name for m in methods)})", "step_time", base,
            state_bytes=trainer.nbytes())
    base_med = statistics.median(base)
    for m in methods:
        m.start(trainer.state(), 0).wait()  # warm-up: first touch of buffers, DCP's process start
        stalls, step_times, handle = [], [], None
        for i in range(1, steps + 1):
            t = time.perf_counter()
            trainer.train(1)
            if i % every == 0:
                s = time.perf_counter()
                handle = m.start(trainer.state(), trainer.step_no)
                stalls.append(time.perf_counter() - s)
            step_times.append(time.perf_counter() - t)
        if handle is not None:
            handle.wait()
        overhead = (sum(step_times) - steps * base_med) / max(1, len(stalls))
        rec.add("stall", m.name, "stall_per_snapshot", stalls, state_bytes=trainer.nbytes())
        rec.add("stall", m.name, "step_time", step_times, every=every)
        rec.add("stall", m.name, "overhead_per_snapshot", [overhead], every=every)
