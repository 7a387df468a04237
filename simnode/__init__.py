"""The simulated Kubernetes node: stand-in executables, image builder and a Kubernetes API simulator.

Never imported by `lifecycle/` or `states/`: the service reaches it only through the interfaces a real
node offers (Docker Engine images, executables on disk, the Kubernetes API over HTTPS).
"""
