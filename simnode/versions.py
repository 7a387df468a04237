"""Kubernetes versions the simulated node offers, and the image names kubeadm gives their components.

With a custom `imageRepository` kubeadm names images `<repo>/<component>:<tag>` (coredns without its
`coredns/` sub-path), which is what the image builder pushes and the kubeadm stand-in writes into manifests.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VersionImages:
    kubernetes: str  # "v1.31.4"
    etcd: str  # etcd image tag
    coredns: str
    pause: str
    # Versions the binaries image's tag names, as Docker Desktop's do
    # (docker/desktop-kubernetes:kubernetes-v1.32.2-cni-v1.6.0-critools-v1.31.1-cri-dockerd-v0.3.16-1-debian).
    cni: str = "v1.6.0"
    critools: str = "v1.31.1"
    cri_dockerd: str = "v0.3.16"


VERSIONS: dict[str, VersionImages] = {
    "v1.31.4": VersionImages(kubernetes="v1.31.4", etcd="3.5.15-0", coredns="v1.11.3", pause="3.10"),
    "v1.32.1": VersionImages(kubernetes="v1.32.1", etcd="3.5.16-0", coredns="v1.11.3", pause="3.10"),
}
DEFAULT_VERSION = "v1.31.4"

# <repo>/desktop-kubernetes:kubernetes-<v>-cni-<v>-critools-<v>-cri-dockerd-<v>-1-debian: a Debian-like tree (see
# simnode/images.py, binaries_tree) holding the tools in /usr/bin and the CNI plugins in /opt/cni/bin.
BINARIES_IMAGE = "desktop-kubernetes"
BINARIES = ("kubeadm", "kubelet", "kubectl", "crictl")  # the simnode zipapp under these names, in /usr/bin
CNI_PLUGINS = (  # containernetworking/plugins v1.6.0 release tarball, into /opt/cni/bin
    "bandwidth", "bridge", "dhcp", "dummy", "firewall", "host-device", "host-local", "ipvlan", "loopback",
    "macvlan", "portmap", "ptp", "sbr", "static", "tap", "tuning", "vlan", "vrf",
)

# Addon images under their upstream paths (docker.io/<path>:<tag> is pushed as <repo>/<path>:<tag>), as the
# service's [addons] storage_provisioner_image / storage_helper_image name them in simnode/lifecycle.toml
# (deploy/addons/local-path-storage.yaml, rancher/local-path-provisioner v0.0.37). The kubelet runs the
# provisioner's container as the simnode program of the same name (simnode/kubelet/workloads.py).
ADDON_IMAGES: dict[str, tuple[str, str]] = {
    "local-path-provisioner": ("rancher/local-path-provisioner", "v0.0.37"),
    "busybox": ("library/busybox", "1.37.0"),
}

# Share of the ~190 MB compressed total each component has in real releases; the builder multiplies
# by its padding parameter.
HTTP_ECHO_IMAGE = "http-echo"
REALISTIC_SIZES_BYTES: dict[str, int] = {
    "kube-apiserver": 28_000_000,
    "kube-controller-manager": 26_000_000,
    "kube-scheduler": 20_000_000,
    "kube-proxy": 30_000_000,
    "etcd": 57_000_000,
    "coredns": 18_000_000,
    "pause": 320_000,
    "local-path-provisioner": 19_000_000,  # docker.io/rancher/local-path-provisioner:v0.0.37, linux/amd64
    "busybox": 2_200_000,
    HTTP_ECHO_IMAGE: 0,  # a real program (simnode/httpimage.py), no padding beyond the minimum
    BINARIES_IMAGE: 150_000_000,
}


def component_images(repo: str, version: str) -> dict[str, str]:
    """component name -> full image reference for one Kubernetes version."""
    v = VERSIONS[version]
    return {
        "kube-apiserver": f"{repo}/kube-apiserver:{v.kubernetes}",
        "kube-controller-manager": f"{repo}/kube-controller-manager:{v.kubernetes}",
        "kube-scheduler": f"{repo}/kube-scheduler:{v.kubernetes}",
        "kube-proxy": f"{repo}/kube-proxy:{v.kubernetes}",
        "etcd": f"{repo}/etcd:{v.etcd}",
        "coredns": f"{repo}/coredns:{v.coredns}",
        "pause": f"{repo}/pause:{v.pause}",
    }


def http_echo_image(repo: str) -> str:
    """The tests' HTTP server image (simnode/httpimage.py), run from the engine by the simulated kubelet."""
    return f"{repo}/simnode/{HTTP_ECHO_IMAGE}:1"


def addon_images(repo: str) -> dict[str, str]:
    return {name: f"{repo}/{path}:{tag}" for name, (path, tag) in ADDON_IMAGES.items()}


def binaries_image(repo: str, version: str) -> str:
    v = VERSIONS[version]
    tag = f"kubernetes-{v.kubernetes}-cni-{v.cni}-critools-{v.critools}-cri-dockerd-{v.cri_dockerd}-1-debian"
    return f"{repo}/{BINARIES_IMAGE}:{tag}"
