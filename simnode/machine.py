"""What the simulated components read of the machine around them: the files `simnode/host.py` lays out under
the node root (CPUs, memory, swap, sysctls, tools on the PATH, the node's addresses). Read only.

Real kubeadm, kubelet and etcd read the same paths at "/" (or ask the kernel); each reader names its source.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

from simnode.paths import NodeRoot

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_FIB_ADDRESS = re.compile(r"^\s*\|-- (\d+\.\d+\.\d+\.\d+)\s*$")
_FIB_LOCAL = re.compile(r"^\s*/32 host LOCAL\s*$")


def _read(root: NodeRoot, real: str) -> str | None:
    try:
        return root.path(real).read_text()
    except OSError:
        return None


def num_cpu(root: NodeRoot) -> int | None:
    """Go's runtime.NumCPU, from /sys/devices/system/cpu/online ("0-1" -> 2)."""
    text = _read(root, "/sys/devices/system/cpu/online")
    if text is None:
        return None
    count = 0
    try:
        for part in filter(None, text.strip().split(",")):
            first, _, last = part.partition("-")
            count += int(last or first) - int(first) + 1
    except ValueError:
        return None
    return count


def total_ram_mb(root: NodeRoot) -> int | None:
    """sysinfo(2) Totalram in MB, from MemTotal in /proc/meminfo."""
    for line in (_read(root, "/proc/meminfo") or "").splitlines():
        name, _, value = line.partition(":")
        if name == "MemTotal" and value.split() and value.split()[0].isdigit():
            return int(value.split()[0]) // 1024
    return None


def swaps_lines(root: NodeRoot) -> list[str] | None:
    """The lines of /proc/swaps (header first), trimmed as the kubelet trims them; None when absent."""
    text = _read(root, "/proc/swaps")
    return None if text is None else text.strip().split("\n")


def look_path(root: NodeRoot, tool: str) -> Path | None:
    """Go's exec.LookPath over $PATH, every directory taken under the node root."""
    for directory in (os.environ.get("PATH") or DEFAULT_PATH).split(":"):
        if not directory.startswith("/"):
            continue
        candidate = root.path(directory) / tool
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def has_network_view(root: NodeRoot) -> bool:
    """Whether the root carries the kernel's address list at all (host.py lays it out)."""
    return root.path("/proc/net/fib_trie").exists()


def local_addresses(root: NodeRoot) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses assigned to the node: IPv4 from /proc/net/fib_trie, IPv6 from /proc/net/if_inet6."""
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    candidate: str | None = None
    for line in (_read(root, "/proc/net/fib_trie") or "").splitlines():
        match = _FIB_ADDRESS.match(line)
        if match:
            candidate = match.group(1)
        elif candidate and _FIB_LOCAL.match(line):
            found.add(ipaddress.IPv4Address(candidate))
    for line in (_read(root, "/proc/net/if_inet6") or "").splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            found.add(ipaddress.IPv6Address(int(fields[0], 16)))
    return found


def can_assign(root: NodeRoot, host: str) -> bool:
    """Whether a socket could bind `host` on this node (the kernel's EADDRNOTAVAIL otherwise). A root without a
    network view (no /proc/net/fib_trie) accepts every address, as the simulator did before it had one."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return True  # a name: resolved elsewhere
    if ip.is_unspecified or ip.is_loopback or not has_network_view(root):
        return True
    return ip in local_addresses(root)
