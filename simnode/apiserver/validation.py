"""The checks the real API server makes that clients notice: names, label types, required pod/workload fields."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from simnode.apiserver.errors import bad_request, invalid
from simnode.apiserver.resources import ResourceType

_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and "
    "must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start "
    "and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
_DNS1035_MSG = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic "
    "character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for "
    "validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"
)


def _path_segment_problem(name: str) -> str | None:
    """RBAC names only need to be usable in a URL path (`system:node`, `kubeadm:cluster-admins`)."""
    if name in (".", ".."):
        return f"may not be '{name}'"
    for bad in ("/", "%"):
        if bad in name:
            return f"may not contain '{bad}'"
    return None


def check_name(rt: ResourceType, name: str) -> None:
    if rt.group == "rbac.authorization.k8s.io" and name:
        problem = _path_segment_problem(name)
        if problem:
            raise invalid(rt, name, [("metadata.name", f'Invalid value: "{name}": {problem}')])
        return
    if rt.kind == "Namespace":
        ok, limit, msg = _LABEL_RE.match(name), 63, _LABEL_MSG
    elif rt.kind == "Service":
        ok, limit, msg = _DNS1035_RE.match(name), 63, _DNS1035_MSG
    else:
        ok, limit, msg = _SUBDOMAIN_RE.match(name), 253, _SUBDOMAIN_MSG
    if not name:
        raise invalid(rt, name, [("metadata.name", "Required value: name or generateName is required")])
    if not ok:
        raise invalid(rt, name, [("metadata.name", f'Invalid value: "{name}": {msg}')])
    if len(name) > limit:
        why = f"must be no more than {limit} characters"
        raise invalid(rt, name, [("metadata.name", f'Invalid value: "{name}": {why}')])


def _string_map(meta: dict[str, Any], field: str) -> None:
    value = meta.get(field)
    if value is None:
        return
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise bad_request(f"metadata.{field}: expected a map of string to string, got {value!r}")


def check_shape(obj: Any) -> dict[str, Any]:
    """Structural checks every write gets; returns metadata."""
    if not isinstance(obj, dict):
        raise bad_request("the request body must be a JSON object")
    meta = obj.get("metadata")
    if meta is None:
        meta = obj["metadata"] = {}
    if not isinstance(meta, dict):
        raise bad_request("metadata: expected an object")
    for field in ("labels", "annotations"):
        _string_map(meta, field)
    for field in ("name", "namespace", "generateName", "resourceVersion"):
        if field in meta and meta[field] is not None and not isinstance(meta[field], str):
            raise bad_request(f"metadata.{field}: expected a string, got {meta[field]!r}")
    for field in ("spec", "status"):
        if field in obj and obj[field] is not None and not isinstance(obj[field], dict):
            raise bad_request(f"{field}: expected an object, got {type(obj[field]).__name__}")
    return meta


def _pod_spec(rt: ResourceType, name: str, spec: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(spec, dict):
        return [(where, "Required value")]
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        return [(f"{where}.containers", "Required value")]
    causes = []
    for i, c in enumerate(containers):
        if not isinstance(c, dict) or not c.get("name"):
            causes.append((f"{where}.containers[{i}].name", "Required value"))
        elif not c.get("image"):
            causes.append((f"{where}.containers[{i}].image", "Required value"))
    return causes


def _selector_matches(selector: Any, labels: dict[str, str]) -> bool:
    if not isinstance(selector, dict):
        return False
    match = selector.get("matchLabels") or {}
    if not all(labels.get(k) == v for k, v in match.items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        present = key in labels
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and present and labels[key] in values):
            return False
        if (op == "Exists" and not present) or (op == "DoesNotExist" and present):
            return False
    return bool(match or selector.get("matchExpressions"))


def validate(rt: ResourceType, obj: dict[str, Any]) -> None:
    name = obj["metadata"].get("name", "")
    causes: list[tuple[str, str]] = []
    if rt.kind == "Pod":
        causes = _pod_spec(rt, name, obj.get("spec"), "spec")
    elif rt.kind in ("Deployment", "ReplicaSet", "DaemonSet", "StatefulSet"):
        spec = obj.get("spec") or {}
        template: dict[str, Any] = spec["template"] if isinstance(spec.get("template"), dict) else {}
        labels = (template.get("metadata") or {}).get("labels") or {}
        if not spec.get("selector"):
            causes.append(("spec.selector", "Required value"))
        elif not _selector_matches(spec["selector"], labels):
            why = "`selector` does not match template `labels`"
            causes.append(("spec.template.metadata.labels", f"Invalid value: {labels!r}: {why}"))
        causes += _pod_spec(rt, name, template.get("spec"), "spec.template.spec")
    elif rt.kind == "Service":
        causes = _service_ports(obj.get("spec")) + _load_balancer_status(obj.get("status"))
    if causes:
        raise invalid(rt, name, causes)


def _service_ports(spec: Any) -> list[tuple[str, str]]:
    """kubernetes pkg/apis/core/validation/validation.go, ValidateService: with more than one port each needs a
    name (validateServicePort: `requireName && len(sp.Name) == 0` -> Required), a name is a DNS-1123 label and
    unique in the Service (`allNames.Has(sp.Name)` -> Duplicate); "Check for duplicate Ports, considering
    (protocol,port) pairs" and "Check for duplicate NodePorts, considering (protocol,port) pairs" -> Duplicate.
    (The real message prints the Go struct of the duplicate key; the field paths are the real ones.)"""
    ports = spec.get("ports") if isinstance(spec, dict) else None
    if not isinstance(ports, list):
        return []
    causes: list[tuple[str, str]] = []
    names: set[str] = set()
    keys: set[tuple[str, Any]] = set()
    node_ports: set[tuple[str, Any]] = set()
    for i, p in enumerate(ports):
        where = f"spec.ports[{i}]"
        if not isinstance(p, dict):
            causes.append((where, "Invalid value: expected an object"))
            continue
        name = str(p.get("name") or "")
        if not name and len(ports) > 1:
            causes.append((f"{where}.name", "Required value"))
        elif name:
            if len(name) > 63 or not _LABEL_RE.match(name):
                causes.append((f"{where}.name", f'Invalid value: "{name}": {_LABEL_MSG}'))
            if name in names:
                causes.append((f"{where}.name", f'Duplicate value: "{name}"'))
            names.add(name)
        protocol = str(p.get("protocol") or "TCP")
        if (protocol, p.get("port")) in keys:
            causes.append((where, f'Duplicate value: {{"protocol":"{protocol}","port":{p.get("port")}}}'))
        keys.add((protocol, p.get("port")))
        if p.get("nodePort"):
            if (protocol, p["nodePort"]) in node_ports:
                causes.append((f"{where}.nodePort", f"Duplicate value: {p['nodePort']}"))
            node_ports.add((protocol, p["nodePort"]))
    return causes


def _load_balancer_status(status: Any) -> list[tuple[str, str]]:
    """kubernetes pkg/apis/core/validation/validation.go, ValidateLoadBalancerStatus (run by the services/status
    strategy, pkg/registry/core/service/strategy.go serviceStatusStrategy.ValidateUpdate): an ingress `ip` must
    be an IP address; a `hostname` a DNS-1123 subdomain and not an IP address."""
    balancer = status.get("loadBalancer") if isinstance(status, dict) else None
    ingress = balancer.get("ingress") if isinstance(balancer, dict) else None
    causes: list[tuple[str, str]] = []
    for i, entry in enumerate(ingress if isinstance(ingress, list) else []):
        where = f"status.loadBalancer.ingress[{i}]"
        if not isinstance(entry, dict):
            causes.append((where, "Invalid value: expected an object"))
            continue
        ip, hostname = entry.get("ip") or "", entry.get("hostname") or ""
        if ip and not _is_ip(str(ip)):
            causes.append((f"{where}.ip", f'Invalid value: "{ip}": must be a valid IP address'))
        if hostname:
            text = str(hostname)
            if len(text) > 253 or not _SUBDOMAIN_RE.fullmatch(text):
                causes.append((f"{where}.hostname", f'Invalid value: "{text}": {_SUBDOMAIN_MSG}'))
            if _is_ip(text):
                causes.append((f"{where}.hostname", f'Invalid value: "{text}": must be a DNS name, not an IP address'))
    return causes


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
