"""snapd where training code already lives: each module is imported only by who uses it, and the
frameworks stay optional (``pip install snapd[integrations]``).

- ``dcp_writer``: ``snapd.dcp.SnapshotWriter``, a ``torch.distributed.checkpoint`` storage writer
  and async stager (``dcp.save`` / ``dcp.async_save`` through the daemon).
- ``lightning``: ``SnapdCheckpointIO``, PyTorch Lightning's checkpoint plugin.
- ``hf``: ``SnapdCallback``, the Hugging Face Trainer's callback, and ``checkpoint_dir`` to resume.
- ``accelerate``: ``snapshot_state``/``restore_state`` for Accelerate's own loops; ``rng``: the RNG
  states both save.
docs/integrations.md says what each keeps of its framework's semantics.
"""
