"""The node's address and the API endpoint name, read from the machine's own files under the node root.

`detect_node_ip` picks the address of the interface the default route goes through, as kubeadm and the kubelet
choose a node address (kubernetes/apimachinery pkg/util/net/interface.go, ChooseHostInterface: the default
route from /proc/net/route, then that interface's address). The addresses come from /proc/net/fib_trie (IPv4,
"/32 host LOCAL") and /proc/net/if_inet6, so a test steers all of it with files. Only `add_hosts_entry` writes.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from lifecycle.hostfacts import rooted

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_RTF_UP, _RTF_GATEWAY = 0x1, 0x2  # /proc/net/route flags (linux/route.h)
_FIB_ADDRESS = re.compile(r"^\s*\|-- ([0-9]+\.[0-9]+\.[0-9]+\.[0-9]+)\s*$")
_FIB_LOCAL = re.compile(r"^\s*/32 host LOCAL\s*$")
HOSTS_COMMENT = "# added by lifecycle: the Kubernetes API endpoint (kubernetes.endpoint_name)"


class NodeAddressError(Exception):
    """The node address cannot be found; `code` is the error code on the wire."""

    def __init__(self, message: str, *, code: str = "node_ip_undetected") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class Route:
    iface: str
    network: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    flags: int
    metric: int


def _hex_ipv4(field: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(int.from_bytes(bytes.fromhex(field), "little"))  # host byte order (x86: little)


def routes(root: Path) -> list[Route]:
    """The IPv4 routing table from /proc/net/route (empty when unreadable)."""
    try:
        lines = rooted(root, "/proc/net/route").read_text().splitlines()
    except OSError:
        return []
    found: list[Route] = []
    for line in lines[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            destination, gateway, mask = _hex_ipv4(fields[1]), _hex_ipv4(fields[2]), _hex_ipv4(fields[7])
            network = ipaddress.IPv4Network(f"{destination}/{mask}", strict=False)
            found.append(Route(fields[0], network, gateway, int(fields[3], 16), int(fields[6])))
        except ValueError:
            continue
    return found


def local_addresses(root: Path) -> set[IPAddress]:
    """Every address assigned to this machine: IPv4 from /proc/net/fib_trie, IPv6 from /proc/net/if_inet6."""
    found: set[IPAddress] = set()
    try:
        candidate: str | None = None
        for line in rooted(root, "/proc/net/fib_trie").read_text().splitlines():
            match = _FIB_ADDRESS.match(line)
            if match:
                candidate = match.group(1)
            elif candidate and _FIB_LOCAL.match(line):
                found.add(ipaddress.IPv4Address(candidate))
    except OSError:
        pass
    try:
        for line in rooted(root, "/proc/net/if_inet6").read_text().splitlines():
            fields = line.split()
            if fields and len(fields[0]) == 32:
                found.add(ipaddress.IPv6Address(int(fields[0], 16)))
    except (OSError, ValueError):
        pass
    return found


def is_local(root: Path, address: str) -> bool:
    """True when `address` is assigned to this machine (loopback addresses always are)."""
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or ip in local_addresses(root)


def detect_node_ip(root: Path) -> str:
    """The address of the interface the default route goes through (lowest metric first)."""
    table = routes(root)
    defaults = sorted((r for r in table if r.network.prefixlen == 0 and r.flags & _RTF_UP), key=lambda r: r.metric)
    if not defaults:
        raise NodeAddressError("no default route in /proc/net/route: set kubernetes.node_ip to this machine's address")
    mine = sorted(a for a in local_addresses(root) if isinstance(a, ipaddress.IPv4Address) and not a.is_loopback)
    for default in defaults:
        on_link = [r.network for r in table if r.iface == default.iface and r.network.prefixlen > 0
                   and not r.flags & _RTF_GATEWAY]
        for address in mine:
            if any(address in network for network in on_link):
                return str(address)
    raise NodeAddressError(f"the default route goes through {defaults[0].iface}, but no address of "
                           f"{defaults[0].iface} is listed in /proc/net/fib_trie: set kubernetes.node_ip")


def hosts_addresses(root: Path, name: str) -> list[str]:
    """The addresses /etc/hosts gives `name` (case-insensitive), in file order."""
    try:
        lines = rooted(root, "/etc/hosts").read_text().splitlines()
    except OSError:
        return []
    wanted = name.lower().rstrip(".")
    found: list[str] = []
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and wanted in (f.lower() for f in fields[1:]) and fields[0] not in found:
            found.append(fields[0])
    return found


def resolve(root: Path, name: str) -> list[str]:
    """What `name` resolves to on this machine: an address itself, else /etc/hosts (nsswitch "files" first),
    else the system resolver. Blocking: call it from a worker thread. [] when it does not resolve."""
    try:
        return [str(ipaddress.ip_address(name.strip("[]")))]
    except ValueError:
        pass
    listed = hosts_addresses(root, name)
    if listed:
        return listed
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def add_hosts_entry(root: Path, address: str, name: str) -> Path:
    """Append `<address> <name>` to /etc/hosts (appended in place, not replaced: a container's /etc/hosts is a
    bind mount). Returns the file's path."""
    path = rooted(root, "/etc/hosts")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        existing = path.read_bytes()
    except FileNotFoundError:
        existing = b""
    prefix = b"\n" if existing and not existing.endswith(b"\n") else b""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, prefix + f"{address}\t{name}\t{HOSTS_COMMENT}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def node_ip_for_install(configured: str, root: Path) -> str:
    """`kubernetes.node_ip` when set, else the detected address; NodeAddressError when neither is known."""
    return configured or detect_node_ip(root)
