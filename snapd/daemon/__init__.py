"""The snapshot daemon: receive -> copy -> encode -> flush.

Which thread owns what (the rule every module here keeps):
- The server thread (``server``) owns the ROUTER socket, the sessions, the lease book, the task
  table, the buffer pool's list and everything ``snapd status`` reads, except what follows. Other
  threads never touch these: they report to it over the events socket (``channels``).
- A task (one snapshot) belongs to the stage that holds it: the server thread until its hand-over,
  then the copy thread or the GPU threads, then the flush thread (encode and write), then the seal
  thread (fsync, commit). Only ``pipeline`` (with ``seal_stage``, its part) changes its state; the
  stage that holds it is the one that does.
- ``codec_choice.CodecBook`` holds the codec choices under its lock (the flush thread asks, the
  seal thread teaches, others read a copy: ``Pipeline.codec_choices``); the
  GPU thread owns the devices, handles and plans (others read ``GpuCopier.in_use``); the pinning
  threads share ``HostPins``' state under its lock; the buffer pool's threads make buffers and
  hand them to the server thread through ``buffer_making``'s queue. The rank-commits thread holds
  the tasks whose part is durable and waits (``PART_DURABLE``) until their step ends.
- Nothing the server thread calls may wait on another thread's work (pinning, a flush).

Modules:
- ``serve``: ``snapd serve`` (startup, signals, systemd); ``config``: the settings
  (``config_sources``: the config file and environment they come from); ``notify``: systemd's
  notify socket; ``metrics``: Prometheus.
- ``server``: the server thread's loop and its error boundary; ``requests``: its answer to each
  request, and the sessions they open and end; ``channels``: its
  reply sender, the stages' events socket and ``stage_loop`` (every stage thread's loop and error
  boundary); ``shutdown``: the drain a SIGTERM starts and the exit when idle; ``peer_requests``:
  the requests that reach other nodes (``locate``, ``fetch_part``, ``peers``); ``removals``: a
  user's removal of one of their snapshots (``remove``), here and in the remote tier.
- ``access``: who may connect (SO_PEERCRED through ZAP), socket and directory permissions.
- ``sessions``: each client's session; ``regions``: the shared-memory regions a client registers.
- ``intake``: a buffer for each snapshot and its acceptance as a task; ``layouts``: what a
  ``snapshot`` message describes, and where each tensor lies.
- ``leases``: who holds which host buffer and who waits for one; ``limits``: how much one client
  and one user may hold; ``waiting``: how long a request waits, who hears of it, and the written
  snapshots' buffers lent to emergency ones; ``quotas``:
  per-user disk quotas.
- ``buffers``: the shared-memory host buffers; ``buffer_making``: buffers made anew on threads
  (grown, ahead of need, for another uid); ``host_memory``: how much memory they may take;
  ``prefault``: their pages faulted in ahead; ``buffer_reads``: reads of buffers other users
  can map; ``leftovers``: what dead processes left in the shared-memory directory.
- ``tasks``: a snapshot in flight, its states and the task table; ``pipeline``: the state
  machine, the copy thread, the encode pool, the flush thread and the seal thread, whose work
  (fsync, commit, a rank's part delivered) is ``seal_stage``;
  ``codec_choice``: which codec keeps the disk busy; ``endings``: the stages' reports turned into
  replies; ``rank_commits``: the thread that watches ranks' durable parts until their global
  snapshot commits or is given up;
  ``uploads``: the remote tier's upload thread (its backlog, order and status);
  ``upload_retention``: local snapshots held for their upload, and the retention after it;
  ``remote_parts``: rank parts uploaded ahead of their global commit, which nodes sharing no
  filesystem make in the bucket; ``remote_view``: which steps the bucket holds, for the status.
- ``peers``: the other nodes' daemons, as one part of this one (docs/peers.md): ``peer_server``
  (the thread that owns the socket they reach), ``peer_commits`` (the part book: the other nodes'
  parts, and the commits they make possible), ``replication`` (one thread per peer sending it
  announcements and replicas; ``peer_sender``: one peer's queue and thread, and the check that it
  still holds what it was sent; ``held_record``: what the holders were sent, kept across restarts;
  ``outgoing``: a part to send, and its files) and ``part_fetch``
  (where a job's newest complete step is, and its parts, or a single process's snapshot, brought
  here when a reader needs them; ``job_survey``: what every node holds of a job, and how fast each
  source is, asked; ``survey_steps``: what it found, step by step, and the rules read from it;
  ``part_download``: one part from one source into a temporary
  directory; ``whole_snapshots``: a single process's snapshot to resume from, brought whole and
  committed; ``part_files``: such a part's files written and checked; ``bucket_parts``: the remote
  tier as the slowest of those sources; ``prefetch``: a rank's part brought here when the rank
  says hello, before it restores).
- ``gpu_copy``: the GPU path's copy stage (CUDA IPC, one copy stream per device); ``gpu_work``:
  a device's resources and the items its threads work on; ``gpu_handles``: clients' IPC handles
  and events; ``gpu_windows``: how device tensors travel through the staging window;
  ``host_pinning``: page-locking the host buffers.
- ``status``: the tallies, ``snapd status`` and the systemd status line.
"""
