"""RNG states as the Hugging Face tools save them (Trainer, Accelerate), and back from a snapshot.

A snapshot keeps them as plain data (tuples come back as lists, arrays as NumPy); ``back`` gives
them the types ``random.setstate``, ``np.random.set_state`` and torch take.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_states() -> dict[str, Any]:
    """This process's RNG states (CUDA's when there is one)."""
    out = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.random.get_rng_state_all()
    return out


def rng_states_back(saved: dict[str, Any]) -> dict[str, Any]:
    """``rng_states()`` as a snapshot gave it back, in the types the setters take."""
    version, internal, gauss = saved["python"]
    out = {"python": (int(version), tuple(int(x) for x in internal), gauss),
           "numpy": (str(saved["numpy"][0]), np.asarray(saved["numpy"][1], dtype=np.uint32),
                     *(v if isinstance(v, float) else int(v) for v in saved["numpy"][2:])),
           "cpu": torch.as_tensor(saved["cpu"], dtype=torch.uint8)}
    if "cuda" in saved:
        out["cuda"] = [torch.as_tensor(t, dtype=torch.uint8) for t in saved["cuda"]]
    return out


def set_rng_states(saved: dict[str, Any]) -> None:
    """Put ``rng_states()`` (as a snapshot gave it back) into effect in this process."""
    rng = rng_states_back(saved)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.random.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.random.set_rng_state_all(rng["cuda"])
