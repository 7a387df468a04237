"""The `kubeadm` stand-in: brings the simulated node's control plane up the way real kubeadm does.

It writes PKI, kubeconfigs, static pod manifests and kubelet files under the node root and talks to the
API like kubeadm; `cli.main` is the entry point.
"""
