"""lifecycle/sdnotify.py on its own: abstract socket names, WATCHDOG_PID, the variables removed from the
environment (the kubelet must not inherit them), and nothing sent nor raised without a usable NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import uuid

from lifecycle.sdnotify import Notifier


def test_abstract_socket_names_are_used_and_a_foreign_watchdog_pid_is_ignored() -> None:
    name = f"lifecycle-test-{uuid.uuid4().hex[:8]}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    env = {"NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1),
           "OTHER": "kept"}
    try:
        notifier = Notifier.from_environ(env)
        assert env == {"OTHER": "kept"}, "the variables are not passed on to the kubelet and kubeadm"
        assert notifier.watchdog_interval_s is None, "WATCHDOG_PID names another process"
        notifier.notify("READY=1")
        assert sock.recv(100) == b"READY=1"
        notifier.close()
        mine = Notifier.from_environ({"NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": "30000000",
                                      "WATCHDOG_PID": str(os.getpid())})
        assert mine.watchdog_interval_s == 15.0
        mine.close()
    finally:
        sock.close()


def test_without_notify_socket_nothing_is_sent_and_nothing_fails() -> None:
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "30000000"})
    assert not notifier.enabled and notifier.watchdog_interval_s is None
    notifier.notify("READY=1")  # no socket: a no-op
    broken = Notifier.from_environ({"NOTIFY_SOCKET": "/nonexistent/notify.sock"})
    broken.notify("READY=1")  # systemd gone: logged, not raised
    broken.close()
