"""Decodes `application/vnd.kubernetes.protobuf` request bodies into JSON-shaped objects.

kubectl >= 1.32 sends protobuf from its typed clients (`kubectl create namespace|configmap|secret|
serviceaccount|service|deployment|role...`, `kubectl run`). This covers those kinds with the field numbers of
k8s.io/api's generated.proto. A field outside this table is rejected with its message and number, never
dropped. Zero scalars are left out like JSON's omitempty, except fields marked "!" (pointers in Go).
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

from simnode.apiserver.protowire import LEN, ProtoError, fields, signed

MAGIC = b"k8s\x00"
# message -> field number -> (json name, type). Types: string, int, bool, bytes, time, intorstr, quantity,
# a message name; prefix "[]" repeated, "map:" map<string, T>; suffix "!" keeps zero values.
Schema = dict[int, tuple[str, str]]
_META: Schema = {
    1: ("name", "string"), 2: ("generateName", "string"), 3: ("namespace", "string"), 4: ("selfLink", "string"),
    5: ("uid", "string"),
    6: ("resourceVersion", "string"), 7: ("generation", "int"), 8: ("creationTimestamp", "time"),
    9: ("deletionTimestamp", "time"), 10: ("deletionGracePeriodSeconds", "int!"), 11: ("labels", "map:string"),
    12: ("annotations", "map:string"), 13: ("ownerReferences", "[]OwnerReference"), 14: ("finalizers", "[]string"),
}
_POD_SPEC: Schema = {
    2: ("containers", "[]Container"), 3: ("restartPolicy", "string"), 4: ("terminationGracePeriodSeconds", "int!"),
    5: ("activeDeadlineSeconds", "int!"), 6: ("dnsPolicy", "string"), 7: ("nodeSelector", "map:string"),
    8: ("serviceAccountName", "string"), 9: ("serviceAccount", "string"), 10: ("nodeName", "string"),
    11: ("hostNetwork", "bool"), 12: ("hostPID", "bool"), 13: ("hostIPC", "bool"),
    14: ("securityContext", "Empty"), 15: ("imagePullSecrets", "[]LocalObjectReference"),
    16: ("hostname", "string"), 17: ("subdomain", "string"), 19: ("schedulerName", "string"),
    20: ("initContainers", "[]Container"), 21: ("automountServiceAccountToken", "bool!"),
    22: ("tolerations", "[]Toleration"), 24: ("priorityClassName", "string"), 25: ("priority", "int!"),
    27: ("shareProcessNamespace", "bool!"), 29: ("runtimeClassName", "string"),
    30: ("enableServiceLinks", "bool!"), 31: ("preemptionPolicy", "string"),
}
SCHEMAS: dict[str, Schema] = {
    "ObjectMeta": _META,
    "Empty": {},
    "OwnerReference": {1: ("kind", "string"), 3: ("name", "string"), 4: ("uid", "string"),
                       5: ("apiVersion", "string"), 6: ("controller", "bool!"), 7: ("blockOwnerDeletion", "bool!")},
    "LabelSelector": {1: ("matchLabels", "map:string"), 2: ("matchExpressions", "[]LabelSelectorRequirement")},
    "LabelSelectorRequirement": {1: ("key", "string"), 2: ("operator", "string"), 3: ("values", "[]string")},
    "LocalObjectReference": {1: ("name", "string")},
    "ObjectReference": {1: ("kind", "string"), 2: ("namespace", "string"), 3: ("name", "string"),
                        4: ("uid", "string"), 5: ("apiVersion", "string"), 6: ("resourceVersion", "string"),
                        7: ("fieldPath", "string")},
    "Namespace": {1: ("metadata", "ObjectMeta"), 2: ("spec", "NamespaceSpec"), 3: ("status", "NamespaceStatus")},
    "NamespaceSpec": {1: ("finalizers", "[]string")},
    "NamespaceStatus": {1: ("phase", "string")},
    "ConfigMap": {1: ("metadata", "ObjectMeta"), 2: ("data", "map:string"), 3: ("binaryData", "map:bytes"),
                  4: ("immutable", "bool!")},
    "Secret": {1: ("metadata", "ObjectMeta"), 2: ("data", "map:bytes"), 3: ("type", "string"),
               4: ("stringData", "map:string"), 5: ("immutable", "bool!")},
    "ServiceAccount": {1: ("metadata", "ObjectMeta"), 2: ("secrets", "[]ObjectReference"),
                       3: ("imagePullSecrets", "[]LocalObjectReference"),
                       4: ("automountServiceAccountToken", "bool!")},
    "Service": {1: ("metadata", "ObjectMeta"), 2: ("spec", "ServiceSpec"), 3: ("status", "ServiceStatus")},
    "ServiceSpec": {1: ("ports", "[]ServicePort"), 2: ("selector", "map:string"), 3: ("clusterIP", "string"),
                    4: ("type", "string"), 5: ("externalIPs", "[]string"), 7: ("sessionAffinity", "string"),
                    8: ("loadBalancerIP", "string"), 9: ("loadBalancerSourceRanges", "[]string"),
                    10: ("externalName", "string"), 11: ("externalTrafficPolicy", "string"),
                    12: ("healthCheckNodePort", "int"), 13: ("publishNotReadyAddresses", "bool"),
                    17: ("ipFamilyPolicy", "string"), 18: ("clusterIPs", "[]string"), 19: ("ipFamilies", "[]string"),
                    20: ("allocateLoadBalancerNodePorts", "bool!"), 21: ("loadBalancerClass", "string"),
                    22: ("internalTrafficPolicy", "string")},
    "ServicePort": {1: ("name", "string"), 2: ("protocol", "string"), 3: ("port", "int!"),
                    4: ("targetPort", "intorstr"), 5: ("nodePort", "int"), 6: ("appProtocol", "string")},
    "ServiceStatus": {1: ("loadBalancer", "LoadBalancerStatus")},
    "LoadBalancerStatus": {1: ("ingress", "[]LoadBalancerIngress")},
    "LoadBalancerIngress": {1: ("ip", "string"), 2: ("hostname", "string")},
    "Pod": {1: ("metadata", "ObjectMeta"), 2: ("spec", "PodSpec"), 3: ("status", "PodStatus")},
    "PodSpec": _POD_SPEC,
    "PodStatus": {1: ("phase", "string")},
    "PodTemplateSpec": {1: ("metadata", "ObjectMeta"), 2: ("spec", "PodSpec")},
    "Container": {1: ("name", "string"), 2: ("image", "string"), 3: ("command", "[]string"),
                  4: ("args", "[]string"), 5: ("workingDir", "string"), 6: ("ports", "[]ContainerPort"),
                  7: ("env", "[]EnvVar"), 8: ("resources", "ResourceRequirements"),
                  9: ("volumeMounts", "[]VolumeMount"), 13: ("terminationMessagePath", "string"),
                  14: ("imagePullPolicy", "string"), 15: ("securityContext", "Empty"), 16: ("stdin", "bool"),
                  17: ("stdinOnce", "bool"), 18: ("tty", "bool"), 20: ("terminationMessagePolicy", "string")},
    "ContainerPort": {1: ("name", "string"), 2: ("hostPort", "int"), 3: ("containerPort", "int!"),
                      4: ("protocol", "string"), 5: ("hostIP", "string")},
    "EnvVar": {1: ("name", "string"), 2: ("value", "string")},
    "VolumeMount": {1: ("name", "string"), 2: ("readOnly", "bool"), 3: ("mountPath", "string"),
                    4: ("subPath", "string"), 5: ("mountPropagation", "string"), 6: ("subPathExpr", "string")},
    "ResourceRequirements": {1: ("limits", "map:quantity"), 2: ("requests", "map:quantity")},
    "Toleration": {1: ("key", "string"), 2: ("operator", "string"), 3: ("value", "string"), 4: ("effect", "string"),
                   5: ("tolerationSeconds", "int!")},
    "Deployment": {1: ("metadata", "ObjectMeta"), 2: ("spec", "DeploymentSpec"), 3: ("status", "DeploymentStatus")},
    "DeploymentStatus": {1: ("observedGeneration", "int"), 2: ("replicas", "int"), 3: ("updatedReplicas", "int"),
                         4: ("availableReplicas", "int"), 5: ("unavailableReplicas", "int"),
                         7: ("readyReplicas", "int"), 8: ("collisionCount", "int"), 9: ("terminatingReplicas", "int")},
    "DeploymentSpec": {1: ("replicas", "int!"), 2: ("selector", "LabelSelector"), 3: ("template", "PodTemplateSpec"),
                       4: ("strategy", "DeploymentStrategy"), 5: ("minReadySeconds", "int"),
                       6: ("revisionHistoryLimit", "int!"), 7: ("paused", "bool"),
                       9: ("progressDeadlineSeconds", "int!")},
    "DeploymentStrategy": {1: ("type", "string"), 2: ("rollingUpdate", "RollingUpdateDeployment")},
    "RollingUpdateDeployment": {1: ("maxUnavailable", "intorstr"), 2: ("maxSurge", "intorstr")},
    "Role": {1: ("metadata", "ObjectMeta"), 2: ("rules", "[]PolicyRule")},
    "ClusterRole": {1: ("metadata", "ObjectMeta"), 2: ("rules", "[]PolicyRule"),
                    3: ("aggregationRule", "AggregationRule")},
    "AggregationRule": {1: ("clusterRoleSelectors", "[]LabelSelector")},
    "PolicyRule": {1: ("verbs", "[]string"), 2: ("apiGroups", "[]string"), 3: ("resources", "[]string"),
                   4: ("resourceNames", "[]string"), 5: ("nonResourceURLs", "[]string")},
    "RoleBinding": {1: ("metadata", "ObjectMeta"), 2: ("subjects", "[]Subject"), 3: ("roleRef", "RoleRef")},
    "ClusterRoleBinding": {1: ("metadata", "ObjectMeta"), 2: ("subjects", "[]Subject"), 3: ("roleRef", "RoleRef")},
    "Subject": {1: ("kind", "string"), 2: ("apiGroup", "string"), 3: ("name", "string"), 4: ("namespace", "string")},
    "RoleRef": {1: ("apiGroup", "string"), 2: ("kind", "string"), 3: ("name", "string")},
}
_ZERO_TIME_S = -62135596800  # Go's zero time.Time, what an unset creationTimestamp encodes to


def _scalar(kind: str, wire: int, value: int | bytes, where: str) -> Any:
    length_delimited = kind in ("string", "bytes", "time", "intorstr", "quantity") or kind[0].isupper()
    if length_delimited and (wire != LEN or not isinstance(value, bytes)):
        raise ProtoError(f"{where}: expected a length-delimited field")
    if kind == "string":
        assert isinstance(value, bytes)
        return value.decode()
    if kind == "bytes":
        assert isinstance(value, bytes)
        return base64.b64encode(value).decode()
    if kind == "int":
        assert isinstance(value, int)
        return signed(value)
    if kind == "bool":
        return bool(value)
    assert isinstance(value, bytes)
    if kind == "time":
        sub = {n: v for n, _, v in fields(value)}
        seconds = signed(int(sub.get(1, 0)))
        if seconds <= _ZERO_TIME_S:
            return None
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if kind == "intorstr":
        sub = {n: v for n, _, v in fields(value)}
        if int(sub.get(1, 0)) == 1:
            text = sub.get(3, b"")
            return text.decode() if isinstance(text, bytes) else ""
        return signed(int(sub.get(2, 0)), 32)
    if kind == "quantity":
        sub = {n: v for n, _, v in fields(value)}
        text = sub.get(1, b"")
        return text.decode() if isinstance(text, bytes) else ""
    return decode_message(kind, value)


def _map_entry(data: bytes, kind: str, where: str) -> tuple[str, Any]:
    key, value = "", {"string": "", "bytes": "", "quantity": "0"}.get(kind, "")
    for num, wire, v in fields(data):
        if num == 1 and isinstance(v, bytes):
            key = v.decode()
        elif num == 2:
            value = _scalar(kind, wire, v, where)
    return key, value


def _is_zero(value: Any) -> bool:
    return value in ("", 0, False, None) or value == {} or value == []


def decode_message(name: str, data: bytes) -> dict[str, Any]:
    schema = SCHEMAS[name]
    out: dict[str, Any] = {}
    for num, wire, value in fields(data):
        if num not in schema:
            raise ProtoError(f"field {num} of {name} is not supported by this server's protobuf decoder")
        json_name, kind = schema[num]
        keep = kind.endswith("!")
        kind = kind.rstrip("!")
        where = f"{name}.{json_name}"
        if kind.startswith("map:"):
            assert isinstance(value, bytes)
            k, v = _map_entry(value, kind[4:], where)
            out.setdefault(json_name, {})[k] = v
        elif kind.startswith("[]"):
            out.setdefault(json_name, []).append(_scalar(kind[2:], wire, value, where))
        else:
            decoded = _scalar(kind, wire, value, where)
            if keep or not _is_zero(decoded) or json_name == "metadata":
                out[json_name] = decoded
    return out


def decode_object(data: bytes) -> dict[str, Any]:
    """The object inside a `k8s\\x00` envelope (runtime.Unknown), with apiVersion and kind set."""
    if not data.startswith(MAGIC):
        raise ProtoError("the body does not start with the k8s protobuf magic bytes")
    api_version = kind = ""
    raw = b""
    for num, _, value in fields(data[len(MAGIC):]):
        if num == 1 and isinstance(value, bytes):
            for n, _, v in fields(value):
                if n == 1 and isinstance(v, bytes):
                    api_version = v.decode()
                elif n == 2 and isinstance(v, bytes):
                    kind = v.decode()
        elif num == 2 and isinstance(value, bytes):
            raw = value
    if kind not in SCHEMAS or kind[0].islower():
        raise ProtoError(f"protobuf bodies of kind {kind!r} are not supported by this server; send JSON")
    obj = decode_message(kind, raw)
    return {"apiVersion": api_version, "kind": kind, **obj}
