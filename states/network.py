"""network: the single-node pod network cri-dockerd's CNI plugin needs before any pod off the host network can run.
Leaves `<root>/etc/cni/net.d/10-lifecycle.conflist` (bridge as the pods' default gateway with IP masquerade and
hairpin mode, host-local IPAM over `kubernetes.pod_subnet`, portmap), after checking that those plugins and
loopback are executable in `<root>/opt/cni/bin` (the binaries step copies them). Done when the file holds exactly
that, the plugins are there, and no other config sorts before ours (cri-dockerd uses the first valid one).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from lifecycle.errors import PermanentError
from lifecycle.paths import HostPaths
from lifecycle.step import StepContext

CONF_DIR = "/etc/cni/net.d"
BIN_DIR = "/opt/cni/bin"
CONF_NAME = "10-lifecycle.conflist"
NETWORK_NAME = "lifecycle"
# loopback is not in the conflist: cri-dockerd sets up every sandbox's lo with it (network/cni/cni.go, getLoNetwork).
PLUGINS = ("bridge", "host-local", "portmap", "loopback")
CONF_EXTENSIONS = (".conf", ".conflist", ".json")  # what libcni.ConfFiles picks up (cri-dockerd network/cni/cni.go)


def conflist(pod_subnet: str) -> bytes:
    """The network config: one bridge (cni0) on the node, the node as the pods' gateway, NAT to the outside."""
    doc = {
        "cniVersion": "1.0.0",
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "isDefaultGateway": True,  # pods route everything through the bridge's address
                "ipMasq": True,  # pods reach beyond the node with the node's address
                "hairpinMode": True,  # a pod reaches itself through its own Service address
                "ipam": {"type": "host-local", "ranges": [[{"subnet": pod_subnet}]]},
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},  # hostPort
        ],
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


class Network:
    name = "network"
    timeout_s = 30.0
    retries = 1  # writing the file is idempotent

    async def is_done(self, ctx: StepContext) -> bool:
        want = conflist(ctx.config.kubernetes.pod_subnet)
        return await asyncio.to_thread(_holds, ctx.paths, want)

    async def run(self, ctx: StepContext) -> None:
        problems = await asyncio.to_thread(plugin_problems, ctx.paths)
        if problems:
            raise PermanentError(
                f"the pod network needs the CNI plugins {', '.join(PLUGINS)} in {BIN_DIR}: {'; '.join(problems)} "
                "(the binaries step copies them: list them in kubernetes.binaries)",
                code="cni_plugins_missing", details={"problems": problems},
            )
        earlier = await asyncio.to_thread(configs_before_ours, ctx.paths)
        if earlier:
            raise PermanentError(
                f"{', '.join(earlier)} sorts before {CONF_DIR}/{CONF_NAME}: cri-dockerd would use it for the pod "
                "network instead; remove it (or move it after ours) and install again",
                code="cni_config_conflict", details={"files": earlier},
            )
        path = ctx.paths.under(f"{CONF_DIR}/{CONF_NAME}")
        await asyncio.to_thread(_write, path, conflist(ctx.config.kubernetes.pod_subnet))
        ctx.progress(f"pod network {NETWORK_NAME} ({ctx.config.kubernetes.pod_subnet}) in {CONF_DIR}/{CONF_NAME}")

    async def before_retry(self, ctx: StepContext) -> None:
        return None  # the file is replaced atomically


def plugin_problems(paths: HostPaths) -> list[str]:
    """What is wrong with each plugin the network needs: missing, not a regular file, or not executable."""
    problems: list[str] = []
    for name in PLUGINS:
        path = paths.under(f"{BIN_DIR}/{name}")
        if not path.exists():
            problems.append(f"{BIN_DIR}/{name} is missing")
        elif not path.is_file():
            problems.append(f"{BIN_DIR}/{name} is not a regular file")
        elif not os.access(path, os.X_OK):
            problems.append(f"{BIN_DIR}/{name} is not executable")
    return problems


def configs_before_ours(paths: HostPaths) -> list[str]:
    """Other network configs cri-dockerd would try first (it takes the first valid one in name order)."""
    conf_dir = paths.under(CONF_DIR)
    try:
        names = sorted(p.name for p in conf_dir.iterdir() if p.suffix in CONF_EXTENSIONS and not p.is_dir())
    except FileNotFoundError:
        return []
    return [f"{CONF_DIR}/{n}" for n in names if n < CONF_NAME]


def _holds(paths: HostPaths, want: bytes) -> bool:
    try:
        have = paths.under(f"{CONF_DIR}/{CONF_NAME}").read_bytes()
    except OSError:
        return False
    return have == want and not plugin_problems(paths) and not configs_before_ours(paths)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")  # no .conf* suffix: cri-dockerd never reads a half-written file
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fchmod(f.fileno(), 0o644)
        os.fsync(f.fileno())
    temp.replace(path)
