"""controller-manager and scheduler stand-ins, run as static pods by the kubelet against the API
simulator, checked with the real kubectl: Deployments (rollout, rolling update, scale), DaemonSets,
Endpoints, ServiceAccounts, taints and unschedulable pods."""

from __future__ import annotations

import re
import signal
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_kubelet_support import (
    CONTROL_PLANE_IMAGES,
    Cluster,
    Pki,
    free_port,
    kill_group,
    pod_is_ready,
    running_cluster,
    scratch_images,
    start_tool,
    wait_for,
    waiting_reason,
    write_kubeconfig,
)

from simnode.host import VM_ADDRESS, prepare_host
from simnode.machine import can_assign
from simnode.paths import NodeRoot


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with scratch_images([*CONTROL_PLANE_IMAGES, "app", "app2"]) as images, running_cluster(
        tmp_path_factory.mktemp("controllers") / "node", images
    ) as c:
        yield c


def deployment(name: str, image: str, replicas: int = 2, namespace: str = "default") -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": namespace},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": "app", "image": image,
                                                       "ports": [{"name": "http", "containerPort": 8080}]}]}}},
    }


def pods_of(cluster: Cluster, selector: str, namespace: str = "default") -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.get("pods", "-n", namespace, "-l", selector)["items"]
    return items


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == kind)


def test_deployment_rollout_update_and_scale(cluster: Cluster) -> None:
    cluster.apply(deployment("web", cluster.images["app"]))
    out = cluster.kubectl("rollout", "status", "deployment/web", "--timeout=40s").stdout
    assert "successfully rolled out" in out
    dep = cluster.get("deployment", "web")
    status = dep["status"]
    assert (status["replicas"], status["readyReplicas"], status["availableReplicas"], status["updatedReplicas"]) == (
        2, 2, 2, 2)
    assert status["observedGeneration"] == dep["metadata"]["generation"]
    assert condition(dep, "Available")["status"] == "True"
    assert condition(dep, "Available")["reason"] == "MinimumReplicasAvailable"
    assert condition(dep, "Progressing")["reason"] == "NewReplicaSetAvailable"
    [rs] = cluster.get("replicasets", "-l", "app=web")["items"]
    digest = rs["metadata"]["labels"]["pod-template-hash"]
    assert rs["metadata"]["name"] == f"web-{digest}"
    assert rs["metadata"]["ownerReferences"][0]["kind"] == "Deployment"
    pods = pods_of(cluster, "app=web")
    assert len(pods) == 2
    for pod in pods:
        assert re.fullmatch(rf"web-{digest}-[a-z0-9]{{5}}", pod["metadata"]["name"])
        assert pod["metadata"]["ownerReferences"][0]["name"] == rs["metadata"]["name"]
        assert pod["spec"]["nodeName"] == "node1" and pod_is_ready(pod)

    # Rolling update: a new ReplicaSet comes up, the old one goes to 0.
    cluster.kubectl("set", "image", "deployment/web", f"app={cluster.images['app2']}")
    assert "successfully rolled out" in cluster.kubectl("rollout", "status", "deployment/web", "--timeout=40s").stdout
    rss = {r["metadata"]["name"]: r for r in cluster.get("replicasets", "-l", "app=web")["items"]}
    assert len(rss) == 2
    old = rss[f"web-{digest}"]
    new = next(r for n, r in rss.items() if n != f"web-{digest}")
    assert old["spec"]["replicas"] == 0 and new["spec"]["replicas"] == 2
    assert new["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"
    wait_for(lambda: {p["spec"]["containers"][0]["image"] for p in pods_of(cluster, "app=web")}
             == {cluster.images["app2"]} and len(pods_of(cluster, "app=web")) == 2, timeout_s=20,
             what="only new pods left")

    cluster.kubectl("scale", "deployment/web", "--replicas=1")
    wait_for(lambda: len(pods_of(cluster, "app=web")) == 1
             and cluster.get("deployment", "web")["status"].get("replicas") == 1, timeout_s=20, what="scaled to 1")


def test_unavailable_deployment(cluster: Cluster) -> None:
    missing = cluster.images["app"].replace("/app:", "/nothing-here:")
    cluster.apply(deployment("broken", missing, replicas=1))
    try:
        wait_for(lambda: any(waiting_reason(p) in ("ErrImagePull", "ImagePullBackOff")
                             for p in pods_of(cluster, "app=broken")), timeout_s=20, what="ErrImagePull")
        dep = wait_for(lambda: (d := cluster.get("deployment", "broken")).get("status", {}).get("conditions") and d,
                       timeout_s=10, what="deployment status")
        assert condition(dep, "Available")["status"] == "False"
        assert condition(dep, "Available")["reason"] == "MinimumReplicasUnavailable"
        result = cluster.kubectl("rollout", "status", "deployment/broken", "--timeout=2s", check=False)
        assert result.returncode != 0
    finally:
        cluster.kubectl("delete", "deployment", "broken")


def test_daemonset_one_pod_per_ready_node(cluster: Cluster) -> None:
    labels = {"app": "agent"}
    cluster.apply({
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent", "namespace": "kube-system"},
        "spec": {"selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": "agent", "image": cluster.images["app"]}]}}},
    })

    def ready() -> Any:
        ds = cluster.get("daemonset", "-n", "kube-system", "agent")
        s = ds.get("status") or {}
        return ds if s.get("desiredNumberScheduled") == 1 and s.get("numberReady") == 1 else None

    ds = wait_for(ready, timeout_s=30, what="daemonset ready")
    assert ds["status"]["updatedNumberScheduled"] == 1 and ds["status"]["numberAvailable"] == 1
    [pod] = pods_of(cluster, "app=agent", "kube-system")
    assert pod["spec"]["nodeName"] == "node1" and pod_is_ready(pod)
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "DaemonSet"
    assert "rolled out" in cluster.kubectl("rollout", "status", "-n", "kube-system", "daemonset/agent",
                                           "--timeout=20s").stdout


