"""systemd's notify protocol (sd_notify): READY, WATCHDOG, STATUS and STOPPING datagrams.

Hand-written rather than a dependency: the protocol is one ``sendto`` of ``KEY=VALUE`` lines on
an ``AF_UNIX`` datagram socket named by ``NOTIFY_SOCKET`` (``@`` for the abstract namespace),
and the Python senders on PyPI are unmaintained (sdnotify, last release 2017, untyped) or need
libsystemd headers to build (systemd-python, cysystemd). Without ``NOTIFY_SOCKET`` every call
is a no-op, so the same code runs under systemd, in a terminal and in tests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

__all__ = ["MAX_STATUS", "Notifier", "watchdog_interval"]

log = logging.getLogger("nodewatch.systemd")

# systemd shows STATUS= in `systemctl status`: one short line.
MAX_STATUS = 200
# Without a watchdog, STATUS= is refreshed this often (when it changed).
_STATUS_EVERY = 5.0


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds (how often to send ``WATCHDOG=1``), or None when
    no watchdog is asked of this process (unset, not a positive number, or ``WATCHDOG_PID``
    naming another process)."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


def _address(name: str) -> str | bytes:
    """``@name`` is a socket in the abstract namespace (a leading NUL byte)."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


class Notifier:
    """Sends notify messages to the socket systemd named; never blocks, never raises.

    A datagram that cannot be sent (the receiver's queue full, the socket gone) is dropped
    and logged once: the service's job matters more than telling systemd about it."""

    def __init__(self, socket_path: str = "", watchdog: float | None = None) -> None:
        self.socket_path = socket_path
        self.watchdog = watchdog if socket_path else None
        self._sock: socket.socket | None = None
        self._failed = False
        self._status = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        return cls(path, watchdog_interval(env, os.getpid()))

    @property
    def enabled(self) -> bool:
        return bool(self.socket_path)

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; False if it was not sent."""
        if not self.socket_path:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode(), _address(self.socket_path))
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify systemd at %s: %s", self.socket_path,
                            exc.strerror or exc)
                self._failed = True
            return False
        return True

    def status(self, text: str) -> None:
        """``STATUS=`` with one line, sent only when it changed."""
        line = " ".join(text.split())[:MAX_STATUS]
        if line != self._status and self.notify(f"STATUS={line}"):
            self._status = line

    def ready(self, status: str = "") -> None:
        """``READY=1`` (with ``MAINPID``, and ``STATUS=`` when given): the service is serving."""
        lines = ["READY=1", f"MAINPID={os.getpid()}"]
        if status:
            self._status = " ".join(status.split())[:MAX_STATUS]
            lines.append(f"STATUS={self._status}")
        self.notify(*lines)

    def stopping(self, status: str = "stopping") -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    async def supervise(self, status: Callable[[], str] | None = None) -> None:
        """Until cancelled: ``WATCHDOG=1`` at half ``WATCHDOG_USEC`` from this event loop (so a
        wedged loop stops it and systemd restarts the process), and ``STATUS=`` when it
        changed. Returns at once without a notify socket."""
        if not self.socket_path:
            return
        period = self.watchdog if self.watchdog is not None else _STATUS_EVERY
        while True:
            if self.watchdog is not None:
                self.notify("WATCHDOG=1")
            if status is not None:
                try:
                    self.status(status())
                except Exception:  # a summary must never stop the watchdog
                    log.exception("cannot build the systemd status line")
            await asyncio.sleep(period)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
