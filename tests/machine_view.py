"""A machine view laid out by simnode/host.py, as the preflight tests use it: break three of the prerequisites
kubeadm checks (and put them back), and fingerprint the tree to show that a refused install wrote nothing.
Shared by tests/integration/test_preflight_step.py and tests/e2e/test_preflight_over_mqtt.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

SERVICE_OWN = ("var/lib/lifecycle", "var/log/lifecycle")  # the service's own state, written by the engine
SWAP_LINE = "/swapfile  file  1048572  0  -2\n"


def tree(root: Path) -> dict[str, str]:
    """Every file and directory under the root but the service's own state: path -> sha256 / "dir"."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if rel.startswith(SERVICE_OWN) or any(own.startswith(rel + "/") for own in SERVICE_OWN):
            continue
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "other"
    return out


@dataclass(frozen=True)
class BrokenMachine:
    """What `break_prerequisites` changed, to put back."""

    root: Path
    swaps: str
    conntrack: bytes

    def repair(self) -> None:
        """Swap off, forwarding on, conntrack back (0755)."""
        (self.root / "proc/swaps").write_text(self.swaps)
        (self.root / "proc/sys/net/ipv4/ip_forward").write_text("1\n")
        (self.root / "usr/sbin/conntrack").write_bytes(self.conntrack)
        (self.root / "usr/sbin/conntrack").chmod(0o755)


def break_prerequisites(root: Path) -> BrokenMachine:
    """Swap on (/swapfile), IP forwarding off, conntrack gone: kubeadm's Swap, FileContent--proc-sys-net-ipv4-
    ip_forward and FileExisting-conntrack checks fail."""
    swaps = (root / "proc/swaps").read_text()
    conntrack = (root / "usr/sbin/conntrack").read_bytes()
    (root / "proc/swaps").write_text(swaps + SWAP_LINE)
    (root / "proc/sys/net/ipv4/ip_forward").write_text("0\n")
    (root / "usr/sbin/conntrack").unlink()
    return BrokenMachine(root, swaps, conntrack)
