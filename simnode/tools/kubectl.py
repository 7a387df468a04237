"""`kubectl` stand-in: `version --client` reports the simulated version; anything else runs the real kubectl.

Writes nothing. The real kubectl is looked up on $PATH, skipping this program and other simnode builds.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import yaml

from simnode.launch import build_version
from simnode.paths import NodeRootError, resolve_root

KUSTOMIZE_VERSION = "v5.4.2"
# Set while we exec the real kubectl, so a misconfigured PATH cannot make us exec ourselves forever.
GUARD_ENV = "SIMNODE_KUBECTL_DELEGATED"


def client_version() -> dict[str, object]:
    version = build_version()
    major, minor = version.lstrip("v").split(".")[:2]
    return {
        "clientVersion": {
            "major": major,
            "minor": minor,
            "gitVersion": version,
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2024-01-01T00:00:00Z",
            "goVersion": "go1.22.0",
            "compiler": "gc",
            "platform": "linux/amd64",
        },
        "kustomizeVersion": KUSTOMIZE_VERSION,
    }


# Global flags that take a value and do not change what `version --client` prints.
VALUE_FLAGS = {"--kubeconfig", "--context", "--cluster", "--user", "-n", "--namespace", "-s", "--server",
               "--request-timeout", "-v", "--v", "--token", "--as"}


def _version(argv: list[str]) -> int | None:
    """Handle `[global flags] version --client [-o json|yaml]`; None means "not ours, delegate"."""
    positional: list[str] = []
    client, output, i = False, "", 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--client", "--client=true"):
            client = True
        elif arg in ("-o", "--output") and i + 1 < len(argv):
            output, i = argv[i + 1], i + 1
        elif arg.startswith(("-o=", "--output=")):
            output = arg.split("=", 1)[1]
        elif arg in VALUE_FLAGS:
            i += 1
        elif not arg.startswith("-"):
            positional.append(arg)
        elif arg.split("=", 1)[0] not in VALUE_FLAGS:
            return None  # a flag we do not model: the real kubectl knows what it means
        i += 1
    if positional != ["version"] or not client:
        return None
    info = client_version()
    if output == "json":
        print(json.dumps(info, indent=2))
    elif output == "yaml":
        print(yaml.safe_dump(info, sort_keys=True), end="")
    elif output == "":
        print(f"Client Version: {build_version()}\nKustomize Version: {KUSTOMIZE_VERSION}")
    else:
        print(f"error: --output must be 'yaml' or 'json', got {output!r}", file=sys.stderr)
        return 1
    return 0


def _is_simnode_build(path: Path) -> bool:
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as zf:
            return "simnode/tools/kubectl.py" in zf.namelist()
    except OSError:
        return False


def find_real_kubectl(path_env: str | None = None) -> Path | None:
    """The first kubectl on PATH that is neither this program nor another copy of a simnode build."""
    me = Path(sys.argv[0]).resolve()
    for directory in (path_env if path_env is not None else os.environ.get("PATH", "")).split(os.pathsep):
        found = shutil.which("kubectl", path=directory) if directory else None
        if found is None:
            continue
        candidate = Path(found).resolve()
        if candidate != me and not _is_simnode_build(candidate):
            return candidate
    return None


def _reroot_kubeconfig(argv: list[str]) -> list[str]:
    """`--kubeconfig /etc/kubernetes/admin.conf` names a real node path; point it under the node root."""
    try:
        root = resolve_root()
    except NodeRootError:
        return argv
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--kubeconfig" and i + 1 < len(out):
            i, value, prefix = i + 1, out[i + 1], ""
        elif arg.startswith("--kubeconfig="):
            value, prefix = arg.split("=", 1)[1], "--kubeconfig="
        else:
            continue
        rooted = root.path(value)
        if not Path(value).exists() and rooted.exists():
            out[i] = prefix + str(rooted)
    return out


def main(argv: list[str]) -> int:
    if "version" in argv:
        handled = _version(argv)
        if handled is not None:
            return handled
    if os.environ.get(GUARD_ENV):
        print("kubectl (simnode): the kubectl found on PATH is a simnode build again; giving up", file=sys.stderr)
        return 1
    real = find_real_kubectl()
    if real is None:
        print(
            "kubectl (simnode): only `kubectl version --client` is simulated; for other commands a real "
            "kubectl must be on PATH, and none was found",
            file=sys.stderr,
        )
        return 1
    env = dict(os.environ)
    env[GUARD_ENV] = "1"
    os.execve(real, ["kubectl", *_reroot_kubeconfig(argv)], env)
    return 1  # not reached: execve replaces the process
