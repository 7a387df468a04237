"""The machine around the simulated node: what a Debian 12 VM with Docker Engine and cri-dockerd shows.

Real kubeadm, kubelet and cri-dockerd look at the machine (/proc, the PATH, the CRI sockets, systemd units)
before they act. The simulated ones look at the same paths under the node root instead, so a test can make a
machine that lacks something (no conntrack, swap on, ip_forward 0, a second CRI socket) without touching the
real one, and the lifecycle service, given the same root, sees the same machine.

`prepare_host(root)` lays out a machine on which a real kubeadm v1.31 preflight would pass:

    proc/sys/net/ipv4/ip_forward          1
    proc/swaps                            header only (no swap)
    proc/meminfo                          MemTotal 4 GiB
    sys/devices/system/cpu/online         0-1 (2 CPUs)
    usr/sbin/{conntrack,ip,iptables}      executables (stubs that exit 0)
    usr/bin/{mount,nsenter,ethtool,socat,tc,touch}
    var/run/containerd/containerd.sock    a unix socket (Docker Engine's containerd)
    var/run/cri-dockerd.sock              a unix socket (cri-dockerd)
    proc/net/{route,fib_trie,if_inet6}    the network: lo, and eth0 10.0.2.15/24 with the default route (a plain VM)
    etc/hosts                             Debian's: localhost and the host name, no kubernetes.docker.internal
    lib/systemd/system/cri-docker.service cri-dockerd's unit as its Debian package ships it, running (booted)
    usr/bin/systemctl                     the simulated systemctl (simnode/systemd.py): a systemd host

Each entry is written only when absent, so a test may prepare its own variant first or change one after.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from simnode.paths import NodeRoot
from simnode.systemd import boot

# Stubs for the tools kubeadm's preflight looks up on the PATH (cmd/kubeadm/app/preflight/checks.go, InPathCheck).
TOOL_STUBS: tuple[str, ...] = (
    "usr/sbin/conntrack", "usr/sbin/ip", "usr/sbin/iptables",
    "usr/bin/mount", "usr/bin/nsenter", "usr/bin/ethtool", "usr/bin/socat", "usr/bin/tc", "usr/bin/touch",
)
# The sockets kubeadm's DetectCRISocket knows (cmd/kubeadm/app/util/runtime/runtime_unix.go, defaultKnownCRISockets)
# that exist on a host with Docker Engine (its containerd) and cri-dockerd.
CRI_SOCKETS: tuple[str, ...] = ("var/run/containerd/containerd.sock", "var/run/cri-dockerd.sock")
# cri-dockerd's unit as packaged (Mirantis/cri-dockerd packaging/systemd/cri-docker.service).
CRI_DOCKER_UNIT = """\
[Unit]
Description=CRI Interface for Docker Application Container Engine
Documentation=https://docs.mirantis.com
After=network-online.target firewalld.service docker.service
Wants=network-online.target
Requires=cri-docker.socket

[Service]
Type=notify
ExecStart=/usr/bin/cri-dockerd --container-runtime-endpoint fd://
ExecReload=/bin/kill -s HUP $MAINPID
TimeoutSec=0
RestartSec=2
Restart=always

