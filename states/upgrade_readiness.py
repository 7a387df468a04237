"""upgrade_readiness: after the kubelet restart, the `readiness` step's waits for the upgraded cluster: kubelet
/healthz, API /readyz, then every configured kube-system component Running and Ready and the node Ready.
kubeadm's API phases were applied at install (`kubeadm upgrade apply` updated what they made), so none runs.
Done when those pods are Ready now (the `readiness` step's check)."""

from __future__ import annotations

from states.readiness import Readiness


class UpgradeReadiness(Readiness):
    name = "upgrade_readiness"
    timeout_s = 300.0
