"""`kubelet` entry point: parse flags and the KubeletConfiguration (errors exit 1 before anything runs),
then hand over to simnode.kubelet.agent. Heavy imports wait until the flags are known to be good.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from simnode.kubelet.config import KubeletConfigError, settings
from simnode.launch import build_version
from simnode.machine import swaps_lines
from simnode.paths import NodeRoot, NodeRootError, resolve_root

USAGE = """Usage: kubelet [flags]
  --config=PATH               KubeletConfiguration file
  --kubeconfig=PATH           credentials for the API server
  --bootstrap-kubeconfig=PATH used when --kubeconfig does not exist yet
  --node-ip=IP --hostname-override=NAME
  --container-runtime-endpoint=unix:///path/docker.sock
  --pod-infra-container-image=REF --root-dir=PATH --v=N
The node root comes from $SIMNODE_ROOT or the executable's location (<root>/usr/bin/kubelet)."""


def main(argv: list[str]) -> int:
    if "--version" in argv or "--version=true" in argv:
        # kubernetes: staging/src/k8s.io/component-base/version/verflag/verflag.go, PrintAndExitIfRequested:
        # "Kubernetes <gitVersion>" on stdout, exit 0, before any other flag is looked at.
        print(f"Kubernetes {build_version()}")
        return 0
    try:
        root = resolve_root()
        s = settings(argv, root)
    except (NodeRootError, KubeletConfigError) as exc:
        print(f"kubelet: {exc}", file=sys.stderr)
        return 1
    if "--help" in argv:
        print(USAGE)
        return 0
    refusal = swap_refusal(s.root, fail_swap_on=s.fail_swap_on)
    if refusal:
        print(f"kubelet: failed to run Kubelet: {refusal}", file=sys.stderr)
        return 1
    level = logging.DEBUG if s.verbosity >= 4 else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname).1s %(name)s] %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    from simnode.kubelet.agent import Kubelet

    return asyncio.run(Kubelet(s).run())


def swap_refusal(root: NodeRoot, *, fail_swap_on: bool) -> str | None:
    """kubernetes/kubernetes pkg/kubelet/cm/container_manager_linux.go validateSwapConfiguration: with failSwapOn
    (the default) a /proc/swaps of more than its header line stops the kubelet before it runs anything."""
    lines = swaps_lines(root)
    if not fail_swap_on or lines is None or len(lines) <= 1:
        return None
    return ("running with swap on is not supported, please disable swap! or set --fail-swap-on flag to false. "
            f"/proc/swaps contained: [{' '.join(lines)}]")
