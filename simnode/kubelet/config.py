"""Command-line flags and the KubeletConfiguration file of the kubelet stand-in (parsing only, no I/O
beyond reading the config file). Flag syntax follows the real kubelet (pflag): `--f=v`, `--f v`, `--b`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from simnode.paths import NodeRoot

CONFIG_API_VERSION = "kubelet.config.k8s.io/v1beta1"
DEFAULT_RUNTIME_ENDPOINT = "unix:///run/containerd/containerd.sock"  # the real kubelet's default

# Flags we act on (all take a value).
USED_FLAGS = {
    "config", "kubeconfig", "bootstrap-kubeconfig", "node-ip", "hostname-override",
    "container-runtime-endpoint", "pod-infra-container-image", "root-dir", "v", "pod-manifest-path", "cert-dir",
}
# Real kubelet flags that take a value and are accepted but have no effect here.
IGNORED_VALUE_FLAGS = {
    "cgroup-driver", "cgroup-root", "client-ca-file", "cloud-provider", "cluster-dns",
    "cluster-domain", "container-log-max-files", "container-log-max-size", "eviction-hard",
    "eviction-soft", "feature-gates", "image-gc-high-threshold", "image-gc-low-threshold",
    "image-service-endpoint", "kube-reserved", "log-flush-frequency", "max-pods", "node-labels",
    "node-status-update-frequency", "pod-cidr", "provider-id", "read-only-port", "register-with-taints",
    "resolv-conf", "runtime-cgroups", "runtime-request-timeout", "system-reserved", "tls-cert-file",
    "tls-private-key-file", "tls-cipher-suites", "tls-min-version", "volume-plugin-dir",
    "authorization-mode", "address", "port", "healthz-port", "healthz-bind-address", "vmodule",
    "kubelet-cgroups", "system-cgroups", "enforce-node-allocatable", "seccomp-default",
}
# Real boolean flags: `--flag` or `--flag=true|false`, never `--flag value`.
IGNORED_BOOL_FLAGS = {
    "fail-swap-on", "register-node", "rotate-certificates", "rotate-server-certificates",
    "anonymous-auth", "logtostderr", "alsologtostderr", "serialize-image-pulls",
    "cgroups-per-qos", "protect-kernel-defaults", "make-iptables-util-chains", "help",
}


class KubeletConfigError(Exception):
    """A flag or the KubeletConfiguration file is not usable; the message names the cause."""


@dataclass
class KubeletFlags:
    values: dict[str, str] = field(default_factory=dict)
    help: bool = False
    fail_swap_on: bool | None = None  # --fail-swap-on; None: the config file's failSwapOn

    def get(self, name: str) -> str | None:
        value = self.values.get(name)
        return value if value else None

    @property
    def verbosity(self) -> int:
        return int(self.values.get("v", "0"))


def parse_flags(argv: list[str]) -> KubeletFlags:
    """Parse kubelet flags; unknown flags, missing values and stray arguments are errors."""
    flags = KubeletFlags()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg.startswith("--"):
            body = arg[2:]
        elif arg.startswith("-") and len(arg) > 1:
            body = arg[1:]  # pflag accepts single-dash long flags for kubelet's klog flags (-v=2)
        else:
            raise KubeletConfigError(f"unexpected argument {arg!r}: the kubelet takes only flags")
        name, eq, value = body.partition("=")
        if not name:
            raise KubeletConfigError(f"malformed flag {arg!r}")
        if name in IGNORED_BOOL_FLAGS:
            if eq and value.lower() not in ("true", "false", "1", "0"):
                raise KubeletConfigError(f"invalid value {value!r} for boolean flag --{name}")
            if name == "help":
                flags.help = True
            if name == "fail-swap-on":
                flags.fail_swap_on = not eq or value.lower() in ("true", "1")
            continue
        if name not in USED_FLAGS and name not in IGNORED_VALUE_FLAGS:
            raise KubeletConfigError(f"unknown flag: --{name}")
        if not eq:
            if i >= len(argv) or argv[i].startswith("--"):
                raise KubeletConfigError(f"flag needs an argument: --{name}")
            value = argv[i]
            i += 1
        if name in USED_FLAGS:
            flags.values[name] = value
    _check_flag_values(flags)
    return flags


def _check_flag_values(flags: KubeletFlags) -> None:
    v = flags.values.get("v", "0")
    if not v.isdigit():
        raise KubeletConfigError(f"invalid value {v!r} for --v: expected a non-negative integer")
    node_ip = flags.get("node-ip")
    if node_ip is not None:
        for part in node_ip.split(","):
            try:
                ipaddress.ip_address(part)
            except ValueError as exc:
                raise KubeletConfigError(f"invalid --node-ip {node_ip!r}: {part!r} is not an IP address") from exc
    endpoint = flags.get("container-runtime-endpoint")
    if endpoint is not None and not (endpoint.startswith("unix://") or endpoint.startswith("/")):
        raise KubeletConfigError(
            f"unsupported --container-runtime-endpoint {endpoint!r}: expected unix:///path/to/socket"
        )


@dataclass(frozen=True)
class KubeletConfig:
    static_pod_path: str = "/etc/kubernetes/manifests"
    healthz_port: int = 10248
    healthz_bind_address: str = "127.0.0.1"
    cluster_dns: tuple[str, ...] = ()
    cluster_domain: str = "cluster.local"
    runtime_endpoint: str | None = None
    pod_cidr: str | None = None
    rotate_certificates: bool = False  # KubeletConfiguration v1beta1 default; kubeadm writes true
    fail_swap_on: bool = True  # failSwapOn: the real kubelet's default
    cgroup_driver: str = "cgroupfs"  # kubelet pkg/kubelet/apis/config/v1beta1/defaults.go: "" -> cgroupfs


def _typed(raw: dict[str, Any], key: str, kind: type, default: Any, path: Path) -> Any:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise KubeletConfigError(f"{path}: {key} must be a {kind.__name__}, got {value!r}")
    return value


def load_config(path: Path | None) -> KubeletConfig:
    """Read a KubeletConfiguration file (None -> the real kubelet's defaults)."""
    if path is None:
        return KubeletConfig()
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise KubeletConfigError(f"failed to load kubelet config file {path}: no such file") from exc
    except OSError as exc:
        raise KubeletConfigError(f"failed to load kubelet config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise KubeletConfigError(f"failed to load kubelet config file {path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise KubeletConfigError(f"{path}: expected a KubeletConfiguration object")
    if raw.get("kind") != "KubeletConfiguration" or raw.get("apiVersion") != CONFIG_API_VERSION:
        raise KubeletConfigError(
            f"{path}: expected kind KubeletConfiguration, apiVersion {CONFIG_API_VERSION}; "
            f"got kind {raw.get('kind')!r}, apiVersion {raw.get('apiVersion')!r}"
        )
    port = _typed(raw, "healthzPort", int, 10248, path)
    if not 0 <= port <= 65535:
        raise KubeletConfigError(f"{path}: healthzPort {port} is not a port number")
    address = _typed(raw, "healthzBindAddress", str, "127.0.0.1", path)
    try:
        ipaddress.ip_address(address)
    except ValueError as exc:
        raise KubeletConfigError(f"{path}: healthzBindAddress {address!r} is not an IP address") from exc
    dns = _typed(raw, "clusterDNS", list, [], path)
    if not all(isinstance(d, str) for d in dns):
        raise KubeletConfigError(f"{path}: clusterDNS must be a list of IP addresses")
    return KubeletConfig(
        static_pod_path=_typed(raw, "staticPodPath", str, "/etc/kubernetes/manifests", path),
        healthz_port=port,
        healthz_bind_address=address,
        cluster_dns=tuple(dns),
        cluster_domain=_typed(raw, "clusterDomain", str, "cluster.local", path),
        runtime_endpoint=_typed(raw, "containerRuntimeEndpoint", str, None, path),
        pod_cidr=_typed(raw, "podCIDR", str, None, path),
        rotate_certificates=_typed(raw, "rotateCertificates", bool, False, path),
        fail_swap_on=_typed(raw, "failSwapOn", bool, True, path),
        cgroup_driver=_cgroup_driver(_typed(raw, "cgroupDriver", str, "cgroupfs", path), path),
    )


def _cgroup_driver(value: str, path: Path) -> str:
    # kubelet pkg/kubelet/apis/config/validation/validation.go: only these two (kubeadm says the same).
    if value not in ("cgroupfs", "systemd"):
        raise KubeletConfigError(f'{path}: cgroupDriver: Unsupported value: "{value}": supported values: '
                                 '"cgroupfs", "systemd"')
    return value


@dataclass(frozen=True)
class Settings:
    """Everything the kubelet needs, paths already re-rooted."""

    root: NodeRoot
    config: KubeletConfig
    kubeconfig: Path | None
    bootstrap_kubeconfig: Path | None
    manifest_dir: Path
    runtime_socket: Path
    runtime_endpoint: str
    node_ip: str | None
    hostname_override: str | None
    verbosity: int
    cert_dir: str = "/var/lib/kubelet/pki"  # --cert-dir (real path; the client certificate store lives here)
    fail_swap_on: bool = True
    cgroup_driver: str = "cgroupfs"  # --cgroup-driver (deprecated flag) over the config's cgroupDriver


def runtime_socket(root: NodeRoot, endpoint: str) -> Path:
    """The Docker socket of a `unix://` endpoint. The runtime lives outside the node root, so a real
    path that does not exist under the root is used as is."""
    raw = endpoint.removeprefix("unix://")
    rooted = root.path(raw)
    return rooted if rooted.exists() else Path(raw)


def settings(argv: list[str], root: NodeRoot) -> Settings:
    flags = parse_flags(argv)
    config_flag = flags.get("config")
    config = load_config(root.path(config_flag) if config_flag else None)
    endpoint = flags.get("container-runtime-endpoint") or config.runtime_endpoint or DEFAULT_RUNTIME_ENDPOINT
    kubeconfig = flags.get("kubeconfig")
    bootstrap = flags.get("bootstrap-kubeconfig")
    manifests = flags.get("pod-manifest-path") or config.static_pod_path
    return Settings(
        root=root,
        config=config,
        kubeconfig=root.path(kubeconfig) if kubeconfig else None,
        bootstrap_kubeconfig=root.path(bootstrap) if bootstrap else None,
        manifest_dir=root.path(manifests),
        runtime_socket=runtime_socket(root, endpoint),
        runtime_endpoint=endpoint,
        node_ip=(flags.get("node-ip") or "").split(",")[0] or None,
        hostname_override=flags.get("hostname-override"),
        verbosity=flags.verbosity,
        cert_dir=flags.get("cert-dir") or "/var/lib/kubelet/pki",
        fail_swap_on=config.fail_swap_on if flags.fail_swap_on is None else flags.fail_swap_on,
        cgroup_driver=_cgroup_driver(flags.get("cgroup-driver") or config.cgroup_driver, Path("--cgroup-driver")),
    )
