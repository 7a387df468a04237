"""A stand-in for rancher/local-path-provisioner, run by the simulated kubelet for the storage addon's pod."""
