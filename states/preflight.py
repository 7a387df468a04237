"""preflight: what kubeadm, the kubelet and etcd need of this machine, and the addon manifests the last state will
apply, checked before anything is written; every unmet prerequisite is reported at once, each with its check name
(kubeadm's where kubeadm has one) and the fix.
Leaves nothing behind but, when the API endpoint name resolves nowhere, a line for it in /etc/hosts (as Docker
Desktop's VM has it; a progress event says so). Done when every check passes and the name resolves, or when the
node already has a cluster: the checks are for a fresh machine, and a running cluster holds the ports they look at.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass

from lifecycle.config import Config
from lifecycle.errors import PermanentError
from lifecycle.hostfacts import (
    cpu_count,
    dir_not_empty,
    find_in_path,
    mem_total_mb,
    port_problem,
    swap_devices,
    sysctl_value,
)
from lifecycle.nodeaddr import NodeAddressError, add_hosts_entry, detect_node_ip, is_local, local_addresses, resolve
from lifecycle.paths import HostPaths
from lifecycle.step import ClusterParams, StepContext
from states.addons import load_manifests, placeholders
from states.kubeadm import STATIC_POD_MANIFESTS

# kubeadm's constants (cmd/kubeadm/app/constants/constants.go): ControlPlaneNumCPU, ControlPlaneMem (MB), and the
# fixed ports its InitNodeChecks look at besides the API server's (cmd/kubeadm/app/preflight/checks.go).
MIN_CPUS = 2
MIN_MEM_MB = 1700
FIXED_PORTS = (10259, 10257, 10250, 2379, 2380)  # scheduler, controller-manager, kubelet, etcd client, etcd peer
# Tools kubeadm's addExecChecks requires on the PATH (checks_linux.go), with the Debian package that ships each.
# conntrack is only required below v1.32 (kube-proxy stopped needing it: kubernetes/kubernetes#126952).
REQUIRED_TOOLS = {"conntrack": "conntrack", "ip": "iproute2", "iptables": "iptables", "mount": "mount",
                  "nsenter": "util-linux"}
RESOLVE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Unmet:
    """One unmet prerequisite: kubeadm's check name where it has one, what is wrong, and what to do about it."""

    check: str
    problem: str
    fix: str
    code: str = "prerequisites"

    def to_json(self) -> dict[str, str]:
        return {"check": self.check, "problem": self.problem, "fix": self.fix}


# Which error code the failure carries when several kinds of check failed: the address first (it is config).
_CODE_ORDER = ("node_ip_undetected", "node_ip_not_local", "endpoint_not_local", "bad_manifest", "prerequisites")


class Preflight:
    name = "preflight"
    timeout_s = 30.0
    retries = 0  # nothing here gets better by waiting: the machine or the config has to change

    async def is_done(self, ctx: StepContext) -> bool:
        if has_cluster(ctx.paths):
            return True
        unmet, add_hosts = await _all_checks(ctx)
        return not unmet and not add_hosts

    async def run(self, ctx: StepContext) -> None:
        unmet, add_hosts = await _all_checks(ctx)
        if unmet:
            code = min((u.code for u in unmet), key=_CODE_ORDER.index)
            lines = [f"[ERROR {u.check}]: {u.problem} (fix: {u.fix})" for u in unmet]
            raise PermanentError(
                f"{len(unmet)} preflight check{'s' if len(unmet) > 1 else ''} failed, nothing was changed:\n"
                + "\n".join(lines),
                code=code, details={"checks": [u.to_json() for u in unmet]},
            )
        if add_hosts:
            name = ctx.config.kubernetes.endpoint_name
            path = await asyncio.to_thread(add_hosts_entry, ctx.paths.root, ctx.node_ip, name)
            ctx.progress(f"{name} did not resolve: added '{ctx.node_ip} {name}' to /{path.relative_to(ctx.paths.root)}")
        ctx.progress("the machine meets every prerequisite")

    async def before_retry(self, ctx: StepContext) -> None:
        return None


async def _all_checks(ctx: StepContext) -> tuple[list[Unmet], bool]:
    """Every unmet prerequisite (the address first), and whether the endpoint name needs a hosts entry."""
    unmet = await asyncio.to_thread(
        lambda: machine_checks(ctx.config, ctx.cluster, ctx.paths, ctx.node_ip) + addon_checks(ctx.config))
    address_unmet, add_hosts = await _address_checks(ctx)
    return address_unmet + unmet, add_hosts


def has_cluster(paths: HostPaths) -> bool:
    """kubeadm has run here (a static pod manifest or the kubelet config it writes exists)."""
    return paths.kubelet_config.exists() or any((paths.manifests_dir / m).exists() for m in STATIC_POD_MANIFESTS)


