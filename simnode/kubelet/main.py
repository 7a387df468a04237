"""`kubelet` entry point: parse flags and the KubeletConfiguration (errors exit 1 before anything runs),
then hand over to simnode.kubelet.agent. Heavy imports wait until the flags are known to be good.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from simnode.kubelet.config import KubeletConfigError, settings
from simnode.paths import NodeRootError, resolve_root

USAGE = """Usage: kubelet [flags]
  --config=PATH               KubeletConfiguration file
  --kubeconfig=PATH           credentials for the API server
  --bootstrap-kubeconfig=PATH used when --kubeconfig does not exist yet
  --node-ip=IP --hostname-override=NAME
  --container-runtime-endpoint=unix:///path/docker.sock
  --pod-infra-container-image=REF --root-dir=PATH --v=N
The node root comes from $SIMNODE_ROOT or the executable's location (<root>/usr/bin/kubelet)."""


def main(argv: list[str]) -> int:
    try:
        root = resolve_root()
        s = settings(argv, root)
    except (NodeRootError, KubeletConfigError) as exc:
        print(f"kubelet: {exc}", file=sys.stderr)
        return 1
    if "--help" in argv:
        print(USAGE)
        return 0
    level = logging.DEBUG if s.verbosity >= 4 else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname).1s %(name)s] %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    from simnode.kubelet.agent import Kubelet

    return asyncio.run(Kubelet(s).run())
