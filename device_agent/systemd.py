"""systemd notify/watchdog over ``NOTIFY_SOCKET`` (a plain datagram socket, no dependency).

``Notifier.from_env()`` is a no-op object when the agent is not started by
systemd. The agent sends ``READY=1`` once the model is warm, ``STOPPING=1``
on shutdown, and ``WATCHDOG=1`` from the batcher thread's tick, so a hung
batch loop (not only a dead process) makes systemd restart the service.
"""
from __future__ import annotations

import os
import socket
import threading

__all__ = ["Notifier"]


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.sent: list[str] = []  # the last few messages, for health and tests
        if address:
            if address.startswith("@"):  # abstract namespace socket
                address = "\0" + address[1:]
            self._addr = address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)

    @classmethod
    def from_env(cls, environ=os.environ) -> "Notifier":
        wd = environ.get("WATCHDOG_USEC")
        pid = environ.get("WATCHDOG_PID")
        usec = int(wd) if wd and wd.isdigit() and (not pid or pid == str(os.getpid())) else None
        return cls(environ.get("NOTIFY_SOCKET") or None, usec)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half of WatchdogSec, as systemd recommends."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def notify(self, *lines: str) -> bool:
        if self._sock is None:
            return False
        msg = "\n".join(lines)
        with self._lock:
            try:
                self._sock.sendto(msg.encode(), self._addr)
            except OSError:  # systemd gone or socket full: never fail the agent for it
                return False
            self.sent = (self.sent + [msg])[-10:]
        return True

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1") if self.watchdog_usec else False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
