"""kubeadm's pre-flight checks (cmd/kubeadm/app/preflight/checks.go InitNodeChecks, checks_linux.go), run
against the node's own view of the machine (simnode/host.py: its /proc, /sys and PATH under the node root):
CPUs, memory, ports, manifest files, CRI socket, swap, tools on the PATH, ip_forward, etcd's data dir.

Reads only (a port check binds and closes at once). Failures are `[ERROR Name]: reason` unless ignored
with --ignore-preflight-errors (or nodeRegistration.ignorePreflightErrors), then `[WARNING Name]`.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from simnode.kubeadm.config import Config
from simnode.kubeadm.errors import PhaseError
from simnode.kubeadm.manifests import CONTROL_PLANE, ETCD, MANIFESTS_DIR, _secure_port, is_ours, manifest_path
from simnode.machine import look_path, num_cpu, swaps_lines, total_ram_mb
from simnode.paths import NodeRoot

# cmd/kubeadm/app/constants/constants.go: ControlPlaneNumCPU, ControlPlaneMem (MB), KubeSchedulerPort,
# KubeControllerManagerPort, KubeletPort, EtcdListenClientPort, EtcdListenPeerPort.
CONTROL_PLANE_NUM_CPU = 2
CONTROL_PLANE_MEM_MB = 1700
SCHEDULER_PORT, CONTROLLER_MANAGER_PORT, KUBELET_PORT = 10259, 10257, 10250
ETCD_CLIENT_PORT, ETCD_PEER_PORT = 2379, 2380
# checks_linux.go addExecChecks: (executable, mandatory). conntrack is prepended below v1.32 (#126952).
EXEC_CHECKS: tuple[tuple[str, bool], ...] = (
    ("ip", True), ("iptables", True), ("mount", True), ("nsenter", True),
    ("ebtables", False), ("ethtool", False), ("socat", False), ("tc", False), ("touch", False),
)
# checks.go SwapCheck (v1.31): a warning only; the kubelet is what refuses swap (failSwapOn).
SWAP_WARNING = ("swap is supported for cgroup v2 only. The kubelet must be properly configured to use swap. Please "
                "refer to https://kubernetes.io/docs/concepts/architecture/nodes/#swap-memory, or disable swap on "
                "the node")
IPV4_FORWARD = "/proc/sys/net/ipv4/ip_forward"
IPV6_FORWARD = "/proc/sys/net/ipv6/conf/default/forwarding"


@dataclass(frozen=True)
class Finding:
    name: str
    message: str
    fatal: bool = True  # False: a warning even when not ignored


def _slug(path: str) -> str:
    return path.replace("/", "-")


def check_manifests(root: NodeRoot) -> list[Finding]:
    found: list[Finding] = []
    directory = root.path(MANIFESTS_DIR)
    ours = {f"{c}.yaml": c for c in (*CONTROL_PLANE, ETCD)}
    if not directory.is_dir():
        return found
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith("."):
            continue
        component = ours.get(entry.name)
        if component is None:
            found.append(Finding(f"DirAvailable-{_slug(MANIFESTS_DIR)}", f"{MANIFESTS_DIR} is not empty "
                                 f"(it holds {entry.name}, which kubeadm did not write)"))
            continue
        try:
            text = entry.read_text()
        except (OSError, UnicodeDecodeError):
            text = ""
        if not is_ours(text, component):
            path = manifest_path(component)
            found.append(Finding(f"FileAvailable-{_slug(path)}", f"{path} already exists"))
    return found


def port_in_use(host: str, port: int) -> str | None:
    """None when `host:port` can be bound (like Go's net.Listen, with SO_REUSEADDR), else the reason."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"Port {port} is in use"
            return f"cannot bind {host}:{port}: {exc.strerror}"
    return None


def _port_check(port: int) -> list[Finding]:
    # checks.go PortOpenCheck: net.Listen("tcp", ":<port>"), every address.
    problem = port_in_use("0.0.0.0", port)
    return [Finding(f"Port-{port}", f"Port {port} is in use")] if problem else []


def check_ports(cfg: Config) -> list[Finding]:
    """The API server's, scheduler's and controller-manager's ports (InitNodeChecks, in its order). Also the
    kubelet's healthz port, which kubeadm does not check: the simulated kubelet holds it instead of 10250
    (nodes side by side on one host cannot all have 10250), so a running kubelet still fails preflight."""
    found = _port_check(cfg.init.bind_port)
    found += _port_check(_secure_port(cfg.cluster.scheduler_extra_args, SCHEDULER_PORT))
    found += _port_check(_secure_port(cfg.cluster.controller_manager_extra_args, CONTROLLER_MANAGER_PORT))
    problem = port_in_use(cfg.healthz_host, cfg.healthz_port)
    if problem:
        found.append(Finding(f"Port-{cfg.healthz_port}", problem))
    return found


def check_machine(cfg: Config, root: NodeRoot) -> list[Finding]:
    """NumCPUCheck and MemCheck (checks.go, checks_linux.go), from the node's /sys and /proc."""
    found: list[Finding] = []
    cpus = num_cpu(root)
    if cpus is not None and cpus < CONTROL_PLANE_NUM_CPU:
        found.append(Finding("NumCPU", f"the number of available CPUs {cpus} is less than the required "
                                       f"{CONTROL_PLANE_NUM_CPU}"))
    ram_mb = total_ram_mb(root)
    if ram_mb is not None and ram_mb < CONTROL_PLANE_MEM_MB:
        found.append(Finding("Mem", f"the system RAM ({ram_mb} MB) is less than the minimum "
                                    f"{CONTROL_PLANE_MEM_MB} MB"))
    return found


def check_swap(root: NodeRoot) -> list[Finding]:
    lines = swaps_lines(root)  # SwapCheck: /proc/swaps not available -> no reason to warn
    return [Finding("Swap", SWAP_WARNING, fatal=False)] if lines is not None and len(lines) > 1 else []


def check_exec(cfg: Config, root: NodeRoot) -> list[Finding]:
    """InPathCheck for each tool of addExecChecks: mandatory ones are errors, the rest warnings."""
    checks = list(EXEC_CHECKS)
    if _version(cfg.cluster.kubernetes_version) < (1, 32):
        checks.insert(0, ("conntrack", True))
    return [Finding(f"FileExisting-{tool}", f"{tool} not found in system path", fatal=mandatory)
            for tool, mandatory in checks if look_path(root, tool) is None]


def _version(text: str) -> tuple[int, int]:
    try:
        major, minor = (int(p) for p in text.lstrip("v").split(".")[:2])
    except ValueError:
        return (0, 0)
    return major, minor


def _file_content(root: NodeRoot, path: str) -> list[Finding]:
    """FileContentCheck{Path, Content: "1"}: the file's first byte must be '1'."""
    name = f"FileContent-{_slug(path)}"
    try:
        head = root.path(path).read_bytes()[:1]
    except OSError:
        return [Finding(name, f"{path} does not exist")]
    return [] if head == b"1" else [Finding(name, f"{path} contents are not set to 1")]


def check_forwarding(cfg: Config, root: NodeRoot) -> list[Finding]:
    """addIPv4Checks / addIPv6Checks, for the families of the subnets and the advertise address."""
    families = {cfg.advertise_ip.version}
    for cidr in (cfg.cluster.service_subnet + "," + cfg.cluster.pod_subnet).split(","):
        if cidr.strip():
            families.add(6 if ":" in cidr else 4)
    found: list[Finding] = []
    if 4 in families:
        found += _file_content(root, IPV4_FORWARD)
    if 6 in families:
        found += _file_content(root, IPV6_FORWARD)
    return found


def check_etcd(cfg: Config, root: NodeRoot) -> list[Finding]:
    """For a local etcd: its two ports, and DirAvailableCheck on its data dir (absent or empty)."""
    found = _port_check(ETCD_CLIENT_PORT) + _port_check(ETCD_PEER_PORT)
    data_dir = cfg.cluster.etcd_data_dir
    path = root.path(data_dir)
    if path.is_dir() and any(path.iterdir()):
        found.append(Finding(f"DirAvailable-{_slug(data_dir)}", f"{data_dir} is not empty"))
    return found


def check_cri(cfg: Config, root: NodeRoot) -> list[Finding]:
    path = cfg.init.cri_socket.removeprefix("unix://")
    # Like the kubelet stand-in: the runtime (the Docker Engine) lives outside the node root, so a socket
    # that is not under the root is looked up as the host path.
    if root.path(path).exists() or Path(path).exists():
        return []
    return [Finding("CRI", f'container runtime is not running: validate CRI v1 runtime API for endpoint '
                           f'"{cfg.init.cri_socket}": {path}: no such file or directory')]


def run_preflight(cfg: Config, root: NodeRoot, ignored: set[str], out: Callable[[str], None]) -> None:
    """Run the checks; raise PhaseError("preflight") listing fatal ones, print the ignored ones."""
    out("[preflight] Running pre-flight checks")
    # InitNodeChecks' order; HTTPProxy, SystemVerification, Hostname, KubeletVersion, Service-Kubelet and
    # Firewalld are not simulated (docs/simnode.md).
    findings = check_machine(cfg, root) + check_ports(cfg) + check_manifests(root) + check_cri(cfg, root)
    findings += check_swap(root) + check_exec(cfg, root)
    findings += _port_check(KUBELET_PORT)
    findings += check_forwarding(cfg, root) + check_etcd(cfg, root)
    ignore_all = "all" in ignored
    errors: list[str] = []
    for f in findings:
        if f.fatal and not ignore_all and f.name.lower() not in ignored:
            errors.append(f"\t[ERROR {f.name}]: {f.message}")
        else:
            out(f"\t[WARNING {f.name}]: {f.message}")
    if errors:
        raise PhaseError(
            "preflight",
            "[preflight] Some fatal errors occurred:\n" + "\n".join(errors) + "\n[preflight] If you know what "
            "you are doing, you can make a check non-fatal with `--ignore-preflight-errors=...`",
        )
