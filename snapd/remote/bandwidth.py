"""A bound on the upload bandwidth: a token bucket every upload thread draws from, so the remote
tier cannot starve the training job's network (a rank's all-reduce shares the node's link)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Pacer:
    def __init__(self, bytes_per_s: int, burst_s: float = 0.25, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.rate = float(bytes_per_s)
        self.burst = self.rate * burst_s
        self._clock, self._sleep = clock, sleep  # (a test's own clock: no timing in the tests)
        self._tokens = self.burst
        self._at = clock()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        """Block until ``n`` bytes may be sent (a part larger than the burst waits its share)."""
        with self._lock:  # (one at a time: the waits add up, as the bytes on the link do)
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            self._tokens -= n
            debt = -self._tokens / self.rate if self._tokens < 0 else 0.0
            if debt > 0:
                self._sleep(debt)
                self._at = self._clock()
                self._tokens = 0.0
