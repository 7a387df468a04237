"""Field-by-field defaulting and validation of the kubeadm kinds (already type-checked by `schema`).

Problems are appended to `errors` in Kubernetes field-error style (`path: Invalid value: "x": why`).
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import string
from pathlib import PurePosixPath
from typing import Any

from simnode.kubeadm.config import (
    CONTROL_PLANE_TAINT_KEY,
    DEFAULT_DNS_DOMAIN,
    ENCRYPTION_ALGORITHMS,
    BootstrapToken,
    ClusterConfig,
    Config,
    InitConfig,
    Taint,
)
from simnode.kubeadm.values import (
    is_dns_subdomain,
    is_ip,
    is_wildcard_dns,
    parse_cidrs,
    parse_duration_s,
    split_host_port,
)

_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)$")
_TOKEN = re.compile(r"^([a-z0-9]{6})\.([a-z0-9]{16})$")
_TOKEN_GROUP = re.compile(r"^system:bootstrappers:[a-z0-9:-]{0,255}[a-z0-9]$")
_TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
_TOKEN_USAGES = ("signing", "authentication")


def get(doc: dict[str, Any], dotted: str, default: Any = None) -> Any:
    cur: Any = doc
    for part in dotted.split("."):
        if not isinstance(cur, dict) or cur.get(part) is None:
            return default
        cur = cur[part]
    return cur


def invalid(path: str, value: Any, why: str) -> str:
    shown = f'"{value}"' if isinstance(value, str) else str(value)
    return f"{path}: Invalid value: {shown}: {why}"


def extra_args(doc: dict[str, Any], dotted: str, errors: list[str]) -> list[tuple[str, str]]:
    """v1beta3 map or v1beta4 list of {name, value} -> ordered (name, value) pairs."""
    raw = get(doc, dotted)
    if raw is None:
        return []
    if isinstance(raw, dict):
        return [(str(k), str(v)) for k, v in sorted(raw.items())]
    out: list[tuple[str, str]] = []
    for i, item in enumerate(raw):
        name = item.get("name") if isinstance(item, dict) else None
        if not name:
            errors.append(f"{dotted}[{i}].name: Required value: argument name must not be empty")
            continue
        out.append((str(name), str(item.get("value") or "")))
    return out


def duration(doc: dict[str, Any], dotted: str, default_s: float, errors: list[str]) -> float:
    raw = get(doc, dotted)
    if raw is None:
        return default_s
    try:
        value = parse_duration_s(str(raw))
    except ValueError as exc:
        errors.append(invalid(dotted, raw, str(exc)))
        return default_s
    if value <= 0:
        errors.append(invalid(dotted, raw, "must be a positive duration"))
    return value


def _port(path: str, value: int, errors: list[str]) -> None:
    if not 1 <= value <= 65535:
        errors.append(invalid(path, value, "port number must be between 1 and 65535, inclusive"))


def _taints(doc: dict[str, Any], errors: list[str]) -> list[Taint]:
    raw = get(doc, "nodeRegistration.taints")
    node_reg = doc.get("nodeRegistration") or {}
    if raw is None and "taints" not in node_reg:
        return [Taint(key=CONTROL_PLANE_TAINT_KEY, effect="NoSchedule")]
    out: list[Taint] = []
    for i, item in enumerate(raw or []):
        key, effect = item.get("key") or "", item.get("effect") or ""
        path = f"nodeRegistration.taints[{i}]"
        if not key:
            errors.append(f"{path}.key: Required value")
        elif not re.match(r"^([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$", key):
            errors.append(invalid(f"{path}.key", key, "name part must consist of alphanumeric characters"))
        if effect not in _TAINT_EFFECTS:
            supported = ", ".join(f'"{e}"' for e in _TAINT_EFFECTS)
            errors.append(f'{path}.effect: Unsupported value: "{effect}": supported values: {supported}')
        out.append(Taint(key=key, effect=effect, value=str(item.get("value") or "")))
    return out


def _new_token() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(6)) + "." + "".join(
        secrets.choice(alphabet) for _ in range(16)
    )


def _tokens(doc: dict[str, Any], errors: list[str]) -> list[BootstrapToken]:
    raw = doc.get("bootstrapTokens")
    if raw is None:
        return [BootstrapToken(token=_new_token(), description="")]
    out: list[BootstrapToken] = []
    for i, item in enumerate(raw):
        path = f"bootstrapTokens[{i}]"
        token = item.get("token") or _new_token()
        if not _TOKEN.match(token):
            errors.append(
                invalid(f"{path}.token", token, 'the bootstrap token was not of the form "[a-z0-9]{6}.[a-z0-9]{16}"')
            )
        usages = tuple(item.get("usages") or ("signing", "authentication"))
        for usage in usages:
            if usage not in _TOKEN_USAGES:
                errors.append(invalid(f"{path}.usages", usage, f"valid usages are {list(_TOKEN_USAGES)}"))
        groups = tuple(item.get("groups") or ("system:bootstrappers:kubeadm:default-node-token",))
        for group in groups:
            if not _TOKEN_GROUP.match(group):
                errors.append(invalid(f"{path}.groups", group, "must match system:bootstrappers:[a-z0-9:-]"))
        ttl_s = duration(item, "ttl", 24 * 3600.0, errors)
        out.append(
            BootstrapToken(
                token=token,
                description=str(item.get("description") or ""),
                ttl_s=ttl_s,
                expires=item.get("expires"),
                usages=usages,
                groups=groups,
            )
        )
    return out


def build_init(doc: dict[str, Any], api_version: str, hostname: str, errors: list[str]) -> InitConfig:
    v1beta4 = api_version.endswith("/v1beta4")
    address = get(doc, "localAPIEndpoint.advertiseAddress", "")
    if not address:
        errors.append(
            "localAPIEndpoint.advertiseAddress: Required value: the simulated node has no default route to "
            "pick an address from; set the IP the API server advertises"
        )
    elif not is_ip(address):
        errors.append(
            invalid(
                "localAPIEndpoint.advertiseAddress",
                address,
                f'couldn\'t use "{address}" as "apiserver-advertise-address", must be ipv4 or ipv6 address',
            )
        )
    elif ipaddress.ip_address(address).is_unspecified or ipaddress.ip_address(address).is_multicast:
        errors.append(invalid("localAPIEndpoint.advertiseAddress", address, "must be a unicast host address"))
    bind_port = int(get(doc, "localAPIEndpoint.bindPort", 6443))
    _port("localAPIEndpoint.bindPort", bind_port, errors)
    name = get(doc, "nodeRegistration.name") or hostname
    if not is_dns_subdomain(name):
        errors.append(
            invalid("nodeRegistration.name", name, "a lowercase RFC 1123 subdomain must consist of lower case "
                    "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character")
        )
    # Empty when not given: the command detects it on the node (simnode/kubeadm/crisocket.py, as kubeadm's
    # SetNodeRegistrationDynamicDefaults calls DetectCRISocket), which needs the node root this module lacks.
    cri = get(doc, "nodeRegistration.criSocket") or ""
    if cri and not cri.startswith("unix:///"):
        errors.append(invalid("nodeRegistration.criSocket", cri, 'must be a URL of the form "unix:///path/to.sock"'))
    timeouts_s = {"control_plane": 240.0, "kubelet": 240.0, "api_call": 60.0}
    if v1beta4:  # v1beta3 has no timeouts (its control-plane timeout lives in ClusterConfiguration)
        timeouts_s = {
            "control_plane": duration(doc, "timeouts.controlPlaneComponentHealthCheck", 240.0, errors),
            "kubelet": duration(doc, "timeouts.kubeletHealthCheck", 240.0, errors),
            "api_call": duration(doc, "timeouts.kubernetesAPICall", 60.0, errors),
        }
    return InitConfig(
        api_version=api_version,
        advertise_address=address,
        bind_port=bind_port,
        node_name=name,
        cri_socket=cri,
        taints=_taints(doc, errors),
        kubelet_extra_args=extra_args(doc, "nodeRegistration.kubeletExtraArgs", errors),
        ignore_preflight_errors=list(get(doc, "nodeRegistration.ignorePreflightErrors", [])),
        bootstrap_tokens=_tokens(doc, errors),
        skip_phases=list(doc.get("skipPhases") or []),
        control_plane_timeout_s=timeouts_s["control_plane"],
        kubelet_timeout_s=timeouts_s["kubelet"],
        api_call_timeout_s=timeouts_s["api_call"],
        certificate_key=str(doc.get("certificateKey") or ""),
    )


def check_version(raw: str, allowed: tuple[str, ...], errors: list[str]) -> str:
    m = _VERSION.match(raw)
    if not m:
        errors.append(invalid("kubernetesVersion", raw, 'must be a version of the form "vX.Y.Z" (version labels '
                              "like stable-1 need the internet, which the simulated node has not)"))
        return raw
    version = "v" + ".".join(m.groups())
    if version not in allowed:
        errors.append(
            invalid("kubernetesVersion", raw, f"this kubeadm can only install {', '.join(allowed)}")
        )
    return version


def _absolute(path: str, value: str, errors: list[str]) -> None:
    if not PurePosixPath(value).is_absolute():
        errors.append(invalid(path, value, "must be an absolute path"))


def _sans(path: str, sans: list[str], errors: list[str]) -> None:
    for i, san in enumerate(sans):
        if not (is_ip(san) or is_dns_subdomain(san) or is_wildcard_dns(san)):
            errors.append(invalid(f"{path}[{i}]", san, "altname is not a valid IP address, DNS label or a DNS "
                                  "label with subdomain wildcards"))


def _networking(doc: dict[str, Any], errors: list[str]) -> tuple[str, str, str]:
    service = get(doc, "networking.serviceSubnet") or "10.96.0.0/12"
    pod = get(doc, "networking.podSubnet") or ""
    dns = get(doc, "networking.dnsDomain") or DEFAULT_DNS_DOMAIN
    service_nets = []
    try:
        service_nets = parse_cidrs(service)
        for net in service_nets:
            host_bits = net.max_prefixlen - net.prefixlen
            if host_bits > 20:
                errors.append(invalid("networking.serviceSubnet", service, "specified service subnet is too large; "
                                      f"for {net.max_prefixlen}-bit addresses, the mask must be >= "
                                      f"{net.max_prefixlen - 20}"))
            elif net.num_addresses < 16:
                errors.append(invalid("networking.serviceSubnet", service, "too small: needs room for the "
                                      "API (1st) and DNS (10th) service IPs"))
    except ValueError as exc:
        errors.append(invalid("networking.serviceSubnet", service, str(exc)))
    if pod:
        try:
            for pod_net in parse_cidrs(pod):
                for service_net in service_nets:
                    if pod_net.version == service_net.version and pod_net.overlaps(service_net):
                        errors.append(invalid("networking.podSubnet", pod,
                                              f'must not overlap with serviceSubnet "{service}"'))
        except ValueError as exc:
            errors.append(invalid("networking.podSubnet", pod, str(exc)))
    if not is_dns_subdomain(dns):
        errors.append(invalid("networking.dnsDomain", dns, "must be a lowercase RFC 1123 subdomain"))
    return service, pod, dns


def _endpoint(doc: dict[str, Any], errors: list[str]) -> str:
    endpoint = str(doc.get("controlPlaneEndpoint") or "")
    if endpoint:
        try:
            host, _ = split_host_port(endpoint)
        except ValueError as exc:
            errors.append(invalid("controlPlaneEndpoint", endpoint, str(exc)))
        else:
            if not (is_ip(host) or is_dns_subdomain(host)):
                errors.append(invalid("controlPlaneEndpoint", endpoint, f'"{host}" is not a valid IP or DNS name'))
    return endpoint


def build_cluster(
    doc: dict[str, Any],
    api_version: str,
    errors: list[str],
    *,
    allowed_versions: tuple[str, ...],
    default_version: str,
) -> ClusterConfig:
    version = check_version(str(doc.get("kubernetesVersion") or default_version), allowed_versions, errors)
    service, pod, dns = _networking(doc, errors)
    cert_dir = str(doc.get("certificatesDir") or "/etc/kubernetes/pki")
    _absolute("certificatesDir", cert_dir, errors)
    data_dir = str(get(doc, "etcd.local.dataDir") or "/var/lib/etcd")
    _absolute("etcd.local.dataDir", data_dir, errors)
    if get(doc, "etcd.external") is not None:
        errors.append("etcd.external: Forbidden: the simulated node only runs a local etcd")
    repo = str(doc.get("imageRepository") or "registry.k8s.io").rstrip("/")
    algorithm = str(doc.get("encryptionAlgorithm") or "RSA-2048")
    if algorithm not in ENCRYPTION_ALGORITHMS:
        supported = ", ".join(f'"{a}"' for a in ENCRYPTION_ALGORITHMS)
        errors.append(f'encryptionAlgorithm: Unsupported value: "{algorithm}": supported values: {supported}')
    sans = list(get(doc, "apiServer.certSANs", []))
    _sans("apiServer.certSANs", sans, errors)
    server_sans = list(get(doc, "etcd.local.serverCertSANs", []))
    peer_sans = list(get(doc, "etcd.local.peerCertSANs", []))
    _sans("etcd.local.serverCertSANs", server_sans, errors)
    _sans("etcd.local.peerCertSANs", peer_sans, errors)
    cluster = ClusterConfig(
        api_version=api_version,
        kubernetes_version=version,
        control_plane_endpoint=_endpoint(doc, errors),
        certificates_dir=cert_dir,
        image_repository=repo,
        cluster_name=str(doc.get("clusterName") or "kubernetes"),
        service_subnet=service,
        pod_subnet=pod,
        dns_domain=dns,
        apiserver_cert_sans=sans,
        apiserver_extra_args=extra_args(doc, "apiServer.extraArgs", errors),
        controller_manager_extra_args=extra_args(doc, "controllerManager.extraArgs", errors),
        scheduler_extra_args=extra_args(doc, "scheduler.extraArgs", errors),
        etcd_data_dir=data_dir,
        etcd_extra_args=extra_args(doc, "etcd.local.extraArgs", errors),
        etcd_server_cert_sans=server_sans,
        etcd_peer_cert_sans=peer_sans,
        encryption_algorithm=algorithm,
        cert_validity_s=duration(doc, "certificateValidityPeriod", 8760 * 3600.0, errors),
        ca_validity_s=duration(doc, "caCertificateValidityPeriod", 87600 * 3600.0, errors),
        dns_disabled=bool(get(doc, "dns.disabled", False)),
        proxy_disabled=bool(get(doc, "proxy.disabled", False)),
        raw=doc,
    )
    return cluster


def validate_kubelet(cfg: Config, errors: list[str]) -> None:
    """Check the kubelet fields kubeadm relies on and fill clusterDNS/clusterDomain from networking."""
    k = cfg.kubelet
    port = k["healthzPort"]
    if not 1 <= port <= 65535:
        errors.append(invalid("KubeletConfiguration.healthzPort", port,
                              "must be between 1 and 65535 (kubeadm waits for the kubelet on it)"))
    if not is_ip(str(k["healthzBindAddress"])):
        errors.append(invalid("KubeletConfiguration.healthzBindAddress", k["healthzBindAddress"],
                              "must be a valid IP address"))
    _absolute("KubeletConfiguration.staticPodPath", str(k["staticPodPath"]), errors)
    if k["staticPodPath"] != "/etc/kubernetes/manifests":
        # kubeadm always writes its manifests to /etc/kubernetes/manifests and only warns about this.
        cfg.warnings.append('[config] WARNING: The recommended value for "staticPodPath" in "KubeletConfiguration" '
                            f'is: /etc/kubernetes/manifests; the provided value is: {k["staticPodPath"]}')
    if k["cgroupDriver"] not in ("systemd", "cgroupfs"):
        errors.append(f'KubeletConfiguration.cgroupDriver: Unsupported value: "{k["cgroupDriver"]}": '
                      'supported values: "cgroupfs", "systemd"')
    if not k.get("clusterDNS"):
        k["clusterDNS"] = [str(cfg.dns_service_ip)]
    for i, ip in enumerate(k["clusterDNS"]):
        if not is_ip(ip):
            errors.append(invalid(f"KubeletConfiguration.clusterDNS[{i}]", ip, "must be a valid IP address"))
    k.setdefault("clusterDomain", cfg.cluster.dns_domain)
    if not is_dns_subdomain(str(k["clusterDomain"])):
        errors.append(invalid("KubeletConfiguration.clusterDomain", k["clusterDomain"],
                              "must be a lowercase RFC 1123 subdomain"))
