"""The systemd notify protocol without libsystemd: READY=1, STATUS=, STOPPING=1 and WATCHDOG=1 as datagrams to
`$NOTIFY_SOCKET`. Leaves nothing on disk. Without `$NOTIFY_SOCKET` (not under systemd, or Type=simple) every call
does nothing, and a failed send is logged, never raised: telling systemd is never worth failing the service for.

Follows sd_notify(3) and sd_watchdog_enabled(3) as systemd implements them in
src/libsystemd/sd-daemon/sd-daemon.c (sd_pid_notify_with_fds, sd_watchdog_enabled): the socket is an AF_UNIX
SOCK_DGRAM address, a path ("/run/systemd/notify") or an abstract name written with a leading "@"; the watchdog is
ours when `$WATCHDOG_USEC` is a positive integer and `$WATCHDOG_PID`, if set, is our pid.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import MutableMapping

from lifecycle.bus import Subscription
from lifecycle.logging import get_logger
from lifecycle.protocol import Status

_ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
STATUS_MESSAGE_MAX_CHARS = 200  # `systemctl status` shows one line


def _address(raw: str) -> str | bytes | None:
    # sd-daemon.c: only an absolute path or "@abstract" is accepted; anything else is not a socket we can use.
    if raw.startswith("/"):
        return raw
    if raw.startswith("@") and len(raw) > 1:
        return b"\0" + raw[1:].encode()
    return None


def _watchdog_usec(environ: MutableMapping[str, str]) -> int | None:
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):  # the watchdog belongs to another process of the unit
        return None
    return usec


class Notifier:
    def __init__(self, *, address: str | bytes | None, watchdog_usec: int | None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec if address is not None else None
        self._log = get_logger("lifecycle.sdnotify")
        self._sock: socket.socket | None = None
        self._failed = False
        if address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)  # a full socket buffer drops a message; it never stalls the loop

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """Read the variables, then remove them (sd_notify's unset_environment): the kubelet and kubeadm we start
        must not inherit them (a real kubelet sends its own READY=1 when it sees NOTIFY_SOCKET)."""
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address = _address(raw) if raw else None
        if raw and address is None:
            get_logger("lifecycle.sdnotify").warning("NOTIFY_SOCKET is neither a path nor @abstract: ignored",
                                                     notify_socket=raw)
        usec = _watchdog_usec(env)
        for key in _ENV_KEYS:
            env.pop(key, None)
        return cls(address=address, watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Half the watchdog timeout, as sd_watchdog_enabled(3) recommends."""
        return self.watchdog_usec / 2 / 1e6 if self.watchdog_usec is not None else None

    def notify(self, message: str) -> None:
        if self._sock is None or self.address is None:
            return
        try:
            self._sock.sendto(message.encode(), self.address)
        except OSError as exc:  # systemd gone or its buffer full: say so once, keep serving
            if not self._failed:
                self._failed = True
                self._log.warning("could not notify systemd", error=str(exc), message=message.split("=", 1)[0])
        else:
            self._failed = False

    async def watchdog(self) -> None:
        """Ping from the event loop itself: a loop that stalls stops the pings and systemd restarts the service."""
        interval_s = self.watchdog_interval_s
        if interval_s is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval_s)

    async def report_status(self, items: Subscription) -> None:
        """STATUS=<state>: <step or error> for each change of state or step (status items from the bus)."""
        last = ""
        while True:
            await items.wait()
            item = items.pop()
            if isinstance(item, Status):
                line = status_line(item)
                if line != last:
                    last = line
                    self.notify(f"STATUS={line}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def status_line(status: Status) -> str:
    if status.error is not None:
        detail = f"{status.error.code}: {status.error.message}"
    elif status.step is not None:
        detail = f"step {status.step} of {status.steps}"
    else:
        detail = "no job running"
    line = f"{status.state}: {detail}".replace("\n", " ")
    return line[:STATUS_MESSAGE_MAX_CHARS]