def machine_checks(config: Config, cluster: ClusterParams, paths: HostPaths, node_ip: str) -> list[Unmet]:
    """kubeadm's InitNodeChecks that the service can run itself, plus the kubelet's swap refusal. Read only."""
    root = paths.root
    unmet: list[Unmet] = []
    cpus = cpu_count(root)
    if cpus is not None and cpus < MIN_CPUS:
        unmet.append(Unmet("NumCPU", f"the number of available CPUs {cpus} is less than the required {MIN_CPUS}",
                           f"give the machine at least {MIN_CPUS} CPUs"))
    mem_mb = mem_total_mb(root)
    if mem_mb is not None and mem_mb < MIN_MEM_MB:
        unmet.append(Unmet("Mem", f"the system RAM ({mem_mb} MB) is less than the minimum {MIN_MEM_MB} MB",
                           f"give the machine at least {MIN_MEM_MB} MB of memory"))
    for tool, package in REQUIRED_TOOLS.items():
        if tool == "conntrack" and _at_least(cluster.kubernetes_version, (1, 32)):
            continue
        if find_in_path(root, tool) is None:
            unmet.append(Unmet(f"FileExisting-{tool}", f"{tool} not found in system path",
                               f"apt-get install -y {package}"))
    unmet += _forwarding_checks(config, paths, node_ip)
    swaps = swap_devices(root)
    if swaps:
        # kubeadm only warns (Swap); the kubelet then refuses to start with failSwapOn, its default.
        unmet.append(Unmet("Swap", f"swap is on ({', '.join(swaps)}): the kubelet refuses to start with swap on "
                                   "(failSwapOn)",
                           "swapoff -a, and comment out the swap lines in /etc/fstab so it stays off"))
    ports = [cluster.api_port, *FIXED_PORTS, cluster.kubelet_healthz_port, cluster.etcd_metrics_port]
    for port in dict.fromkeys(p for p in ports if p):
        problem = port_problem(port)
        if problem:
            unmet.append(Unmet(f"Port-{port}", problem,
                               f"stop what listens on port {port} (ss -ltnp 'sport = :{port}' names it)"))
    if dir_not_empty(paths.etcd_dir):
        unmet.append(Unmet("DirAvailable--var-lib-etcd", "/var/lib/etcd is not empty",
                           "it holds another cluster's data: move it away (or `kubeadm reset` that cluster)"))
    return unmet


def addon_checks(config: Config) -> list[Unmet]:
    """The addon manifests, read and validated as the addons step will (nothing is applied): a directory that is
    not there or a manifest it cannot use is config, found here before kubeadm has run rather than after. (Found
    by hand: a config copied to another folder named `../deploy/addons` from there, and the install failed in its
    last step.) Read only."""
    try:
        load_manifests(config.addons.manifests_dir, placeholders=placeholders(config))
    except PermanentError as exc:
        problem = exc.message
    except OSError as exc:
        problem = f"cannot read the addon manifests: {exc}"
    else:
        return []
    return [Unmet("AddonManifests", problem, "correct addons.manifests_dir in the config (a relative path is taken "
                  "from the config file's folder) or the manifest named", code="bad_manifest")]


def _forwarding_checks(config: Config, paths: HostPaths, node_ip: str) -> list[Unmet]:
    """kubeadm's FileContent checks on IP forwarding, for the families the node address and subnets use."""
    k8s = config.kubernetes
    families = {ipaddress.ip_network(k8s.service_subnet).version, ipaddress.ip_network(k8s.pod_subnet).version}
    if node_ip:
        families.add(ipaddress.ip_address(node_ip).version)
    unmet: list[Unmet] = []
    for version, sysctl in ((4, "net.ipv4.ip_forward"), (6, "net.ipv6.conf.default.forwarding")):
        if version not in families:
            continue
        real = "/proc/sys/" + sysctl.replace(".", "/")
        value = sysctl_value(paths.root, sysctl)
        if value is None or not value.startswith("1"):
            problem = f"{real} does not exist" if value is None else f"{real} contents are not set to 1"
            fix = f"sysctl -w {sysctl}=1, and keep it: echo {sysctl}=1 > /etc/sysctl.d/99-kubernetes.conf"
            unmet.append(Unmet(f"FileContent-{real.replace('/', '-')}", problem, fix))
    return unmet


async def _address_checks(ctx: StepContext) -> tuple[list[Unmet], bool]:
    """The node address is this machine's and the endpoint name leads to it. Also: whether the hosts entry is
    needed (the name resolves nowhere)."""
    root, node_ip, name = ctx.paths.root, ctx.node_ip, ctx.config.kubernetes.endpoint_name
    if not node_ip:
        try:
            node_ip = await asyncio.to_thread(detect_node_ip, root)
            why = f"the address detected now ({node_ip}) was not known when the install started: install again"
        except NodeAddressError as exc:
            why = exc.message
        return [Unmet("NodeIP", why, "set kubernetes.node_ip to this machine's address",
                      code="node_ip_undetected")], False
    if not await asyncio.to_thread(is_local, root, node_ip):
        mine = sorted(str(a) for a in await asyncio.to_thread(local_addresses, root) if not a.is_loopback)
        configured = "configured" if ctx.config.kubernetes.node_ip else "detected"
        return [Unmet("NodeIP", f"the {configured} node address {node_ip} is not an address of this machine "
                                f"(it has {', '.join(mine) or 'none but loopback'}); etcd could not bind to it",
                      "set kubernetes.node_ip to one of this machine's addresses, or remove it to use the address "
                      "of the default route's interface", code="node_ip_not_local")], False
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            addresses = await asyncio.to_thread(resolve, root, name)
    except TimeoutError:
        addresses = []
    if not addresses:
        return [], True
    own = await asyncio.to_thread(local_addresses, root)
    if not any(ipaddress.ip_address(a).is_loopback or ipaddress.ip_address(a) in own for a in addresses):
        return [Unmet("EndpointName", f"kubernetes.endpoint_name {name} resolves to {', '.join(addresses)}, none of "
                                      "them an address of this machine: the kubeconfigs would lead elsewhere",
                      f"make {name} resolve to {node_ip} (DNS or /etc/hosts), or set kubernetes.endpoint_name to a "
                      "name that does", code="endpoint_not_local")], False
    return [], False


def _at_least(version: str, minimum: tuple[int, int]) -> bool:
    major, minor = (int(p) for p in version.lstrip("v").split(".")[:2])
    return (major, minor) >= minimum
