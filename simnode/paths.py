"""One node root for everything the simulated node reads and writes.

Real kubeadm and kubelet use absolute host paths (/etc/kubernetes, /var/lib/kubelet, /var/lib/etcd).
The simulated node keeps those paths in its files and flags but re-roots them under one directory, so
several nodes run side by side on one machine and a test never touches the real /etc.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT_ENV = "SIMNODE_ROOT"


class NodeRootError(Exception):
    """The node root could not be determined."""


@dataclass(frozen=True)
class NodeRoot:
    """Maps real node paths to paths under `root`."""

    root: Path

    def path(self, real: str | os.PathLike[str]) -> Path:
        """Re-root a real path: `/etc/kubernetes` -> `<root>/etc/kubernetes`.

        A path that already lies under the root is returned as is, so callers may pass either form
        (the service writes rooted paths into flags, kubeadm writes real paths into manifests).
        Relative paths are taken relative to the root.
        """
        p = Path(real)
        root = self.root
        if p.is_absolute():
            if p == root or root in p.parents:
                return p
            return root / p.relative_to("/")
        return root / p

    def real(self, rooted: str | os.PathLike[str]) -> str:
        """The inverse of `path`: `<root>/etc/kubernetes` -> `/etc/kubernetes`."""
        p = Path(rooted)
        if p == self.root:
            return "/"
        if self.root in p.parents:
            return "/" + str(p.relative_to(self.root))
        return str(p)

    # Well-known locations (real kubeadm/kubelet defaults), re-rooted.
    @property
    def etc_kubernetes(self) -> Path:
        return self.path("/etc/kubernetes")

    @property
    def manifests(self) -> Path:
        return self.path("/etc/kubernetes/manifests")

    @property
    def kubelet_dir(self) -> Path:
        return self.path("/var/lib/kubelet")

    @property
    def etcd_dir(self) -> Path:
        return self.path("/var/lib/etcd")

    @property
    def faults_file(self) -> Path:
        return self.path("/etc/simnode/faults.json")


def resolve_root(*, rootfs: str | None = None, argv0: str | None = None) -> NodeRoot:
    """Find the node root: an explicit `--rootfs`, else $SIMNODE_ROOT, else the executable's location.

    The service copies the executables to `<root>/usr/bin`, so an executable at `X/usr/bin/kubeadm`
    belongs to the node rooted at X. That is what lets the copied binaries run from wherever they are.
    """
    if rootfs:
        return NodeRoot(Path(rootfs).resolve())
    env = os.environ.get(ROOT_ENV)
    if env:
        return NodeRoot(Path(env).resolve())
    exe = Path(argv0 if argv0 is not None else sys.argv[0]).resolve()
    if exe.parent.name == "bin" and exe.parent.parent.name == "usr":
        return NodeRoot(exe.parent.parent.parent)
    raise NodeRootError(
        f"cannot determine the node root for {exe}: run it from <root>/usr/bin, "
        f"set ${ROOT_ENV}, or pass --rootfs"
    )
