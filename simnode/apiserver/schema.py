"""How lists inside Kubernetes objects merge: by key (containers by name), as sets (finalizers), or atomically.

Both strategic merge patch (single patch merge key) and server-side apply (list-map keys) read this table,
which mirrors the struct tags / OpenAPI extensions of the built-in types for the lists that matter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_CONTAINER_LISTS = ("containers", "initContainers", "ephemeralContainers")


@dataclass(frozen=True)
class ListSpec:
    kind: str  # "map" (keyed items), "set" (primitive values), "atomic" (replaced whole)
    smp_key: str | None = None  # strategic merge patch merge key (None: the patch replaces the list)
    keys: tuple[str, ...] = ()  # server-side apply list-map keys
    key_defaults: tuple[tuple[str, Any], ...] = ()  # defaults for missing key fields ("protocol": "TCP")


ATOMIC = ListSpec("atomic")
_BY_NAME: dict[str, ListSpec] = {
    **{name: ListSpec("map", "name", ("name",)) for name in _CONTAINER_LISTS},
    "volumes": ListSpec("map", "name", ("name",)),
    "env": ListSpec("map", "name", ("name",)),
    "volumeMounts": ListSpec("map", "mountPath", ("mountPath",)),
    "volumeDevices": ListSpec("map", "devicePath", ("devicePath",)),
    "imagePullSecrets": ListSpec("map", "name", ("name",)),
    "resourceClaims": ListSpec("map", "name", ("name",)),
    "schedulingGates": ListSpec("map", "name", ("name",)),
    "hostAliases": ListSpec("map", "ip", ("ip",)),
    "conditions": ListSpec("map", "type", ("type",)),
    "ownerReferences": ListSpec("map", "uid", ("uid",)),
    "finalizers": ListSpec("set"),
    "topologySpreadConstraints": ListSpec(
        "map", "topologyKey", ("topologyKey", "whenUnsatisfiable")
    ),
}
_TCP = (("protocol", "TCP"),)
CONTAINER_PORTS = ListSpec("map", "containerPort", ("containerPort", "protocol"), _TCP)
SERVICE_PORTS = ListSpec("map", "port", ("port", "protocol"), _TCP)


def list_spec(path: tuple[str, ...]) -> ListSpec:
    """path: the field names leading to the list (list positions left out)."""
    if not path:
        return ATOMIC
    name = path[-1]
    if name == "ports":
        if len(path) >= 2 and path[-2] in _CONTAINER_LISTS:
            return CONTAINER_PORTS
        if path == ("spec", "ports"):
            return SERVICE_PORTS
        return ATOMIC
    if name == "finalizers" and path != ("metadata", "finalizers"):
        return ATOMIC  # namespace spec.finalizers is replaced whole
    if name == "addresses" and path == ("status", "addresses"):
        return ListSpec("map", "type", ("type",))
    return _BY_NAME.get(name, ATOMIC)


def item_key(spec: ListSpec, item: Any) -> tuple[tuple[str, Any], ...] | None:
    """The list-map key of an item, with key defaults filled in; None if the item has no key."""
    if not isinstance(item, dict):
        return None
    defaults = dict(spec.key_defaults)
    out = []
    for k in spec.keys:
        if k in item:
            out.append((k, item[k]))
        elif k in defaults:
            out.append((k, defaults[k]))
        else:
            return None if k == spec.keys[0] else tuple(out)
    return tuple(out)