def test_service_endpoints_and_default_serviceaccount(cluster: Cluster) -> None:
    cluster.kubectl("create", "namespace", "shop")
    wait_for(lambda: cluster.kubectl("get", "serviceaccount", "-n", "shop", "default", check=False).returncode == 0,
             timeout_s=10, what="default serviceaccount")
    cluster.apply(deployment("api", cluster.images["app"], replicas=2, namespace="shop"))
    cluster.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api", "namespace": "shop"},
                   "spec": {"selector": {"app": "api"}, "ports": [{"port": 80, "targetPort": "http"}]}})

    def endpoint_ips() -> Any:
        ep = cluster.get("endpoints", "-n", "shop", "api")
        ips = sorted(a["ip"] for s in ep.get("subsets") or [] for a in s.get("addresses") or [])
        return ips if len(ips) == 2 else None

    ips = wait_for(endpoint_ips, timeout_s=30, what="two ready endpoints")
    assert ips == sorted(p["status"]["podIP"] for p in pods_of(cluster, "app=api", "shop"))
    ep = cluster.get("endpoints", "-n", "shop", "api")
    assert ep["subsets"][0]["ports"] == [{"port": 8080, "protocol": "TCP"}]
    cluster.kubectl("delete", "namespace", "shop")


def test_scheduler_respects_taints(cluster: Cluster) -> None:
    cluster.kubectl("taint", "nodes", "node1", "dedicated=db:NoSchedule")
    try:
        cluster.kubectl("run", "waiter", f"--image={cluster.images['app']}", "--restart=Never")

        def unschedulable() -> Any:
            pod = cluster.pod("waiter", "default")
            cond = next((c for c in pod["status"].get("conditions") or [] if c["type"] == "PodScheduled"), None)
            return cond if cond and cond["status"] == "False" else None

        cond = wait_for(unschedulable, timeout_s=15, what="PodScheduled=False")
        assert cond["reason"] == "Unschedulable"
        assert "untolerated taint {dedicated: db}" in cond["message"]
        assert not cluster.pod("waiter", "default")["spec"].get("nodeName")
    finally:
        cluster.kubectl("taint", "nodes", "node1", "dedicated-")
    pod = cluster.wait_pod("waiter", pod_is_ready, namespace="default", what="scheduled once the taint is gone")
    assert pod["spec"]["nodeName"] == "node1"
    cluster.kubectl("delete", "pod", "waiter", "--wait=false")


@pytest.mark.parametrize("tool", ["kube-controller-manager", "kube-scheduler", "etcd"])
def test_components_exit_0_on_sigterm(tmp_path: Path, tool: str) -> None:
    """Without an API server they keep retrying; SIGTERM ends them cleanly. Bad flags exit 1."""
    pki = Pki.create()
    cert, key = pki.issue("system:kube-scheduler")
    conf = write_kubeconfig(tmp_path / "etc/kubernetes/c.conf", f"https://127.0.0.1:{free_port()}", pki, cert, key)
    metrics = free_port()
    args = {"etcd": ["--data-dir=/var/lib/etcd", f"--listen-metrics-urls=http://127.0.0.1:{metrics}"]}.get(
        tool, ["--kubeconfig=/etc/kubernetes/c.conf", "--leader-elect=true", "--bind-address=127.0.0.1", "--v=4"])
    assert conf.exists()
    proc = start_tool(tool, args, tmp_path, tmp_path / "out.log")
    try:
        if tool == "etcd":
            wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics}/readyz", timeout=1).read() == b"ok",
                     timeout_s=15, what="etcd /readyz")
            assert (tmp_path / "var/lib/etcd/member").is_dir()
        else:
            # With --v=4 the informers log each failed list: proof the loop runs and retries.
            wait_for(lambda: "relisting" in (tmp_path / "out.log").read_text(), timeout_s=15,
                     what=f"{tool} retrying")
        assert proc.poll() is None, (tmp_path / "out.log").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        kill_group(proc)
    bad = start_tool(tool, ["stray-argument"], tmp_path, tmp_path / "bad.log")
    assert bad.wait(timeout=30) == 1
    assert "unexpected argument 'stray-argument'" in (tmp_path / "bad.log").read_text()


def test_etcd_exits_when_its_listen_address_is_not_the_nodes(tmp_path: Path) -> None:
    """Docker Desktop's 192.168.65.3 on a plain VM (10.0.2.15): etcd cannot bind it and exits before writing."""
    prepare_host(tmp_path)
    args = ["--data-dir=/var/lib/etcd", "--listen-client-urls=https://127.0.0.1:2379,https://192.168.65.3:2379",
            "--listen-peer-urls=https://192.168.65.3:2380", f"--listen-metrics-urls=http://127.0.0.1:{free_port()}"]
    proc = start_tool("etcd", args, tmp_path, tmp_path / "out.log")
    try:
        assert proc.wait(timeout=30) == 1
    finally:
        kill_group(proc)
    log = (tmp_path / "out.log").read_text()
    assert '"msg": "discovery failed"' in log
    assert "listen tcp 192.168.65.3:2380: bind: cannot assign requested address" in log
    assert not (tmp_path / "var/lib/etcd").exists()
    assert can_assign(NodeRoot(tmp_path), VM_ADDRESS) and can_assign(NodeRoot(tmp_path), "127.0.0.1")
    assert not can_assign(NodeRoot(tmp_path), "192.168.65.3")
