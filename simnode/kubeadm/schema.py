"""Strict decoding of kubeadm's config kinds: wrong types are errors, unknown fields are warnings.

This mirrors what kubeadm does with sigs.k8s.io/yaml + strict JSON decoding: a value of the wrong type
fails the whole config, an unknown field only produces a `strict decoding error` warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union


@dataclass(frozen=True)
class Scalar:
    go_type: str  # "string", "int32", "bool"


@dataclass(frozen=True)
class ListOf:
    item: Spec


@dataclass(frozen=True)
class MapOf:
    value: Spec


@dataclass(frozen=True)
class Struct:
    go_name: str
    fields: dict[str, Spec] = field(default_factory=dict)
    open: bool = False  # fields not listed are allowed silently (KubeletConfiguration has ~100)


@dataclass(frozen=True)
class AnyValue:
    pass


Spec = Union[Scalar, ListOf, MapOf, Struct, AnyValue]  # noqa: UP007  (recursive alias needs Union)

STR = Scalar("string")
INT = Scalar("int32")
BOOL = Scalar("bool")
STRS = ListOf(STR)
ANY = AnyValue()


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _scalar_ok(value: Any, go_type: str) -> bool:
    if go_type == "string":
        return isinstance(value, str)
    if go_type == "bool":
        return isinstance(value, bool)
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Decoded:
    errors: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


def check(value: Any, spec: Spec, path: str, struct_name: str, out: Decoded) -> None:
    """Type-check `value` against `spec`; `path` is the dotted field path used in messages."""
    if value is None or isinstance(spec, AnyValue):
        return  # null means "unset" in Go's decoder
    if isinstance(spec, Scalar):
        if not _scalar_ok(value, spec.go_type):
            out.errors.append(
                f"json: cannot unmarshal {_json_kind(value)} into Go struct field {struct_name}.{path} "
                f"of type {spec.go_type}"
            )
        return
    if isinstance(spec, ListOf):
        if not isinstance(value, list):
            out.errors.append(
                f"json: cannot unmarshal {_json_kind(value)} into Go struct field {struct_name}.{path} "
                f"of type []{_go_type(spec.item)}"
            )
            return
        for i, item in enumerate(value):
            check(item, spec.item, f"{path}[{i}]", struct_name, out)
        return
    if not isinstance(value, dict):
        out.errors.append(
            f"json: cannot unmarshal {_json_kind(value)} into Go struct field {struct_name}.{path} "
            f"of type {_go_type(spec)}"
        )
        return
    if isinstance(spec, MapOf):
        for key, item in value.items():
            check(item, spec.value, f"{path}.{key}", struct_name, out)
        return
    for key, item in value.items():
        sub = f"{path}.{key}" if path else str(key)
        if key in spec.fields:
            check(item, spec.fields[key], sub, struct_name, out)
        elif not spec.open:
            out.unknown.append(sub)


def _go_type(spec: Spec) -> str:
    if isinstance(spec, Scalar):
        return spec.go_type
    if isinstance(spec, ListOf):
        return "[]" + _go_type(spec.item)
    if isinstance(spec, MapOf):
        return "map[string]" + _go_type(spec.value)
    if isinstance(spec, Struct):
        return spec.go_name
    return "interface {}"


def decode(doc: dict[str, Any], spec: Struct) -> Decoded:
    out = Decoded()
    body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind")}
    check(body, spec, "", spec.go_name, out)
    return out


# ---- the kinds (fields as in kubeadm v1beta3 / v1beta4 and kubelet v1beta1) ----

def _extra_args(v1beta4: bool) -> Spec:
    if v1beta4:
        return ListOf(Struct("Arg", {"name": STR, "value": STR}))
    return MapOf(STR)


_ENV = ListOf(Struct("EnvVar", {"name": STR, "value": STR, "valueFrom": ANY}))
_VOLUMES = ListOf(
    Struct("HostPathMount", {"name": STR, "hostPath": STR, "mountPath": STR, "readOnly": BOOL, "pathType": STR})
)


def _control_plane_component(v1beta4: bool, apiserver: bool) -> Struct:
    fields: dict[str, Spec] = {"extraArgs": _extra_args(v1beta4), "extraVolumes": _VOLUMES}
    if v1beta4:
        fields["extraEnvs"] = _ENV
    if apiserver:
        fields["certSANs"] = STRS
        if not v1beta4:
            fields["timeoutForControlPlane"] = STR
    return Struct("ControlPlaneComponent", fields)


def cluster_configuration(v1beta4: bool) -> Struct:
    local: dict[str, Spec] = {
        "imageRepository": STR,
        "imageTag": STR,
        "dataDir": STR,
        "extraArgs": _extra_args(v1beta4),
        "serverCertSANs": STRS,
        "peerCertSANs": STRS,
    }
    if v1beta4:
        local["extraEnvs"] = _ENV
    fields: dict[str, Spec] = {
        "etcd": Struct(
            "Etcd",
            {
                "local": Struct("LocalEtcd", local),
                "external": Struct(
                    "ExternalEtcd", {"endpoints": STRS, "caFile": STR, "certFile": STR, "keyFile": STR}
                ),
            },
        ),
        "networking": Struct("Networking", {"serviceSubnet": STR, "podSubnet": STR, "dnsDomain": STR}),
        "kubernetesVersion": STR,
        "controlPlaneEndpoint": STR,
        "apiServer": _control_plane_component(v1beta4, apiserver=True),
        "controllerManager": _control_plane_component(v1beta4, apiserver=False),
        "scheduler": _control_plane_component(v1beta4, apiserver=False),
        "dns": Struct("DNS", {"imageRepository": STR, "imageTag": STR, **({"disabled": BOOL} if v1beta4 else {})}),
        "certificatesDir": STR,
        "imageRepository": STR,
        "featureGates": MapOf(BOOL),
        "clusterName": STR,
    }
    if v1beta4:
        fields["proxy"] = Struct("Proxy", {"disabled": BOOL})
        fields["encryptionAlgorithm"] = STR
        fields["certificateValidityPeriod"] = STR
        fields["caCertificateValidityPeriod"] = STR
    return Struct("ClusterConfiguration", fields)


def init_configuration(v1beta4: bool) -> Struct:
    node_registration: dict[str, Spec] = {
        "name": STR,
        "criSocket": STR,
        "taints": ListOf(Struct("Taint", {"key": STR, "value": STR, "effect": STR, "timeAdded": STR})),
        "kubeletExtraArgs": _extra_args(v1beta4),
        "ignorePreflightErrors": STRS,
        "imagePullPolicy": STR,
    }
    if v1beta4:
        node_registration["imagePullSerial"] = BOOL
    fields: dict[str, Spec] = {
        "bootstrapTokens": ListOf(
            Struct(
                "BootstrapToken",
                {"token": STR, "description": STR, "ttl": STR, "expires": STR, "usages": STRS, "groups": STRS},
            )
        ),
        "nodeRegistration": Struct("NodeRegistrationOptions", node_registration),
        "localAPIEndpoint": Struct("APIEndpoint", {"advertiseAddress": STR, "bindPort": INT}),
        "certificateKey": STR,
        "skipPhases": STRS,
        "patches": Struct("Patches", {"directory": STR}),
    }
    if v1beta4:
        fields["dryRun"] = BOOL
        fields["timeouts"] = Struct(
            "Timeouts",
            dict.fromkeys(
                (
                    "controlPlaneComponentHealthCheck",
                    "kubeletHealthCheck",
                    "kubernetesAPICall",
                    "etcdAPICall",
                    "tlsBootstrap",
                    "discovery",
                    "upgradeManifests",
                ),
                STR,
            ),
        )
    return Struct("InitConfiguration", fields)


KUBELET_CONFIGURATION = Struct(
    "KubeletConfiguration",
    {
        "healthzPort": INT,
        "healthzBindAddress": STR,
        "staticPodPath": STR,
        "cgroupDriver": STR,
        "clusterDNS": STRS,
        "clusterDomain": STR,
        "rotateCertificates": BOOL,
        "authentication": ANY,
        "authorization": ANY,
    },
    open=True,
)
