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
