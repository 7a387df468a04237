"""Every host path the service touches, under one root (`--root`, default `/`).

A test or a second node passes another root and gets a whole node in a temp dir.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

KUBECONFIG_NAMES = ("admin.conf", "super-admin.conf", "kubelet.conf", "controller-manager.conf", "scheduler.conf")


@dataclass(frozen=True)
class HostPaths:
    root: Path

    def under(self, real: str) -> Path:
        """`/etc/kubernetes` -> `<root>/etc/kubernetes`."""
        return self.root / real.lstrip("/")

    @property
    def kubernetes_dir(self) -> Path:
        return self.under("/etc/kubernetes")

    @property
    def pki_dir(self) -> Path:
        return self.under("/etc/kubernetes/pki")

    @property
    def manifests_dir(self) -> Path:
        return self.under("/etc/kubernetes/manifests")

    def kubeconfig(self, name: str) -> Path:
        return self.kubernetes_dir / name

    @property
    def admin_conf(self) -> Path:
        return self.kubeconfig("admin.conf")

    @property
    def bin_dir(self) -> Path:
        return self.under("/usr/bin")

    def binary(self, name: str) -> Path:
        return self.bin_dir / name

    @property
    def kubelet_dir(self) -> Path:
        return self.under("/var/lib/kubelet")

    @property
    def kubelet_config(self) -> Path:
        return self.kubelet_dir / "config.yaml"

    @property
    def kubeadm_flags_env(self) -> Path:
        return self.kubelet_dir / "kubeadm-flags.env"

    @property
    def etcd_dir(self) -> Path:
        return self.under("/var/lib/etcd")

    @property
    def state_dir(self) -> Path:
        """What the service itself persists: state, event sequence, install parameters, stamps."""
        return self.under("/var/lib/lifecycle")

    @property
    def kubeadm_config(self) -> Path:
        return self.state_dir / "kubeadm.yaml"

    @property
    def log_dir(self) -> Path:
        return self.under("/var/log/lifecycle")
