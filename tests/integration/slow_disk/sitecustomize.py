"""A slow disk, for tests: on the PYTHONPATH of a daemon, its ``os.fsync`` calls wait while the file
``SNAPD_TEST_SLOW_FSYNC`` names exists, and its ``os.writev`` calls (the data files' writes) while
``SNAPD_TEST_SLOW_WRITE``'s does. Then the real call runs. A test holds a snapshot between two
stages this way: written but not durable, or not yet written."""

import os
import time


def _gated(real, variable):  # type: ignore[no-untyped-def]
    gate = os.environ.get(variable)
    if not gate:
        return real

    def call(*args):  # type: ignore[no-untyped-def]
        while os.path.exists(gate):
            time.sleep(0.01)
        return real(*args)
    return call


os.fsync = _gated(os.fsync, "SNAPD_TEST_SLOW_FSYNC")
os.writev = _gated(os.writev, "SNAPD_TEST_SLOW_WRITE")