[Install]
WantedBy=multi-user.target
"""
# The network of a plain VM (QEMU user networking's 10.0.2.15), as the kernel lists it: the routes
# (/proc/net/route, little-endian hex), the local addresses (/proc/net/fib_trie) and IPv6 (/proc/net/if_inet6).
# What the service's node address detection and the simulated etcd's bind read (simnode/machine.py).
VM_ADDRESS = "10.0.2.15"
NETWORK_FILES: dict[str, str] = {
    "proc/net/route": (
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t0202000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
    ),
    "proc/net/fib_trie": (
        "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n"
        "     +-- 10.0.2.0/24 2 0 2\n        |-- 10.0.2.0\n           /24 link UNICAST\n"
        "        |-- 10.0.2.15\n           /32 host LOCAL\n"
        "     +-- 127.0.0.0/8 2 0 2\n        |-- 127.0.0.0\n           /8 host LOCAL\n"
        "        |-- 127.0.0.1\n           /32 host LOCAL\n"
    ),
    "proc/net/if_inet6": "00000000000000000000000000000001 01 80 10 80       lo\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n127.0.1.1\tsimvm\n::1\t\tlocalhost ip6-localhost ip6-loopback\n",
}
_FILES: dict[str, str] = {
    "proc/sys/net/ipv4/ip_forward": "1\n",
    "proc/swaps": "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n",
    "proc/meminfo": "MemTotal:        4194304 kB\nMemFree:         3145728 kB\nMemAvailable:    3670016 kB\n",
    "sys/devices/system/cpu/online": "0-1\n",
    "lib/systemd/system/cri-docker.service": CRI_DOCKER_UNIT,
    **NETWORK_FILES,
}


def prepare_host(root: Path) -> None:
    """Lay out the machine described in the module docstring under `root`, keeping what already exists."""
    for rel, text in _FILES.items():
        path = root / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for rel in TOOL_STUBS:
        path = root / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("#!/bin/sh\nexit 0\n")
            path.chmod(0o755)
    for rel in CRI_SOCKETS:
        path = root / rel
        if not path.exists():
            make_socket_file(path)
    systemctl = root / "usr/bin/systemctl"
    if not systemctl.exists():
        # The checkout's simnode, run by this Python: the machine's systemctl is part of the host, not of the
        # binaries image the service extracts.
        package_parent = Path(__file__).resolve().parent.parent
        systemctl.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(package_parent)!r})\n"
                             "from simnode.__main__ import main\nsys.exit(main())\n")
        systemctl.chmod(0o755)
    boot(NodeRoot(root.resolve()), ("cri-docker.service",))


# The kubelet's units as the Kubernetes packages (pkgs.k8s.io kubelet .deb, kubernetes/release
# cmd/krel/templates/latest/kubelet/kubelet.service and kubeadm/10-kubeadm.conf) install them.
KUBELET_UNIT = """\
[Unit]
Description=kubelet: The Kubernetes Node Agent
Documentation=https://kubernetes.io/docs/
Wants=network-online.target
After=network-online.target

[Service]
ExecStart=/usr/bin/kubelet
Restart=always
StartLimitInterval=0
RestartSec=10

[Install]
WantedBy=multi-user.target
"""
KUBEADM_DROP_IN = """\
# Note: This dropin only works with kubeadm and kubelet v1.11+
[Service]
Environment="KUBELET_KUBECONFIG_ARGS=--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf \
--kubeconfig=/etc/kubernetes/kubelet.conf"
Environment="KUBELET_CONFIG_ARGS=--config=/var/lib/kubelet/config.yaml"
EnvironmentFile=-/var/lib/kubelet/kubeadm-flags.env
EnvironmentFile=-/etc/default/kubelet
ExecStart=
ExecStart=/usr/bin/kubelet $KUBELET_KUBECONFIG_ARGS $KUBELET_CONFIG_ARGS $KUBELET_KUBEADM_ARGS $KUBELET_EXTRA_ARGS
"""


def install_kubelet_package_units(root: Path) -> None:
    """What installing the kubelet and kubeadm .debs adds: kubelet.service with kubeadm's drop-in, enabled."""
    for rel, text in (("lib/systemd/system/kubelet.service", KUBELET_UNIT),
                      ("lib/systemd/system/kubelet.service.d/10-kubeadm.conf", KUBEADM_DROP_IN)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    wants = root / "etc/systemd/system/multi-user.target.wants/kubelet.service"
    wants.parent.mkdir(parents=True, exist_ok=True)
    if not wants.is_symlink():
        wants.symlink_to("/lib/systemd/system/kubelet.service")


def make_socket_file(path: Path) -> None:
    """Leave a unix socket inode at `path` (bound, then closed: stat shows a socket, nobody listens).

    Bound through /proc/self/fd/<dir fd>/<name>, so a deep test directory cannot exceed the 108-byte limit
    of a socket address.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(f"/proc/self/fd/{dir_fd}/{path.name}")
    finally:
        os.close(dir_fd)
