"""Entry point of every simulated executable: one program, dispatched busybox-style.

The tool is chosen by $SIMNODE_TOOL if set, else by the name the program was started as
(`kubeadm`, `kubelet`, ...), else by the first argument (`python -m simnode kubeadm version`).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

TOOL_ENV = "SIMNODE_TOOL"

# tool name -> "module:function"; each function takes argv (without the program name) and returns an
# exit code. Imported lazily so `kubeadm version` does not pay for the API simulator's imports.
TOOLS: dict[str, str] = {
    "kubeadm": "simnode.kubeadm.cli:main",
    "kubelet": "simnode.kubelet.main:main",
    "kubectl": "simnode.tools.kubectl:main",
    "crictl": "simnode.tools.crictl:main",
    "systemctl": "simnode.systemd:main",
    "kube-apiserver": "simnode.apiserver.main:main",
    "kube-controller-manager": "simnode.controllers.manager:main",
    "kube-scheduler": "simnode.controllers.scheduler:main",
    "etcd": "simnode.controllers.etcd:main",
    # Addon programs the kubelet runs for API pods (simnode/kubelet/workloads.py).
    "local-path-provisioner": "simnode.localpath.main:main",
}


def _load(tool: str) -> Callable[[list[str]], int]:
    module_name, func_name = TOOLS[tool].split(":")
    func: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), func_name)
    return func


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv if argv is None else argv)
    tool = os.environ.get(TOOL_ENV) or Path(args[0]).name
    rest = args[1:]
    if tool not in TOOLS:
        if rest and rest[0] in TOOLS:
            tool, rest = rest[0], rest[1:]
        else:
            print(f"simnode: unknown tool {tool!r}; known: {', '.join(sorted(TOOLS))}", file=sys.stderr)
            return 2
    return _load(tool)(rest)


if __name__ == "__main__":
    sys.exit(main())
