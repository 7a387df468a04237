"""Service settings: read once from TOML at start, validated, then frozen.

Every error names the key it is about (`mqtt.broker: ...`), so a bad file is fixed in one go. Command-line
flags override the file (`with_overrides`). Nothing here touches the disk beyond reading the file.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
import string
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

STEP_NAMES = ("preflight", "certs", "images", "binaries", "network", "kubeadm", "kubelet", "readiness", "addons")
# Used with fullmatch and [0-9]: `$` lets a trailing newline through, `\d` takes any Unicode digit.
_VERSION_RE = re.compile(r"v[0-9]+\.[0-9]+\.[0-9]+")
_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_DNS_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # RFC 1123 label, as apimachinery checks it


class ConfigError(Exception):
    """The configuration is invalid; the message names the key."""


@dataclass(frozen=True)
class MqttConfig:
    broker: str = "mqtt://127.0.0.1:1883"  # mqtt://host[:port] or mqtts://host[:port]
    prefix: str = "lifecycle"
    client_id: str | None = None  # default: "lifecycle-<node>"
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None  # read once at start; wins over `password`
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = 10
    session_expiry_s: int = 86400
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0

    @property
    def host(self) -> str:
        return urlparse(self.broker).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parsed = urlparse(self.broker)
        return parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlparse(self.broker).scheme == "mqtts"


@dataclass(frozen=True)
class VersionImages:
    """Image tags kubeadm uses for one Kubernetes version (what `kubeadm config images list` prints), and the
    versions of the other components the binaries image carries (its tag names them)."""

    etcd: str
    coredns: str
    pause: str
    cni: str = ""  # containernetworking/plugins release, e.g. v1.6.0
    critools: str = ""  # kubernetes-sigs/cri-tools release (crictl), e.g. v1.31.1
    cri_dockerd: str = ""  # Mirantis/cri-dockerd release, e.g. v0.3.16


# Placeholders `kubernetes.binaries_image` may use; anything else in braces is a config error.
BINARIES_IMAGE_FIELDS = ("repo", "version", "cni", "critools", "cri_dockerd")
# The files the service takes from the binaries image, each to the same path under the node root.
DEFAULT_BINARIES: tuple[str, ...] = (
    "/usr/bin/kubeadm", "/usr/bin/kubelet", "/usr/bin/kubectl", "/usr/bin/crictl",
    "/opt/cni/bin/bridge", "/opt/cni/bin/host-local", "/opt/cni/bin/loopback", "/opt/cni/bin/portmap",
)


@dataclass(frozen=True)
class KubernetesConfig:
    version: str = "v1.31.4"  # installed when a request names none
    image_repository: str = "registry.k8s.io"
    # Docker Desktop's image of node binaries; its tags name every component version (see BINARIES_IMAGE_FIELDS).
    binaries_image: str = (
        "docker/desktop-kubernetes:kubernetes-{version}-cni-{cni}-critools-{critools}-cri-dockerd-{cri_dockerd}-1-debian"
    )
    binaries: tuple[str, ...] = DEFAULT_BINARIES  # absolute paths in the image, installed at the same path
    binary_max_bytes: int = 512 * 1024 * 1024
    # The kubelet's log (<root>/var/log/lifecycle/kubelet.log) rotates at this size, keeping this many files in all
    # (kubelet.log, .1, .2): at most 30 MiB on disk by default.
    kubelet_log_max_bytes: int = 10 * 1024 * 1024
    kubelet_log_files: int = 3
    versions: dict[str, VersionImages] = field(default_factory=dict)
    addon_images: tuple[str, ...] = ()  # full references, pulled with the rest
    node_ip: str = "127.0.0.1"  # "": detect at install time (a file without the key); see lifecycle.step.node_ip_of
    endpoint_name: str = "kubernetes.docker.internal"
    api_port: int = 6443  # 0: pick a free port at install time
    kubelet_healthz_port: int = 10248  # 0: pick a free port at install time
    etcd_metrics_port: int = 2381  # kubeadm's default; 0: pick a free port (nodes side by side on one host)
    cri_socket: str = "unix:///var/run/cri-dockerd.sock"
    service_subnet: str = "10.96.0.0/12"
    pod_subnet: str = "10.244.0.0/16"
    dns_domain: str = "cluster.local"
    cluster_name: str = "docker-desktop"
    user_name: str = "docker-desktop"
    context_name: str = "docker-desktop"
    extra_sans: tuple[str, ...] = ()

    def images_for(self, version: str) -> dict[str, str]:
        """component -> image reference, named as kubeadm names them under a custom repository."""
        tags = self.versions[version]
        repo = self.image_repository
        # kubeadm keeps CoreDNS under its own sub-path only in the default repository (registry.k8s.io/coredns/coredns).
        coredns_repo = f"{repo}/coredns" if repo == "registry.k8s.io" else repo
        return {
            "kube-apiserver": f"{repo}/kube-apiserver:{version}",
            "kube-controller-manager": f"{repo}/kube-controller-manager:{version}",
            "kube-scheduler": f"{repo}/kube-scheduler:{version}",
            "kube-proxy": f"{repo}/kube-proxy:{version}",
            "etcd": f"{repo}/etcd:{tags.etcd}",
            "coredns": f"{coredns_repo}/coredns:{tags.coredns}",
            "pause": f"{repo}/pause:{tags.pause}",
        }

    def binaries_image_for(self, version: str) -> str:
        """The template filled for `version`; a placeholder the version lacks a value for stays visible."""
        tags = self.versions.get(version)
        values = {
            "repo": self.image_repository,
            "version": version,
            "cni": tags.cni if tags else "",
            "critools": tags.critools if tags else "",
            "cri_dockerd": tags.cri_dockerd if tags else "",
        }
        out = self.binaries_image
        for key, value in values.items():
            if value:
                out = out.replace(f"{{{key}}}", value)
        return out


@dataclass(frozen=True)
class PkiConfig:
    key_algorithm: str = "ecdsa-p256"  # or "rsa-2048"
    cert_validity_days: float = 365  # fractions allowed: tests use lifetimes of minutes
    ca_validity_days: float = 3650
    expiry_warning_days: tuple[float, ...] = (90, 30, 7)  # lifecycle.certs.expiring once per threshold crossed
    renew_before_days: float = 30  # automatic renewal this long before the earliest leaf expiry; 0 disables
    check_interval_s: float = 3600  # longest wait between expiry checks (they also wake at each due time)


@dataclass(frozen=True)
class DockerConfig:
    host: str = "unix:///var/run/docker.sock"
    pull_concurrency: int = 3


@dataclass(frozen=True)
class StepPolicy:
    """Deadline covering all attempts of one step, and how often it may be retried."""

    timeout_s: float
    retries: int
    retry_delay_s: float = 1.0


DEFAULT_STEP_POLICIES: dict[str, StepPolicy] = {
    "preflight": StepPolicy(timeout_s=30, retries=0),
    "certs": StepPolicy(timeout_s=60, retries=0),
    "images": StepPolicy(timeout_s=1800, retries=3, retry_delay_s=2.0),
    "binaries": StepPolicy(timeout_s=300, retries=2),
    "network": StepPolicy(timeout_s=30, retries=1),
    "kubeadm": StepPolicy(timeout_s=300, retries=1, retry_delay_s=2.0),
    "kubelet": StepPolicy(timeout_s=120, retries=2),
    "readiness": StepPolicy(timeout_s=600, retries=0),
    "addons": StepPolicy(timeout_s=300, retries=2),
}

# What a `[steps.upgrade_*]` table overrides: the upgrade steps' own defaults (states/upgrade_*.py, which the engine
# uses when the table is absent).
UPGRADE_STEP_POLICIES: dict[str, StepPolicy] = {
    "upgrade_images": StepPolicy(timeout_s=1800, retries=3),
    "upgrade_binaries": StepPolicy(timeout_s=300, retries=2),
    "upgrade_plan": StepPolicy(timeout_s=60, retries=1),
    "upgrade_apply": StepPolicy(timeout_s=600, retries=0),
    "upgrade_kubelet": StepPolicy(timeout_s=180, retries=1),
    "upgrade_readiness": StepPolicy(timeout_s=300, retries=0),
}


@dataclass(frozen=True)
class ReadinessConfig:
    components: tuple[str, ...] = ("kube-apiserver", "kube-controller-manager", "coredns")


@dataclass(frozen=True)
class AddonsConfig:
    manifests_dir: Path = Path("/usr/share/lifecycle/addons")
    # deploy/addons/local-path-storage.yaml: ${STORAGE_PROVISIONER_IMAGE} and ${STORAGE_HELPER_IMAGE}; "{repo}"
    # is replaced with kubernetes.image_repository (a mirror keeps upstream's paths under its own host).
    storage_provisioner_image: str = "docker.io/rancher/local-path-provisioner:v0.0.37"
    storage_helper_image: str = "docker.io/library/busybox:1.37.0"

    def images(self, image_repository: str) -> dict[str, str]:
        """Manifest placeholder -> image reference, for the images the addon manifests name."""
        return {
            "STORAGE_PROVISIONER_IMAGE": self.storage_provisioner_image.replace("{repo}", image_repository),
            "STORAGE_HELPER_IMAGE": self.storage_helper_image.replace("{repo}", image_repository),
        }


METRICS_DEFAULT_LISTEN = ("127.0.0.1", 9464)  # 9464: the port Prometheus' registry lists for this exporter kind


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint (`GET /metrics`); None: off, the default (no port opened, nothing imported)."""

    listen: tuple[str, int] | None = None  # (IP literal, port)


