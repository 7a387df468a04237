"""Facts about the machine, read from its files under the node root (on a real VM the root is "/").

Read only, nothing here writes. CPUs, memory, swap, sysctls and the tools on the PATH come from the same files
kubeadm's preflight and the kubelet read, so a test steers them by editing a re-rooted machine view
(`simnode/host.py`). Port checks bind for a moment on the real host: ports are not re-rooted.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

# The PATH of a systemd service (systemd.exec(5), "PATH=/usr/local/sbin:..."): the service and the kubeadm it runs
# look tools up here. kubeadm's InPathCheck (cmd/kubeadm/app/preflight/checks.go) uses exec.LookPath on it.
SERVICE_PATH: tuple[str, ...] = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def rooted(root: Path, real: str) -> Path:
    """`/proc/swaps` -> `<root>/proc/swaps`."""
    return root / real.lstrip("/")


def cpu_count(root: Path) -> int | None:
    """Online CPUs from /sys/devices/system/cpu/online ("0-3,6" -> 5); None when unreadable."""
    try:
        text = rooted(root, "/sys/devices/system/cpu/online").read_text().strip()
    except OSError:
        return None
    count = 0
    try:
        for part in filter(None, text.split(",")):
            first, _, last = part.partition("-")
            count += int(last or first) - int(first) + 1
    except ValueError:
        return None
    return count


def mem_total_mb(root: Path) -> int | None:
    """MemTotal of /proc/meminfo in MB (kubeadm's MemCheck: total RAM / 1024 / 1024); None when unreadable."""
    try:
        lines = rooted(root, "/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(":")
        fields = value.split()
        if name == "MemTotal" and fields and fields[0].isdigit():
            return int(fields[0]) // 1024  # kB
    return None


def swap_devices(root: Path) -> list[str]:
    """The active swap areas listed in /proc/swaps (the first line is its header)."""
    try:
        lines = rooted(root, "/proc/swaps").read_text().splitlines()
    except OSError:
        return []
    return [line.split()[0] for line in lines[1:] if line.strip()]


def sysctl_value(root: Path, name: str) -> str | None:
    """`net.ipv4.ip_forward` -> the content of /proc/sys/net/ipv4/ip_forward, stripped; None when absent."""
    try:
        return rooted(root, "/proc/sys/" + name.replace(".", "/")).read_text().strip()
    except OSError:
        return None


def find_in_path(root: Path, tool: str, path: tuple[str, ...] = SERVICE_PATH) -> Path | None:
    """The first executable file named `tool` in the PATH directories under the root."""
    for directory in path:
        candidate = rooted(root, directory) / tool
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def port_problem(port: int) -> str | None:
    """Why `port` cannot be bound on every address (kubeadm's PortOpenCheck listens on ":<port>"), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Go's net.Listen: TIME_WAIT is no conflict
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"Port {port} is in use"
            return f"cannot bind port {port}: {exc.strerror}"
    return None


def dir_not_empty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())
