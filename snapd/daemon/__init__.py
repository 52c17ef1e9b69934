"""The snapshot daemon: receive -> copy -> encode -> flush.

- ``server``: the only thread that touches the ZeroMQ socket; it dispatches requests.
- ``sessions``: each client's session and registered regions; ``leases``: who holds which
  host buffer, who waits for one, per-client limits.
- ``access``: who may connect (SO_PEERCRED through ZAP), socket and directory permissions.
- ``buffers``: the shared-memory host buffers (the double buffer).
- ``pipeline``: the encode pool and the flush thread; the job state machine; ``endings``: the
  stages' reports turned into replies.
- ``gpu_copy``: the GPU path's copy stage (CUDA IPC handles and events, one copy stream per
  device); ``gpu_windows``: how device tensors travel through the staging buffer.
- ``codec_choice``: which codec keeps the disk saturated.
- ``config``: the daemon's settings; ``serve``: ``snapd serve``; ``notify``: systemd;
  ``metrics``: Prometheus; ``status``: what ``snapd status`` shows.
"""
