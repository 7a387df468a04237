"""The steps of a bring-up, one module per state: `is_done` and `run`.

The plan is this list, in order; the engine walks it and skips what `is_done` says already holds.
"""

from __future__ import annotations

from lifecycle.step import Step

STEP_ORDER = ("preflight", "certs", "images", "binaries", "network", "kubeadm", "kubelet", "readiness", "addons")


def build_plan() -> list[Step]:
    # Imported here so `lifecycle graph` and request parsing do not pay for the steps' dependencies.
    from states.addons import Addons
    from states.binaries import Binaries
    from states.certs import Certs
    from states.images import Images
    from states.kubeadm import Kubeadm
    from states.kubelet import Kubelet
    from states.network import Network
    from states.preflight import Preflight
    from states.readiness import Readiness

    plan: list[Step] = [
        Preflight(),  # what the machine must offer (tools, sysctls, swap off, free ports, its address), all at once
        Certs(),  # the kubeadm PKI, kubeconfigs and the kubeadm config, from our own CA
        Images(),  # binaries, control-plane and addon images, pulled through the Docker Engine
        Binaries(),  # kubeadm, kubelet, kubectl, crictl and the CNI plugins copied out of the binaries image
        Network(),  # the pod network's CNI config (bridge, host-local, portmap), before anything starts the kubelet
        Kubeadm(),  # kubeadm init phases up to kubelet-start: manifests and kubelet config
        Kubelet(),  # the kubelet, supervised, healthy
        Readiness(),  # our own kubelet and API waits, kubeadm's API phases, then the pods and the node Ready
        Addons(),  # storage addon (local-path-provisioner, default StorageClass) applied and available
    ]
    assert tuple(step.name for step in plan) == STEP_ORDER
    return plan


UPGRADE_ORDER = ("upgrade_images", "upgrade_binaries", "upgrade_plan", "upgrade_apply", "upgrade_kubelet",
                 "upgrade_readiness")


def build_upgrade_plan() -> list[Step]:
    """The upgrade in place; each step is handed a context whose cluster names the version upgraded to."""
    from states.upgrade_apply import UpgradeApply
    from states.upgrade_binaries import UpgradeBinaries
    from states.upgrade_images import UpgradeImages
    from states.upgrade_kubelet import UpgradeKubelet
    from states.upgrade_plan import UpgradePlan
    from states.upgrade_readiness import UpgradeReadiness

    plan: list[Step] = [
        UpgradeImages(),  # the new version's images pulled while the old one runs
        UpgradeBinaries(),  # its binaries extracted into a staging root, nothing in /usr/bin touched
        UpgradePlan(),  # `kubeadm upgrade plan <version>` (the new kubeadm) sees a healthy cluster at the old one
        UpgradeApply(),  # `kubeadm upgrade apply <version> -y`: the control plane (rolled back by kubeadm on failure)
        UpgradeKubelet(),  # the new binaries in place, the kubelet restarted on them
        UpgradeReadiness(),  # control plane and kube-system pods Ready on the new version
    ]
    assert tuple(step.name for step in plan) == UPGRADE_ORDER
    return plan
