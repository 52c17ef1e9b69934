"""Thread pools whose threads are all running before the first task is given to them.

``ThreadPoolExecutor`` starts a thread at each ``submit`` while it has fewer than its maximum, and
``Thread.start`` waits for the new thread to run. Once earlier threads are busy in Python (a GET
being signed and parsed, a chunk being decoded), that wait is for the GIL they hold, up to the
interpreter's 5 ms switch interval a thread: 8 threads cost a restore ~0.1 s before its last
requests went out (cProfile of a 1 GiB restore from a bucket). Started with nothing to do yet,
they take well under a millisecond each.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor


def started_pool(threads: int, name: str) -> ThreadPoolExecutor:
    """A ``ThreadPoolExecutor`` of ``threads`` threads, every one of them started."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix=name)
    if threads > 1:
        gate = threading.Barrier(threads + 1)
        try:
            for _ in range(threads):  # each holds a thread until all are up, so none is reused
                pool.submit(gate.wait)
            gate.wait()
        except BaseException:  # (a thread that cannot start: the started ones are let go)
            gate.abort()
            pool.shutdown(wait=False)
            raise
    return pool
