"""A network link of a given bandwidth between the S3 server and its clients on one machine.

On loopback the S3 server answers as fast as the cores it shares with the client let it, so a
restore that decodes (a compressed snapshot) races the server for those cores, which no real node
does: its bucket is across a network, and the network is the bound. ``shaped(port, gbit)`` caps
the traffic to and from ``port`` on ``lo`` (one class: a half-duplex link of ``gbit``, the way
a restore and an upload do not overlap in the bench) with the kernel's HTB qdisc (``tc``, root
only); all other loopback traffic passes as before. Removed on exit.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


def why_not() -> str | None:
    """Why the link cannot be shaped here, or None."""
    if os.geteuid() != 0:
        return "shaping loopback needs root"
    if shutil.which("tc") is None:
        return "no tc (iproute2) here"
    out = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.startswith("qdisc noqueue"):  # (lo's default: nothing set)
        return f"lo already has a qdisc, not ours to replace: {out.stdout.strip() or out.stderr.strip()}"
    return None


def _tc(*args: str) -> None:
    subprocess.run(["tc", *args], check=True, capture_output=True, text=True)


@contextmanager
def shaped(port: int, gbit: float) -> Iterator[None]:
    """Traffic to and from TCP port ``port`` on ``lo`` at most ``gbit`` Gbit/s while inside."""
    reason = why_not()
    if reason is not None:
        raise RuntimeError(f"cannot shape the link to {gbit} Gbit/s: {reason}")
    rate = f"{gbit * 1000:.0f}mbit"
    # unclassified packets (default 0) pass HTB unshaped; a burst of a few 64 KiB loopback segments
    _tc("qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "0")
    try:
        _tc("class", "add", "dev", "lo", "parent", "1:", "classid", "1:1", "htb", "rate", rate, "ceil", rate,
            "burst", "1mb", "cburst", "1mb")
        for way in ("sport", "dport"):  # both ways: the server's answers and what is sent to it
            _tc("filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match",
                "ip", way, str(port), "0xffff", "flowid", "1:1")
        log.info("lo: traffic of port %d capped at %s", port, rate)
        yield
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)