@dataclass(frozen=True)
class ExposuresConfig:
    # What the host answers LoadBalancer Services on: written to their status.loadBalancer.ingress (EXTERNAL-IP)
    # and into the exposures message. Docker Desktop's vpnkit-controller writes "localhost".
    host: str = "localhost"


@dataclass(frozen=True)
class Config:
    node_name: str = "docker-desktop"
    root: Path = Path("/")
    log_level: str = "info"
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)
    pki: PkiConfig = field(default_factory=PkiConfig)
    docker: DockerConfig = field(default_factory=DockerConfig)
    steps: dict[str, StepPolicy] = field(default_factory=lambda: dict(DEFAULT_STEP_POLICIES))
    readiness: ReadinessConfig = field(default_factory=ReadinessConfig)
    addons: AddonsConfig = field(default_factory=AddonsConfig)
    exposures: ExposuresConfig = field(default_factory=ExposuresConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def with_overrides(
        self, *, root: Path | None = None, node_name: str | None = None, broker: str | None = None
    ) -> Config:
        cfg = self
        if root is not None:
            cfg = replace(cfg, root=root.resolve())
        if node_name is not None:
            _check_name(node_name, "node.name")
            cfg = replace(cfg, node_name=node_name)
        if broker is not None:
            _check_broker(broker, "mqtt.broker")
            cfg = replace(cfg, mqtt=replace(cfg.mqtt, broker=broker))
        return cfg


# ---- loading -------------------------------------------------------------------------------------------


def _check_name(value: str, key: str) -> None:
    if not _NAME_RE.fullmatch(value) or len(value) > 63:
        raise ConfigError(f"{key}: {value!r} is not a valid node name (lowercase DNS label)")


def _check_broker(value: str, key: str) -> None:
    parsed = urlparse(value)
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise ConfigError(f"{key}: expected mqtt://host[:port] or mqtts://host[:port], got {value!r}")


class _Table:
    """A TOML table read key by key, so every error names its full key and unknown keys are caught."""

    def __init__(self, data: dict[str, Any], prefix: str) -> None:
        self._data = data
        self._prefix = prefix
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self._prefix}{name}"

    def get(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self._seen.add(name)
        if name not in self._data:
            return default
        value = self._data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:  # TOML true is an int to isinstance
            raise ConfigError(f"{self.key(name)}: expected {_kind_name(kind)}, got {value!r}")
        if not isinstance(value, kind):
            raise ConfigError(f"{self.key(name)}: expected {_kind_name(kind)}, got {value!r}")
        return value

    def table(self, name: str) -> _Table:
        raw = self.get(name, dict, {})
        return _Table(raw, f"{self.key(name)}.")

    def names(self) -> list[str]:
        return list(self._data)

    def finish(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a table",
             list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _positive(t: _Table, name: str, default: float, *, allow_zero: bool = False) -> float:
    value = float(t.get(name, (int, float), default))
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{t.key(name)}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


KUBELET_LOG_MIN_BYTES = 64 * 1024  # below this, a burst of kubelet lines would rotate the log several times a second


def _int_between(t: _Table, name: str, default: int, *, low: int, high: int) -> int:
    value = int(t.get(name, int, default))
    if not low <= value <= high:
        raise ConfigError(f"{t.key(name)}: must be an integer in {low}..{high}, got {value}")
    return value


def _port(t: _Table, name: str, default: int) -> int:
    value = int(t.get(name, int, default))
    if not 0 <= value <= 65535:
        raise ConfigError(f"{t.key(name)}: port must be 0..65535 (0 = pick a free one), got {value}")
    return value


def _path(t: _Table, name: str, base: Path) -> Path | None:
    value = t.get(name, str, None)
    if value is None:
        return None
    p = Path(value)
    return p if p.is_absolute() else (base / p).resolve()


def _image_ref(t: _Table, name: str, default: str) -> str:
    value = str(t.get(name, str, default))
    # A reference names a tag or a digest; "latest" by omission would drift under the pinned manifests.
    tail = value.rsplit("/", 1)[-1]
    if not value or any(c.isspace() for c in value) or (":" not in tail and "@" not in value):
        raise ConfigError(f"{t.key(name)}: expected an image reference with a tag or digest, got {value!r}")
    return value


def _str_list(t: _Table, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = t.get(name, list, list(default))
    if not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{t.key(name)}: expected a list of strings")
    return tuple(value)


def _thresholds(t: _Table, name: str, default: tuple[float, ...]) -> tuple[float, ...]:
    """Positive numbers, largest first, each once."""
    value = t.get(name, list, list(default))
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in value):
        raise ConfigError(f"{t.key(name)}: expected a list of numbers > 0 (days), got {value!r}")
    return tuple(sorted({float(v) for v in value}, reverse=True))


def _cidr(t: _Table, name: str, default: str) -> str:
    value = t.get(name, str, default)
    try:
        ipaddress.ip_network(value)
    except ValueError as exc:
        raise ConfigError(f"{t.key(name)}: {exc}") from exc
    return str(value)


def _load_mqtt(t: _Table, base: Path) -> MqttConfig:
    d = MqttConfig()
    broker = t.get("broker", str, d.broker)
    _check_broker(broker, t.key("broker"))
    prefix = t.get("prefix", str, d.prefix)
    if not prefix or any(c in prefix for c in "#+") or prefix.startswith("/") or prefix.endswith("/"):
        raise ConfigError(f"{t.key('prefix')}: {prefix!r} is not a valid topic prefix")
    cfg = MqttConfig(
        broker=broker,
        prefix=prefix,
        client_id=t.get("client_id", str, None),
        username=t.get("username", str, None),
        password=t.get("password", str, None),
        password_file=_path(t, "password_file", base),
        ca_file=_path(t, "ca_file", base),
        cert_file=_path(t, "cert_file", base),
        key_file=_path(t, "key_file", base),
        keepalive_s=int(_positive(t, "keepalive_s", d.keepalive_s)),
        session_expiry_s=int(_positive(t, "session_expiry_s", d.session_expiry_s)),
        reconnect_min_s=_positive(t, "reconnect_min_s", d.reconnect_min_s),
        reconnect_max_s=_positive(t, "reconnect_max_s", d.reconnect_max_s),
    )
    if (cfg.cert_file is None) != (cfg.key_file is None):
        raise ConfigError(f"{t.key('cert_file')}: cert_file and key_file go together")
    t.finish()
    return cfg


def _binaries_image(t: _Table, versions: dict[str, VersionImages], default: str) -> str:
    """The template: only known placeholders, and each version listed has a value for every one it uses."""
    value = str(t.get("binaries_image", str, default))
    try:
        parsed = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(value) if name is not None]
    except ValueError as exc:
        raise ConfigError(f"{t.key('binaries_image')}: {exc} in {value!r}") from exc
    fields = [name for name, _, _ in parsed]
    for name, spec, conv in parsed:
        if spec or conv:
            raise ConfigError(f"{t.key('binaries_image')}: placeholder {{{name}}} takes no conversion or format")
        if name not in BINARIES_IMAGE_FIELDS:
            known = ", ".join(f"{{{f}}}" for f in BINARIES_IMAGE_FIELDS)
            raise ConfigError(f"{t.key('binaries_image')}: unknown placeholder {{{name}}} (known: {known})")
    for version, tags in versions.items():
        for name in fields:
            if name in ("cni", "critools", "cri_dockerd") and not getattr(tags, name):
                raise ConfigError(
                    f"{t.key('versions')}.\"{version}\".{name}: missing (kubernetes.binaries_image uses {{{name}}})"
                )
    return value


def _image_paths(t: _Table, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """Absolute, normalised paths inside an image, each once: they are also where the files go on the node."""
    paths = _str_list(t, name, default)
    if not paths:
        raise ConfigError(f"{t.key(name)}: at least one path is needed")
    for path in paths:
        hint = f" (did you mean /usr/bin/{path}?)" if "/" not in path else ""
        if not path.startswith("/"):
            raise ConfigError(f"{t.key(name)}: {path!r} is not an absolute path{hint}")
        if ".." in path.split("/") or posixpath.normpath(path) != path or path == "/":
            raise ConfigError(f"{t.key(name)}: {path!r} is not a normalised path to a file (no '..', '.', '//')")
    duplicates = sorted({p for p in paths if paths.count(p) > 1})
    if duplicates:
        raise ConfigError(f"{t.key(name)}: {duplicates[0]!r} is listed twice")
    return paths


def _load_kubernetes(t: _Table) -> KubernetesConfig:
    d = KubernetesConfig()
    versions: dict[str, VersionImages] = {}
    vt = t.table("versions")
    for version in vt.names():
        if not _VERSION_RE.fullmatch(version):
            raise ConfigError(f"{vt.key(version)}: version must look like v1.31.4")
        one = vt.table(version)
        versions[version] = VersionImages(
            etcd=one.get("etcd", str, ""),
            coredns=one.get("coredns", str, ""),
            pause=one.get("pause", str, ""),
            cni=one.get("cni", str, ""),
            critools=one.get("critools", str, ""),
            cri_dockerd=one.get("cri_dockerd", str, ""),
        )
        for tag_key in ("etcd", "coredns", "pause"):
            if not getattr(versions[version], tag_key):
                raise ConfigError(f"{one.key(tag_key)}: missing image tag")
        one.finish()
    vt.finish()
    if not versions:
        raise ConfigError(f"{t.key('versions')}: at least one Kubernetes version must be listed")
    version = t.get("version", str, d.version)
    if version not in versions:
        known = sorted(versions)
        raise ConfigError(f"{t.key('version')}: {version!r} is not among kubernetes.versions {known}")
    node_ip = t.get("node_ip", str, "")  # absent: detected at install time (the default route's interface)
    try:
        if node_ip:
            ipaddress.ip_address(node_ip)
    except ValueError as exc:
        raise ConfigError(f"{t.key('node_ip')}: {exc}") from exc
    cri = t.get("cri_socket", str, d.cri_socket)
    if not cri.startswith("unix:///"):
        raise ConfigError(f"{t.key('cri_socket')}: expected unix:///path, got {cri!r}")
    cfg = KubernetesConfig(
        version=version,
        image_repository=t.get("image_repository", str, d.image_repository).rstrip("/"),
        binaries_image=_binaries_image(t, versions, d.binaries_image),
        binaries=_image_paths(t, "binaries", d.binaries),
        binary_max_bytes=int(_positive(t, "binary_max_bytes", d.binary_max_bytes)),
        kubelet_log_max_bytes=_int_between(t, "kubelet_log_max_bytes", d.kubelet_log_max_bytes,
                                           low=KUBELET_LOG_MIN_BYTES, high=2**40),
        kubelet_log_files=_int_between(t, "kubelet_log_files", d.kubelet_log_files, low=1, high=100),
        versions=versions,
        addon_images=_str_list(t, "addon_images", d.addon_images),
        node_ip=node_ip,
        endpoint_name=t.get("endpoint_name", str, d.endpoint_name),
        api_port=_port(t, "api_port", d.api_port),
        kubelet_healthz_port=_port(t, "kubelet_healthz_port", d.kubelet_healthz_port),
        etcd_metrics_port=_port(t, "etcd_metrics_port", d.etcd_metrics_port),
        cri_socket=cri,
        service_subnet=_cidr(t, "service_subnet", d.service_subnet),
        pod_subnet=_cidr(t, "pod_subnet", d.pod_subnet),
        dns_domain=t.get("dns_domain", str, d.dns_domain),
        cluster_name=t.get("cluster_name", str, d.cluster_name),
        user_name=t.get("user_name", str, d.user_name),
        context_name=t.get("context_name", str, d.context_name),
        extra_sans=_str_list(t, "extra_sans", d.extra_sans),
    )
    if ipaddress.ip_network(cfg.service_subnet).overlaps(ipaddress.ip_network(cfg.pod_subnet)):
        raise ConfigError(f"{t.key('pod_subnet')}: overlaps kubernetes.service_subnet")
    t.finish()
    return cfg


def parse_listen(value: str, key: str) -> tuple[str, int]:
    """`host:port` with an IP literal (`[v6]:port` for IPv6) or `localhost`: an address the service binds to as
    given, never a name resolved at start (which could silently pick a public interface)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isascii() or not port_text.isdigit():
        raise ConfigError(f"{key}: expected host:port (e.g. 127.0.0.1:9464 or [::1]:9464), got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"{key}: an IPv6 address goes in brackets ([::1]:9464), got {value!r}")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{key}: {host!r} is not an IP address (or localhost), in {value!r}") from None
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ConfigError(f"{key}: port must be 1..65535, got {port}")
    return host, port


def _load_metrics(t: _Table) -> MetricsConfig:
    enabled = t.get("enabled", bool, None)
    listen_text = t.get("listen", str, None)
    t.finish()
    if enabled is False or (enabled is None and listen_text is None):
        return MetricsConfig()
    listen = parse_listen(listen_text, t.key("listen")) if listen_text is not None else METRICS_DEFAULT_LISTEN
    return MetricsConfig(listen=listen)


def load_client_config(path: Path) -> tuple[MqttConfig, str]:
    """What a client (the CLI, a host backend) needs: `[mqtt]` (checked as for the service) and `node.name`.
    Other tables are ignored, so a host-side file needs no more than these two, and the service's file works too."""
    raw = _read_toml(path)
    node = _Table(raw, "").table("node")
    name = node.get("name", str, Config.node_name)
    _check_name(name, node.key("name"))
    return _load_mqtt(_Table(raw, "").table("mqtt"), path.resolve().parent), name


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def load_config(path: Path) -> Config:
    """Read and validate a TOML config file. Relative paths in it are relative to the file."""
    raw = _read_toml(path)
    base = path.resolve().parent
    top = _Table(raw, "")
    node = top.table("node")
    name = node.get("name", str, Config.node_name)
    _check_name(name, node.key("name"))
    root = Path(node.get("root", str, "/"))
    if not root.is_absolute():
        root = (base / root).resolve()
    log_level = node.get("log_level", str, "info")
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{node.key('log_level')}: expected debug, info, warning or error")
    node.finish()

    mqtt = _load_mqtt(top.table("mqtt"), base)
    kubernetes = _load_kubernetes(top.table("kubernetes"))

    pt = top.table("pki")
    algorithm = pt.get("key_algorithm", str, PkiConfig.key_algorithm)
    if algorithm not in ("ecdsa-p256", "rsa-2048"):
        raise ConfigError(f"{pt.key('key_algorithm')}: expected ecdsa-p256 or rsa-2048, got {algorithm!r}")
    pki = PkiConfig(
        key_algorithm=algorithm,
        cert_validity_days=_positive(pt, "cert_validity_days", PkiConfig.cert_validity_days),
        ca_validity_days=_positive(pt, "ca_validity_days", PkiConfig.ca_validity_days),
        expiry_warning_days=_thresholds(pt, "expiry_warning_days", PkiConfig.expiry_warning_days),
        renew_before_days=_positive(pt, "renew_before_days", PkiConfig.renew_before_days, allow_zero=True),
        check_interval_s=_positive(pt, "check_interval_s", PkiConfig.check_interval_s),
    )
    if pki.renew_before_days >= pki.cert_validity_days:
        # A fresh certificate would already be due: renewal after renewal.
        raise ConfigError(f"{pt.key('renew_before_days')}: must be less than pki.cert_validity_days "
                          f"({pki.cert_validity_days:g}), got {pki.renew_before_days:g}")
    pt.finish()

    dt = top.table("docker")
    docker = DockerConfig(
        host=dt.get("host", str, DockerConfig.host),
        pull_concurrency=int(_positive(dt, "pull_concurrency", DockerConfig.pull_concurrency)),
    )
    if not docker.host.startswith(("unix://", "tcp://")):
        raise ConfigError(f"{dt.key('host')}: expected unix:///path or tcp://host:port")
    dt.finish()

    steps = dict(DEFAULT_STEP_POLICIES)
    st = top.table("steps")
    for step_name in st.names():
        if step_name not in STEP_NAMES and step_name not in UPGRADE_STEP_POLICIES:
            known = ", ".join((*STEP_NAMES, *UPGRADE_STEP_POLICIES))
            raise ConfigError(f"{st.key(step_name)}: unknown step (known: {known})")
        one = st.table(step_name)
        base_policy = steps.get(step_name) or UPGRADE_STEP_POLICIES[step_name]
        steps[step_name] = StepPolicy(
            timeout_s=_positive(one, "timeout_s", base_policy.timeout_s),
            retries=int(_positive(one, "retries", base_policy.retries, allow_zero=True)),
            retry_delay_s=_positive(one, "retry_delay_s", base_policy.retry_delay_s, allow_zero=True),
        )
        one.finish()
    st.finish()

    rt = top.table("readiness")
    readiness = ReadinessConfig(components=_str_list(rt, "components", ReadinessConfig.components))
    rt.finish()
    at = top.table("addons")
    addons = AddonsConfig(
        manifests_dir=_path(at, "manifests_dir", base) or AddonsConfig.manifests_dir,
        storage_provisioner_image=_image_ref(at, "storage_provisioner_image", AddonsConfig.storage_provisioner_image),
        storage_helper_image=_image_ref(at, "storage_helper_image", AddonsConfig.storage_helper_image),
    )
    at.finish()
    et = top.table("exposures")
    exposures = ExposuresConfig(host=_ingress_host(et, "host", ExposuresConfig.host))
    et.finish()
    metrics = _load_metrics(top.table("metrics"))
    top.finish()
    return Config(
        node_name=name, root=root, log_level=log_level, mqtt=mqtt, kubernetes=kubernetes, pki=pki,
        docker=docker, steps=steps, readiness=readiness, addons=addons, exposures=exposures, metrics=metrics,
    )


def _ingress_host(t: _Table, name: str, default: str) -> str:
    """A DNS name, as the API server takes it in status.loadBalancer.ingress[].hostname (an IP address goes in
    `ip` there, which the host side has no use for: it answers on its own names)."""
    value: str = t.get(name, str, default)
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        raise ConfigError(f"{t.key(name)}: {value!r} is an IP address; expected a host name such as localhost")
    if len(value) > 253 or not all(_DNS_LABEL_RE.fullmatch(label) for label in value.split(".")):
        raise ConfigError(f"{t.key(name)}: {value!r} is not a DNS name (lowercase labels of a-z, 0-9 and '-')")
    return value
