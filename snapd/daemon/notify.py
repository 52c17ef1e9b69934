"""The systemd notify protocol (sd_notify), in a few lines over a datagram socket.

``NOTIFY_SOCKET`` names an AF_UNIX datagram socket (a leading ``@`` means
the abstract namespace); each message is ``KEY=VALUE`` lines. We send
READY=1 once serving, STATUS= kept current, WATCHDOG=1 from the server's
main loop (so a stuck loop stops feeding it and systemd restarts us), and
STOPPING=1 with EXTEND_TIMEOUT_USEC while draining. Without NOTIFY_SOCKET
every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._sock: socket.socket | None = None
        self._addr = ""
        if address:
            self._addr = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # systemd's advice: ping at half the watchdog interval
        self.watchdog_interval_s = watchdog_usec / 2e6 if watchdog_usec else None
        self._next_watchdog = 0.0
        self._last_status = ""

    @classmethod
    def from_environment(cls, env: dict[str, str] | None = None) -> Notifier:
        """Read NOTIFY_SOCKET and WATCHDOG_USEC (honouring WATCHDOG_PID) once, at start."""
        env = dict(os.environ) if env is None else env
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if pid and pid != str(os.getpid()):
            usec = None
        return cls(env.get("NOTIFY_SOCKET"), int(usec) if usec and usec.isdigit() else None)

    def send(self, **fields: str | int) -> None:
        if self._sock is None:
            return
        msg = "\n".join(f"{k.upper()}={v}" for k, v in fields.items())
        try:
            self._sock.sendto(msg.encode(), self._addr)
        except OSError as e:  # systemd gone or socket full: never fatal for the daemon
            log.debug("sd_notify failed: %s", e)

    def ready(self, status: str) -> None:
        self.send(ready=1, status=status, mainpid=os.getpid())

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self.send(status=text)

    def tick(self) -> None:
        """Called from the main loop every iteration; feeds the watchdog when due."""
        if self.watchdog_interval_s is None:
            return
        now = time.monotonic()
        if now >= self._next_watchdog:
            self.send(watchdog=1)
            self._next_watchdog = now + self.watchdog_interval_s

    def stopping(self, drain_timeout_s: float) -> None:
        self.send(stopping=1, extend_timeout_usec=int(drain_timeout_s * 1e6), status="draining")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
