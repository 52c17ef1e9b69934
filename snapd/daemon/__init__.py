"""The snapshot daemon: receive -> copy -> encode -> flush.

- ``server``: the only thread that touches the ZeroMQ socket; sessions, buffer leases.
- ``buffers``: the shared-memory host buffers (the double buffer).
- ``pipeline``: the encode pool and the flush thread; the job state machine.
- ``codec_choice``: which codec keeps the disk saturated.
- ``config``: the daemon's settings; ``endpoint``: where it listens.
"""
