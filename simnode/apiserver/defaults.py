"""Defaults the real API server fills in on write (the subset controllers and kubectl output rely on)."""

from __future__ import annotations

from typing import Any

from simnode.apiserver.resources import ResourceType

Obj = dict[str, Any]


def _pull_policy(image: Any) -> str:
    ref = str(image or "")
    tag = ref.rsplit("/", 1)[-1]
    if "@" in ref:
        return "IfNotPresent"
    return "Always" if ":" not in tag or tag.endswith(":latest") else "IfNotPresent"


def _ports(ports: Any) -> None:
    if isinstance(ports, list):
        for p in ports:
            if isinstance(p, dict):
                p.setdefault("protocol", "TCP")


def pod_spec(spec: Any) -> None:
    if not isinstance(spec, dict):
        return
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("securityContext", {})
    for name in ("containers", "initContainers"):
        for c in spec.get(name) or []:
            if not isinstance(c, dict):
                continue
            c.setdefault("imagePullPolicy", _pull_policy(c.get("image")))
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            c.setdefault("terminationMessagePolicy", "File")
            c.setdefault("resources", {})
            _ports(c.get("ports"))


def _template(obj: Obj) -> None:
    spec = obj.get("spec")
    if isinstance(spec, dict) and isinstance(spec.get("template"), dict):
        pod_spec(spec["template"].get("spec"))


def _workload(obj: Obj, kind: str) -> None:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return
    _template(obj)
    if kind in ("Deployment", "ReplicaSet", "StatefulSet"):
        spec.setdefault("replicas", 1)
    if kind != "ReplicaSet":
        spec.setdefault("revisionHistoryLimit", 10)
    if kind == "Deployment":
        spec.setdefault("progressDeadlineSeconds", 600)
        spec.setdefault(
            "strategy", {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}
        )
    elif kind == "DaemonSet":
        spec.setdefault(
            "updateStrategy", {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
        )
    elif kind == "StatefulSet":
        spec.setdefault("podManagementPolicy", "OrderedReady")
        spec.setdefault("updateStrategy", {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}})


def _service(obj: Obj) -> None:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return
    spec.setdefault("type", "ClusterIP")
    if spec["type"] == "ExternalName":
        return
    spec.setdefault("sessionAffinity", "None")
    spec.setdefault("internalTrafficPolicy", "Cluster")
    for p in spec.get("ports") or []:
        if isinstance(p, dict):
            p.setdefault("protocol", "TCP")
            if "port" in p:
                p.setdefault("targetPort", p["port"])
    if spec["type"] in ("NodePort", "LoadBalancer"):
        spec.setdefault("externalTrafficPolicy", "Cluster")
    # kubernetes pkg/apis/core/v1/defaults.go, SetDefaults_Service: a LoadBalancer without
    # allocateLoadBalancerNodePorts gets `true`; pkg/registry/core/service/strategy.go, dropTypeDependentFields:
    # the field goes when the Service stops being a LoadBalancer.
    if spec["type"] == "LoadBalancer":
        spec.setdefault("allocateLoadBalancerNodePorts", True)
    else:
        spec.pop("allocateLoadBalancerNodePorts", None)


def apply_defaults(rt: ResourceType, obj: Obj) -> None:
    kind = rt.kind
    if kind == "Pod":
        pod_spec(obj.get("spec"))
        if isinstance(obj.get("spec"), dict):
            obj["spec"].setdefault("serviceAccountName", "default")
            obj["spec"].setdefault("enableServiceLinks", True)
            obj["spec"].setdefault("priority", 0)
    elif kind in ("Deployment", "ReplicaSet", "DaemonSet", "StatefulSet"):
        _workload(obj, kind)
    elif kind == "Service":
        _service(obj)
    elif kind == "Namespace":
        obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
        obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        obj.setdefault("status", {}).setdefault("phase", "Active")
    elif kind == "Secret":
        obj.setdefault("type", "Opaque")
    elif kind == "PersistentVolumeClaim":
        if isinstance(obj.get("spec"), dict):
            obj["spec"].setdefault("volumeMode", "Filesystem")
        obj.setdefault("status", {}).setdefault("phase", "Pending")
    elif kind == "PersistentVolume":
        if isinstance(obj.get("spec"), dict):
            obj["spec"].setdefault("persistentVolumeReclaimPolicy", "Retain")
            obj["spec"].setdefault("volumeMode", "Filesystem")
        obj.setdefault("status", {}).setdefault("phase", "Pending")
    elif kind == "StorageClass":
        obj.setdefault("reclaimPolicy", "Delete")
        obj.setdefault("volumeBindingMode", "Immediate")


def initial_status(rt: ResourceType, obj: Obj) -> None:
    """Status a freshly created object starts with when the client sent none."""
    if rt.kind == "Pod" and not obj.get("status"):
        obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
    elif rt.kind == "Service":
        # kubernetes pkg/registry/core/service/strategy.go, svcStrategy.PrepareForCreate: `service.Status =
        # api.ServiceStatus{}` (only services/status sets an ingress), served as {"loadBalancer": {}}.
        obj["status"] = {"loadBalancer": {}}
