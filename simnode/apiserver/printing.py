"""Server-side printing: `meta.k8s.io Table` answers with the columns the real server prints per resource."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from simnode.apiserver.resources import ResourceType

Obj = dict[str, Any]
Column = tuple[str, str, int]  # name, type, priority (1 = only with -o wide)


def human_duration(seconds_f: float) -> str:
    """k8s.io/apimachinery duration.HumanDuration."""
    seconds = int(seconds_f)
    if seconds < -1:
        return "<invalid>"
    if seconds < 0:
        return "0s"
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        s = seconds % 60
        return f"{minutes}m" if s == 0 else f"{minutes}m{s}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = seconds // 3600
    if hours < 8:
        m = minutes % 60
        return f"{hours}h" if m == 0 else f"{hours}h{m}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        h = hours % 24
        return f"{hours // 24}d" if h == 0 else f"{hours // 24}d{h}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        dy = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if dy == 0 else f"{hours // 24 // 365}y{dy}d"
    return f"{hours // 24 // 365}y"


def _since(timestamp: Any, now: datetime) -> str:
    if not timestamp:
        return "<unknown>"
    try:
        t = datetime.fromisoformat(str(timestamp))
    except ValueError:
        return "<unknown>"
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return human_duration((now - t).total_seconds())


def _age(obj: Obj, now: datetime) -> str:
    return _since(obj["metadata"].get("creationTimestamp"), now)


def _none(value: Any) -> Any:
    return value if value not in (None, "", []) else "<none>"


def _containers_images(obj: Obj) -> list[str]:
    spec = ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    containers = spec.get("containers") or []
    return [",".join(c.get("name", "") for c in containers), ",".join(c.get("image", "") for c in containers)]


def _selector(obj: Obj) -> str:
    sel = (obj.get("spec") or {}).get("selector") or {}
    parts = [f"{k}={v}" for k, v in sorted((sel.get("matchLabels") or {}).items())]
    for e in sel.get("matchExpressions") or []:
        op = {"In": "in", "NotIn": "notin"}.get(e.get("operator", ""))
        if op:
            parts.append(f"{e['key']} {op} ({','.join(e.get('values') or [])})")
        elif e.get("operator") == "Exists":
            parts.append(e["key"])
        else:
            parts.append("!" + e.get("key", ""))
    return ",".join(parts) or "<none>"


def _pod_row(pod: Obj, now: datetime) -> list[Any]:
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    total = len(spec.get("containers") or [])
    ready = restarts = 0
    last_restart = ""
    reason = status.get("reason") or status.get("phase") or ""
    initializing = False
    inits = spec.get("initContainers") or []
    for i, cs in enumerate(status.get("initContainerStatuses") or []):
        restarts += cs.get("restartCount", 0)
        state = cs.get("state") or {}
        term, wait = state.get("terminated"), state.get("waiting")
        if term and term.get("exitCode") == 0:
            continue
        initializing = True
        if term:
            reason = "Init:" + (term.get("reason") or f"ExitCode:{term.get('exitCode')}")
        elif wait and wait.get("reason") and wait["reason"] != "PodInitializing":
            reason = "Init:" + wait["reason"]
        else:
            reason = f"Init:{i}/{len(inits)}"
        break
    if not initializing:
        restarts, running = 0, False
        for cs in reversed(status.get("containerStatuses") or []):
            restarts += cs.get("restartCount", 0)
            state = cs.get("state") or {}
            finished = ((cs.get("lastState") or {}).get("terminated") or {}).get("finishedAt")
            if finished and finished > last_restart:
                last_restart = finished
            term, wait = state.get("terminated"), state.get("waiting")
            if wait and wait.get("reason"):
                reason = wait["reason"]
            elif term and term.get("reason"):
                reason = term["reason"]
            elif term:
                reason = f"ExitCode:{term.get('exitCode')}"
            elif cs.get("ready") and state.get("running"):
                running = True
                ready += 1
        if reason == "Completed" and running:
            reason = "Running"
    if pod["metadata"].get("deletionTimestamp"):
        reason = "Unknown" if status.get("reason") == "NodeLost" else "Terminating"
    restart_text = str(restarts)
    if restarts and last_restart:
        restart_text = f"{restarts} ({_since(last_restart, now)} ago)"
    return [pod["metadata"]["name"], f"{ready}/{total}", reason, restart_text, _age(pod, now),
            _none(status.get("podIP")), _none(spec.get("nodeName")), _none(status.get("nominatedNodeName")),
            "<none>"]


def _node_row(node: Obj, now: datetime) -> list[Any]:
    status = node.get("status") or {}
    state = "Unknown"
    for c in status.get("conditions") or []:
        if c.get("type") == "Ready":
            state = "Ready" if c.get("status") == "True" else "NotReady"
    if (node.get("spec") or {}).get("unschedulable"):
        state += ",SchedulingDisabled"
    labels = node["metadata"].get("labels") or {}
    roles = sorted(k.split("/", 1)[1] for k in labels if k.startswith("node-role.kubernetes.io/") and "/" in k)
    info = status.get("nodeInfo") or {}
    addrs = {a.get("type"): a.get("address") for a in status.get("addresses") or []}
    return [node["metadata"]["name"], state, ",".join(r for r in roles if r) or "<none>", _age(node, now),
            info.get("kubeletVersion", ""), _none(addrs.get("InternalIP")), _none(addrs.get("ExternalIP")),
            info.get("osImage", "<unknown>"), info.get("kernelVersion", "<unknown>"),
            info.get("containerRuntimeVersion", "<unknown>")]


def _service_row(svc: Obj, now: datetime) -> list[Any]:
    spec, status = svc.get("spec") or {}, svc.get("status") or {}
    kind = spec.get("type", "ClusterIP")
    external = list(spec.get("externalIPs") or [])
    if kind == "LoadBalancer":
        # kubernetes pkg/printers/internalversion/printers.go, getServiceExternalIP and loadBalancerStatusStringer
        # (an entry's ip, else its hostname; entries with neither are skipped; the ingress before spec.externalIPs;
        # no 16-character cut: the server's TableConvertor prints with Wide set, pkg/printers/storage/storage.go).
        entries = (status.get("loadBalancer") or {}).get("ingress") or []
        ingress = [str(i.get("ip") or i.get("hostname")) for i in entries
                   if isinstance(i, dict) and (i.get("ip") or i.get("hostname"))]
        external = ingress + external or ["<pending>"]
    elif kind == "ExternalName":
        external = [spec.get("externalName", "")]
    ports = []
    for p in spec.get("ports") or []:
        node_port = f":{p['nodePort']}" if p.get("nodePort") else ""
        ports.append(f"{p.get('port')}{node_port}/{p.get('protocol', 'TCP')}")
    selector = ",".join(f"{k}={v}" for k, v in sorted((spec.get("selector") or {}).items()))
    return [svc["metadata"]["name"], kind, spec.get("clusterIP") or "<none>", ",".join(external) or "<none>",
            ",".join(ports) or "<none>", _age(svc, now), selector or "<none>"]


def _deployment_row(d: Obj, now: datetime) -> list[Any]:
    spec, st = d.get("spec") or {}, d.get("status") or {}
    return [d["metadata"]["name"], f"{st.get('readyReplicas', 0)}/{spec.get('replicas', 0)}",
            st.get("updatedReplicas", 0), st.get("availableReplicas", 0), _age(d, now),
            *_containers_images(d), _selector(d)]


def _daemonset_row(d: Obj, now: datetime) -> list[Any]:
    st = d.get("status") or {}
    node_selector = ((d.get("spec") or {}).get("template") or {}).get("spec", {}).get("nodeSelector") or {}
    ns_text = ",".join(f"{k}={v}" for k, v in sorted(node_selector.items())) or "<none>"
    return [d["metadata"]["name"], st.get("desiredNumberScheduled", 0), st.get("currentNumberScheduled", 0),
            st.get("numberReady", 0), st.get("updatedNumberScheduled", 0), st.get("numberAvailable", 0),
            ns_text, _age(d, now), *_containers_images(d), _selector(d)]


def _replicaset_row(r: Obj, now: datetime) -> list[Any]:
    st = r.get("status") or {}
    return [r["metadata"]["name"], (r.get("spec") or {}).get("replicas", 0), st.get("replicas", 0),
            st.get("readyReplicas", 0), _age(r, now), *_containers_images(r), _selector(r)]


def _statefulset_row(s: Obj, now: datetime) -> list[Any]:
    st = s.get("status") or {}
    return [s["metadata"]["name"], f"{st.get('readyReplicas', 0)}/{(s.get('spec') or {}).get('replicas', 0)}",
            _age(s, now), *_containers_images(s)]


def _endpoints_row(e: Obj, now: datetime) -> list[Any]:
    eps = []
    for subset in e.get("subsets") or []:
        for a in subset.get("addresses") or []:
            for p in subset.get("ports") or [{}]:
                eps.append(f"{a.get('ip')}:{p['port']}" if "port" in p else a.get("ip", ""))
    text = ",".join(eps[:3]) + (f" + {len(eps) - 3} more..." if len(eps) > 3 else "")
    return [e["metadata"]["name"], text or "<none>", _age(e, now)]


_COLUMNS: dict[str, tuple[list[Column], Callable[[Obj, datetime], list[Any]]]] = {
    "Pod": ([("Name", "string", 0), ("Ready", "string", 0), ("Status", "string", 0), ("Restarts", "string", 0),
             ("Age", "string", 0), ("IP", "string", 1), ("Node", "string", 1), ("Nominated Node", "string", 1),
             ("Readiness Gates", "string", 1)], _pod_row),
    "Node": ([("Name", "string", 0), ("Status", "string", 0), ("Roles", "string", 0), ("Age", "string", 0),
              ("Version", "string", 0), ("Internal-IP", "string", 1), ("External-IP", "string", 1),
              ("OS-Image", "string", 1), ("Kernel-Version", "string", 1), ("Container-Runtime", "string", 1)],
             _node_row),
    "Service": ([("Name", "string", 0), ("Type", "string", 0), ("Cluster-IP", "string", 0),
                 ("External-IP", "string", 0), ("Port(s)", "string", 0), ("Age", "string", 0),
                 ("Selector", "string", 1)], _service_row),
    "Deployment": ([("Name", "string", 0), ("Ready", "string", 0), ("Up-to-date", "integer", 0),
                    ("Available", "integer", 0), ("Age", "string", 0), ("Containers", "string", 1),
                    ("Images", "string", 1), ("Selector", "string", 1)], _deployment_row),
    "DaemonSet": ([("Name", "string", 0), ("Desired", "integer", 0), ("Current", "integer", 0),
                   ("Ready", "integer", 0), ("Up-to-date", "integer", 0), ("Available", "integer", 0),
                   ("Node Selector", "string", 0), ("Age", "string", 0), ("Containers", "string", 1),
                   ("Images", "string", 1), ("Selector", "string", 1)], _daemonset_row),
    "ReplicaSet": ([("Name", "string", 0), ("Desired", "integer", 0), ("Current", "integer", 0),
                    ("Ready", "integer", 0), ("Age", "string", 0), ("Containers", "string", 1),
                    ("Images", "string", 1), ("Selector", "string", 1)], _replicaset_row),
    "StatefulSet": ([("Name", "string", 0), ("Ready", "string", 0), ("Age", "string", 0),
                     ("Containers", "string", 1), ("Images", "string", 1)], _statefulset_row),
    "Namespace": ([("Name", "string", 0), ("Status", "string", 0), ("Age", "string", 0)],
                  lambda o, now: [o["metadata"]["name"], (o.get("status") or {}).get("phase", ""), _age(o, now)]),
    "ConfigMap": ([("Name", "string", 0), ("Data", "integer", 0), ("Age", "string", 0)],
                  lambda o, now: [o["metadata"]["name"], len(o.get("data") or {}) + len(o.get("binaryData") or {}),
                                  _age(o, now)]),
    "Secret": ([("Name", "string", 0), ("Type", "string", 0), ("Data", "integer", 0), ("Age", "string", 0)],
               lambda o, now: [o["metadata"]["name"], o.get("type", ""), len(o.get("data") or {}), _age(o, now)]),
    "ServiceAccount": ([("Name", "string", 0), ("Secrets", "integer", 0), ("Age", "string", 0)],
                       lambda o, now: [o["metadata"]["name"], len(o.get("secrets") or []), _age(o, now)]),
    "Endpoints": ([("Name", "string", 0), ("Endpoints", "string", 0), ("Age", "string", 0)], _endpoints_row),
    "Lease": ([("Name", "string", 0), ("Holder", "string", 0), ("Age", "string", 0)],
              lambda o, now: [o["metadata"]["name"], (o.get("spec") or {}).get("holderIdentity", ""), _age(o, now)]),
}
_GENERIC: tuple[list[Column], Callable[[Obj, datetime], list[Any]]] = (
    [("Name", "string", 0), ("Age", "string", 0)],
    lambda o, now: [o["metadata"]["name"], _age(o, now)],
)
_DESCRIPTIONS = {
    "Name": "Name must be unique within a namespace. Is required when creating resources, although some "
            "resources may allow a client to request the generation of an appropriate name automatically.",
    "Age": "CreationTimestamp is a timestamp representing the server time when this object was created.",
}


def column_definitions(rt: ResourceType) -> list[dict[str, Any]]:
    columns, _ = _COLUMNS.get(rt.kind, _GENERIC)
    return [
        {"name": name, "type": typ, "format": "name" if name == "Name" else "", "priority": prio,
         "description": _DESCRIPTIONS.get(name, name)}
        for name, typ, prio in columns
    ]


def _row_object(obj: Obj, include: str) -> Obj | None:
    if include == "None":
        return None
    if include == "Object":
        return obj
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}


def table(
    rt: ResourceType, objs: list[Obj], *, table_version: str, resource_version: str, include_object: str,
    with_columns: bool = True,
) -> Obj:
    _, row_fn = _COLUMNS.get(rt.kind, _GENERIC)
    now = datetime.now(UTC)
    rows = []
    for o in objs:
        row: Obj = {"cells": row_fn(o, now)}
        ro = _row_object(o, include_object)
        if ro is not None:
            row["object"] = ro
        rows.append(row)
    return {
        "kind": "Table",
        "apiVersion": f"meta.k8s.io/{table_version}",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": column_definitions(rt) if with_columns else [],
        "rows": rows,
    }
