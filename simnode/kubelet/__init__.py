"""The kubelet stand-in: static pods as processes, node registration, mirror pods and pod status.

Leaves its state under `<root>/var/lib/kubelet/simnode/` and container logs under `<root>/var/log/pods/`.
"""
