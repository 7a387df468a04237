"""Kubelet stand-in with the real API simulator it starts itself, checked with the real kubectl: node
registration, mirror pods, image errors, API pod status and faults, kubelet restart adopting the apiserver."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_kubelet_support import (
    CONTROL_PLANE_IMAGES,
    FAST_FAULTS,
    Cluster,
    pid_alive,
    pod_is_ready,
    running_cluster,
    scratch_images,
    wait_for,
    waiting_reason,
)

MIRRORS = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with scratch_images([*CONTROL_PLANE_IMAGES, "app"]) as images, running_cluster(
        tmp_path_factory.mktemp("kubelet-api") / "node", images
    ) as c:
        yield c


def pod_body(name: str, image: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"nodeName": "node1", "containers": [{"name": "main", "image": image}], **spec}}


def test_node_registered(cluster: Cluster) -> None:
    node = cluster.get("node", "node1")  # the name comes from the kubelet.conf certificate CN
    labels = node["metadata"]["labels"]
    assert labels["kubernetes.io/hostname"] == "node1"
    assert labels["kubernetes.io/os"] == "linux" and labels["kubernetes.io/arch"]
    status = node["status"]
    assert {"type": "InternalIP", "address": "127.0.0.1"} in status["addresses"]
    assert {"type": "Hostname", "address": "node1"} in status["addresses"]
    assert status["nodeInfo"]["kubeletVersion"] == "v1.31.4"
    assert status["nodeInfo"]["containerRuntimeVersion"].startswith("docker://")
    assert status["capacity"]["pods"] == "110"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True" and ready["reason"] == "KubeletReady"
    lease = cluster.get("lease", "-n", "kube-node-lease", "node1")
    assert lease["spec"]["holderIdentity"] == "node1" and lease["spec"]["renewTime"]
    # The controller-manager allocates the pod CIDR from --cluster-cidr.
    wait_for(lambda: cluster.get("node", "node1")["spec"].get("podCIDR") == "10.244.0.0/24", timeout_s=10,
             what="podCIDR")
    out = cluster.kubectl("get", "nodes").stdout
    assert "node1" in out and " Ready " in out


def test_mirror_pods_running_and_ready(cluster: Cluster) -> None:
    for name in MIRRORS:
        pod = cluster.wait_pod(f"{name}-node1", pod_is_ready, what=f"{name} mirror pod Ready")
        meta, status = pod["metadata"], pod["status"]
        assert meta["annotations"]["kubernetes.io/config.source"] == "file"
        assert meta["annotations"]["kubernetes.io/config.mirror"]
        assert meta["ownerReferences"][0]["kind"] == "Node" and meta["ownerReferences"][0]["name"] == "node1"
        assert pod["spec"]["nodeName"] == "node1"
        assert status["podIP"] == "127.0.0.1"
        cs = status["containerStatuses"][0]
        assert cs["ready"] and cs["started"] and cs["restartCount"] == 0 and "running" in cs["state"]
    out = cluster.kubectl("get", "pods", "-n", "kube-system").stdout
    assert out.count("Running") == 4 and out.count("1/1") == 4


def test_static_pod_with_missing_image(cluster: Cluster) -> None:
    missing = cluster.images["app"].replace("/app:", "/does-not-exist:")
    manifest = cluster.write_manifest({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ghost", "namespace": "kube-system"},
        "spec": {"hostNetwork": True, "containers": [{"name": "ghost", "image": missing}]}})
    try:
        pod = cluster.wait_pod("ghost-node1", lambda p: waiting_reason(p) in ("ErrImagePull", "ImagePullBackOff"),
                               what="ghost ErrImagePull")
        assert pod["status"]["phase"] == "Pending"
        assert missing in pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
        cluster.wait_pod("ghost-node1", lambda p: waiting_reason(p) == "ImagePullBackOff", what="back-off")
    finally:
        manifest.unlink()
    wait_for(lambda: cluster.kubectl("get", "pod", "-n", "kube-system", "ghost-node1", check=False).returncode != 0,
             timeout_s=10, what="mirror pod removed with its manifest")


def test_deleted_mirror_pod_is_recreated(cluster: Cluster) -> None:
    old_uid = cluster.pod("kube-scheduler-node1")["metadata"]["uid"]
    cluster.kubectl("delete", "pod", "-n", "kube-system", "kube-scheduler-node1")
    pod = cluster.wait_pod("kube-scheduler-node1", lambda p: p["metadata"]["uid"] != old_uid and pod_is_ready(p),
                           what="mirror pod recreated")
    assert pod["metadata"]["annotations"]["kubernetes.io/config.mirror"]


def test_api_pods_bound_to_the_node(cluster: Cluster) -> None:
    # A readiness probe on a container without a process (like coredns' :8181/ready) cannot be answered:
    # such containers are Ready after the delays.
    probe = {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 1}
    web_body = pod_body("web", cluster.images["app"])
    web_body["spec"]["containers"][0].update(args=["-conf", "/etc/coredns/Corefile"], readinessProbe=probe)
    cluster.apply(web_body)
    missing = cluster.images["app"].replace("/app:", "/missing:")
    cluster.apply(pod_body("broken", missing))
    try:
        web = cluster.wait_pod("web", pod_is_ready, namespace="default", what="web Ready")
        assert web["status"]["podIP"].startswith("10.244.0."), "pod IP comes from the node's pod CIDR"
        assert web["status"]["hostIP"] == "127.0.0.1"
        broken = cluster.wait_pod("broken", lambda p: waiting_reason(p) in ("ErrImagePull", "ImagePullBackOff"),
                                  namespace="default", what="broken ErrImagePull")
        assert broken["status"]["phase"] == "Pending"
        assert not broken["status"]["containerStatuses"][0]["ready"]
    finally:
        cluster.kubectl("delete", "pod", "web", "broken", "--wait=false")
    wait_for(lambda: "web" not in cluster.kubectl("get", "pods", "-o", "name").stdout, timeout_s=10,
             what="pods deleted")


def test_crashloop_fault(cluster: Cluster) -> None:
    cluster.set_faults({**FAST_FAULTS, "crashloop_pods": ["crashy"]})
    cluster.apply(pod_body("crashy", cluster.images["app"]))
    try:
        pod = cluster.wait_pod("crashy", lambda p: waiting_reason(p) == "CrashLoopBackOff"
                               and p["status"]["containerStatuses"][0]["restartCount"] >= 2,
                               namespace="default", timeout_s=30, what="CrashLoopBackOff with restarts")
        cs = pod["status"]["containerStatuses"][0]
        assert not cs["ready"] and cs["lastState"]["terminated"]["exitCode"] == 1
        assert not pod_is_ready(pod)
        assert "CrashLoopBackOff" in cluster.kubectl("get", "pod", "crashy").stdout
        # Lifting the fault lets the container run and become Ready again (restart count kept).
        cluster.set_faults(FAST_FAULTS)
        pod = cluster.wait_pod("crashy", pod_is_ready, namespace="default", timeout_s=30, what="crashy recovers")
        assert pod["status"]["containerStatuses"][0]["restartCount"] >= 2
    finally:
        cluster.set_faults(FAST_FAULTS)
        cluster.kubectl("delete", "pod", "crashy", "--wait=false")


def test_kubelet_restart_adopts_the_apiserver(cluster: Cluster) -> None:
    records = json.loads((cluster.root / "var/lib/kubelet/simnode/pods.json").read_text())
    pid = records["kube-system/kube-apiserver"]["containers"]["kube-apiserver"]["pid"]
    assert pid_alive(pid)
    node_uid = cluster.get("node", "node1")["metadata"]["uid"]
    before = cluster.pod("kube-apiserver-node1")["status"]
    start_time = before["startTime"]
    ready_since = next(c for c in before["conditions"] if c["type"] == "Ready")["lastTransitionTime"]
    sessions = cluster.kubelet_log.read_text().count("registered at")
    assert cluster.stop_kubelet(signal.SIGTERM) == 0
    # The API keeps serving without a kubelet, as real static pods do.
    assert cluster.kubectl("get", "--raw", "/readyz").stdout == "ok"
    cluster.start_kubelet()
    wait_for(lambda: "adopted running kube-system/kube-apiserver" in cluster.kubelet_log.read_text(),
             timeout_s=15, what="adoption logged")
    records = json.loads((cluster.root / "var/lib/kubelet/simnode/pods.json").read_text())
    assert records["kube-system/kube-apiserver"]["containers"]["kube-apiserver"]["pid"] == pid
    log = (cluster.root / "var/log/pods/kube-system_kube-apiserver/kube-apiserver.log").read_text()
    assert log.count("start kube-apiserver") == 1
    wait_for(lambda: cluster.kubelet_log.read_text().count("registered at") > sessions, timeout_s=15,
             what="new API session")
    time.sleep(1)  # a few sync passes: the new kubelet has posted whatever status it computes
    pod = cluster.wait_pod("kube-apiserver-node1", pod_is_ready, what="apiserver mirror still Ready")
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
    assert pod["status"]["startTime"] == start_time
    assert next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")["lastTransitionTime"] == ready_since
    assert pid_alive(pid)
    assert cluster.get("node", "node1")["metadata"]["uid"] == node_uid
    state = json.loads((cluster.root / "var/lib/kubelet/simnode/state.json").read_text())
    assert state["node"] == {"name": "node1", "uid": node_uid}


def test_bootstrap_kubeconfig_until_kubeconfig_exists(cluster: Cluster) -> None:
    """Without kubelet.conf the kubelet uses --bootstrap-kubeconfig, and switches once kubelet.conf appears."""
    assert cluster.stop_kubelet() == 0
    kubeconfig = cluster.root / "etc/kubernetes/kubelet.conf"
    bootstrap = cluster.root / "etc/kubernetes/bootstrap-kubelet.conf"
    kubeconfig.rename(bootstrap)
    start = len(cluster.kubelet_log.read_text())
    cluster.start_kubelet()
    try:
        wait_for(lambda: "using /etc/kubernetes/bootstrap-kubelet.conf" in cluster.kubelet_log.read_text()[start:],
                 timeout_s=15, what="session with the bootstrap kubeconfig")
    finally:
        bootstrap.rename(kubeconfig)
    wait_for(lambda: "using /etc/kubernetes/kubelet.conf" in cluster.kubelet_log.read_text()[start:],
             timeout_s=15, what="session with kubelet.conf")
    cluster.wait_pod("kube-apiserver-node1", pod_is_ready, what="apiserver mirror Ready")


def test_apiserver_readiness_probe(cluster: Cluster) -> None:
    """The kubelet probes the apiserver's /readyz as the manifest says: never-ready -> mirror pod not Ready."""
    cluster.set_faults({**FAST_FAULTS, "apiserver_never_ready": True})
    try:
        pod = cluster.wait_pod("kube-apiserver-node1", lambda p: not pod_is_ready(p), what="apiserver unready")
        assert pod["status"]["phase"] == "Running"
        assert pod["status"]["containerStatuses"][0]["started"]
    finally:
        cluster.set_faults(FAST_FAULTS)
    cluster.wait_pod("kube-apiserver-node1", pod_is_ready, what="apiserver Ready again")
