"""The resource types this API server serves (group, version, kind, scope, subresources) and their lookup."""

from __future__ import annotations

from dataclasses import dataclass

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True)
class ResourceType:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()  # "status", "scale", "binding"
    categories: tuple[str, ...] = ()
    # Spec-bearing objects get metadata.generation, bumped when anything outside metadata/status changes.
    generation: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        """Store key prefix, stable across versions of one group."""
        return f"{self.group}/{self.plural}" if self.group else self.plural

    @property
    def qualified(self) -> str:
        """How error messages name the resource: `pods`, `deployments.apps`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources


def _t(
    group: str,
    version: str,
    plural: str,
    kind: str,
    namespaced: bool,
    short: tuple[str, ...] = (),
    sub: tuple[str, ...] = (),
    cat: tuple[str, ...] = (),
) -> ResourceType:
    return ResourceType(group, version, plural, kind, namespaced, short, sub, cat, generation="status" in sub)


_ALL = ("all",)
RESOURCE_TYPES: tuple[ResourceType, ...] = (
    _t("", "v1", "namespaces", "Namespace", False, ("ns",), ("status",)),
    _t("", "v1", "nodes", "Node", False, ("no",), ("status",)),
    _t("", "v1", "pods", "Pod", True, ("po",), ("status", "binding", "log"), _ALL),
    _t("", "v1", "services", "Service", True, ("svc",), ("status",), _ALL),
    _t("", "v1", "endpoints", "Endpoints", True, ("ep",)),
    _t("", "v1", "configmaps", "ConfigMap", True, ("cm",)),
    _t("", "v1", "secrets", "Secret", True),
    _t("", "v1", "serviceaccounts", "ServiceAccount", True, ("sa",), ("token",)),
    _t("", "v1", "events", "Event", True, ("ev",)),
    _t("", "v1", "persistentvolumes", "PersistentVolume", False, ("pv",), ("status",)),
    _t("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", True, ("pvc",), ("status",)),
    _t("", "v1", "limitranges", "LimitRange", True, ("limits",)),
    _t("", "v1", "resourcequotas", "ResourceQuota", True, ("quota",), ("status",)),
    _t("apps", "v1", "deployments", "Deployment", True, ("deploy",), ("status", "scale"), _ALL),
    _t("apps", "v1", "daemonsets", "DaemonSet", True, ("ds",), ("status",), _ALL),
    _t("apps", "v1", "replicasets", "ReplicaSet", True, ("rs",), ("status", "scale"), _ALL),
    _t("apps", "v1", "statefulsets", "StatefulSet", True, ("sts",), ("status", "scale"), _ALL),
    _t("apps", "v1", "controllerrevisions", "ControllerRevision", True),
    _t("storage.k8s.io", "v1", "storageclasses", "StorageClass", False, ("sc",)),
    _t("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
    _t("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
    _t("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
    _t("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
    _t("coordination.k8s.io", "v1", "leases", "Lease", True),
    _t("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
    _t("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", True, ("pdb",), ("status",)),
    _t("scheduling.k8s.io", "v1", "priorityclasses", "PriorityClass", False, ("pc",)),
)

_BY_PATH: dict[tuple[str, str, str], ResourceType] = {
    (rt.group, rt.version, rt.plural): rt for rt in RESOURCE_TYPES
}
_BY_KIND: dict[tuple[str, str], ResourceType] = {(rt.api_version, rt.kind): rt for rt in RESOURCE_TYPES}


def lookup(group: str, version: str, plural: str) -> ResourceType | None:
    return _BY_PATH.get((group, version, plural))


def lookup_kind(api_version: str, kind: str) -> ResourceType | None:
    return _BY_KIND.get((api_version, kind))


def group_versions() -> dict[str, list[str]]:
    """group -> versions, in registration order (the core group is "")."""
    out: dict[str, list[str]] = {}
    for rt in RESOURCE_TYPES:
        versions = out.setdefault(rt.group, [])
        if rt.version not in versions:
            versions.append(rt.version)
    return out


def types_in(group: str, version: str) -> list[ResourceType]:
    return [rt for rt in RESOURCE_TYPES if rt.group == group and rt.version == version]


NAMESPACES = _BY_PATH[("", "v1", "namespaces")]
SERVICES = _BY_PATH[("", "v1", "services")]
ENDPOINTS = _BY_PATH[("", "v1", "endpoints")]
PODS = _BY_PATH[("", "v1", "pods")]
NODES = _BY_PATH[("", "v1", "nodes")]
ENDPOINTSLICES = _BY_PATH[("discovery.k8s.io", "v1", "endpointslices")]
CLUSTERROLES = _BY_PATH[("rbac.authorization.k8s.io", "v1", "clusterroles")]
CLUSTERROLEBINDINGS = _BY_PATH[("rbac.authorization.k8s.io", "v1", "clusterrolebindings")]
