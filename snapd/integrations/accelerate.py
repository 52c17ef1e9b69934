"""Hugging Face Accelerate's own training loops snapshot through snapd, instead of
``accelerator.save_state(dir)`` / ``load_state(dir)``::

    from snapd.integrations.accelerate import restore_state, snapshot_state

    client = snapd.connect("my-run", per_rank=["rng"])
    restore_state(accelerator, client)                 # a fresh start if the job has none
    for step, batch in ...:
        ...
        if step % 500 == 0:
            snapshot_state(accelerator, client, step)  # returns once the daemon holds it

What ``save_state`` writes is what is snapshotted: each prepared model's weights (unwrapped),
each optimizer's and scheduler's state, the RNG states (each rank's own), and the objects given
to ``accelerator.register_for_checkpointing`` that have a ``state_dict``.
"""

from __future__ import annotations

import logging
from typing import Any

from snapd.integrations.rng import rng_states, set_rng_states

log = logging.getLogger(__name__)


def state_of(accelerator: Any, step: int) -> dict[str, Any]:
    """The state ``accelerator.save_state`` would write, as a snapshot's tree."""
    return {"models": [accelerator.unwrap_model(m).state_dict() for m in accelerator._models],
            "optimizers": [o.state_dict() for o in accelerator._optimizers],
            "schedulers": [s.state_dict() for s in accelerator._schedulers],
            "custom": [o.state_dict() for o in accelerator._custom_objects],
            "rng": rng_states(), "step": step}


def snapshot_state(accelerator: Any, client: Any, step: int, metrics: dict | None = None) -> Any:
    """Hand the accelerator's state to the daemon (``client.snapshot``); returns its ``Pending``."""
    return client.snapshot(state_of(accelerator, step), step=step, metrics=metrics)


def restore_state(accelerator: Any, client: Any, step: int | str = "latest") -> int | None:
    """Put snapshot ``step`` (the latest by default) back into the accelerator's models,
    optimizers, schedulers, registered objects and this rank's RNG states; its step, or None when
    the job has no snapshot yet."""
    from snapd.errors import SnapshotNotFound

    if step == "latest" and not client.list():
        return None
    try:
        saved = client.restore(step, device="cpu")
    except SnapshotNotFound:
        return None
    for kind, objects in (("models", [accelerator.unwrap_model(m) for m in accelerator._models]),
                          ("optimizers", accelerator._optimizers), ("schedulers", accelerator._schedulers),
                          ("custom", accelerator._custom_objects)):
        if len(saved[kind]) != len(objects):
            from snapd.errors import InvalidArgument

            raise InvalidArgument(f"the snapshot holds {len(saved[kind])} {kind}, the accelerator prepared "
                                  f"{len(objects)}: prepare the same ones as the run that saved it")
        for obj, state in zip(objects, saved[kind]):
            obj.load_state_dict(state)
    set_rng_states(saved["rng"])
    log.info("accelerator state restored from step %s", saved["step"])
    return int(saved["step"])
