"""The pure parts of the kubelet, readiness and addons states: manifests, kubelet flags, pod and workload status."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from lifecycle.config import AddonsConfig
from lifecycle.errors import PermanentError
from states.addons import DEFAULT_CLASS_ANNOTATION as DEFAULT_CLASS
from states.addons import load_manifests, object_problem, workload_problem
from states.kubeadm import redact
from states.kubelet import kubeadm_flags
from states.readiness import not_ready_error, unmet_components

DEPLOY_ADDONS = Path(__file__).resolve().parents[2] / "deploy" / "addons"


MIRROR = AddonsConfig(storage_provisioner_image="{repo}/rancher/local-path-provisioner:v0.0.37",
                      storage_helper_image="{repo}/library/busybox:1.37.0")


def test_the_shipped_storage_addon_is_upstreams_local_path_provisioner_with_the_configured_images() -> None:
    repo = "registry.example:5000/mirror"
    objects = load_manifests(DEPLOY_ADDONS, placeholders={"IMAGE_REPOSITORY": repo, **MIRROR.images(repo)})
    kinds = {(o.kind, o.name) for o in objects}
    assert ("Deployment", "local-path-provisioner") in kinds and ("Namespace", "local-path-storage") in kinds
    assert not any("lb-forwarder" in name for _, name in kinds)  # the LoadBalancer moves into the service
    [storage_class] = [o.body for o in objects if o.kind == "StorageClass"]
    assert storage_class["provisioner"] == "rancher.io/local-path"
    assert storage_class["volumeBindingMode"] == "WaitForFirstConsumer"
    assert storage_class["reclaimPolicy"] == "Delete"
    assert storage_class["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] == "true"
    images = [c["image"] for o in objects if o.kind == "Deployment"
              for c in o.body["spec"]["template"]["spec"]["containers"]]
    assert images == [f"{repo}/rancher/local-path-provisioner:v0.0.37"]
    [config_map] = [o.body for o in objects if o.kind == "ConfigMap"]
    helper = yaml.safe_load(config_map["data"]["helperPod.yaml"])
    assert helper["spec"]["containers"][0]["image"] == f"{repo}/library/busybox:1.37.0"
    assert json.loads(config_map["data"]["config.json"])["nodePathMap"][0]["paths"] == ["/opt/local-path-provisioner"]
    for obj in objects:
        if obj.kind == "Deployment":  # a selector that does not match its template is rejected by real servers
            spec = obj.body["spec"]
            labels = spec["template"]["metadata"]["labels"]
            assert all(labels.get(k) == v for k, v in spec["selector"]["matchLabels"].items())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kind: ConfigMap\nmetadata: {name: a}\n", "document 0: missing apiVersion"),
        ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\napiVersion: v1\nkind: ConfigMap\n",
         "document 1: missing metadata.name"),
        ("- just\n- a list\n", "document 0: expected a mapping"),
        ("apiVersion: v1\nkind: [unclosed\n", "not valid YAML"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: ${POD_NAME}}\n", "unknown placeholder ${POD_NAME}"),
    ],
)
def test_a_bad_manifest_is_rejected_naming_file_and_document(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "10-good.yaml").write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: fine}\n")
    (tmp_path / "20-bad.yaml").write_text(text)
    with pytest.raises(PermanentError) as caught:
        load_manifests(tmp_path, placeholders={"IMAGE_REPOSITORY": "r"})
    assert f"{tmp_path / '20-bad.yaml'}" in caught.value.message
    assert expected in caught.value.message
    assert caught.value.code == "bad_manifest"


def test_a_missing_manifests_dir_is_named(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="is not a directory"):
        load_manifests(tmp_path / "absent", placeholders={"IMAGE_REPOSITORY": "r"})


def test_kubeadm_flags_are_split_like_systemd_expands_them(tmp_path: Path) -> None:
    env = tmp_path / "kubeadm-flags.env"
    env.write_text('KUBELET_KUBEADM_ARGS="--container-runtime-endpoint=unix:///run/x.sock '
                   '--pod-infra-container-image=r/pause:3.10 --node-ip=10.0.0.5"\n')
    assert kubeadm_flags(env) == ["--container-runtime-endpoint=unix:///run/x.sock",
                                  "--pod-infra-container-image=r/pause:3.10", "--node-ip=10.0.0.5"]
    env.write_text('KUBELET_KUBEADM_ARGS="--node-ip=1.2.3.4\n')
    with pytest.raises(PermanentError, match="cannot be parsed"):
        kubeadm_flags(env)
    with pytest.raises(PermanentError, match="is missing"):
        kubeadm_flags(tmp_path / "absent.env")


def _pod(name: str, *, labels: dict[str, str], ready: bool, waiting: str | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Running" if ready or waiting is None else "Pending",
                              "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if waiting:
        status["containerStatuses"] = [{"name": "c", "state": {"waiting": {"reason": waiting}}}]
    return {"metadata": {"name": name, "uid": name, "labels": labels}, "status": status}


def test_unmet_components_say_why_per_component() -> None:
    pods = [
        _pod("kube-apiserver-node", labels={"component": "kube-apiserver"}, ready=True),
        _pod("coredns-1", labels={"k8s-app": "kube-dns"}, ready=False, waiting="ErrImagePull"),
        _pod("coredns-2", labels={"k8s-app": "kube-dns"}, ready=False, waiting="ImagePullBackOff"),
    ]
    unmet = unmet_components(("kube-apiserver", "kube-controller-manager", "coredns"), pods)
    assert unmet == {"kube-controller-manager": "no pod", "coredns": "0/2 ready (ErrImagePull, ImagePullBackOff)"}
    error = not_ready_error(unmet, api_error=None)
    assert isinstance(error, PermanentError)  # waiting does not bring an image
    assert "coredns: 0/2 ready (ErrImagePull, ImagePullBackOff)" in error.message
    slow = not_ready_error({"coredns": "1/2 ready (not Ready)"}, api_error=None)
    assert slow.retryable


def test_workload_availability() -> None:
    deployment: dict[str, Any] = {"kind": "Deployment", "metadata": {"generation": 2}, "spec": {"replicas": 1},
                                  "status": {"observedGeneration": 2, "availableReplicas": 1,
                                             "conditions": [{"type": "Available", "status": "True"}]}}
    assert workload_problem(deployment) is None
    deployment["status"]["observedGeneration"] = 1
    assert workload_problem(deployment) == "status not yet updated by the controller"
    daemonset: dict[str, Any] = {"kind": "DaemonSet", "status": {"desiredNumberScheduled": 1, "numberAvailable": 0}}
    assert workload_problem(daemonset) == "0/1 available"
    daemonset["status"]["numberAvailable"] = 1
    assert workload_problem(daemonset) is None


def test_bootstrap_tokens_are_redacted_from_kubeadm_output() -> None:
    assert redact("[bootstrap-token] Using token: abcdef.0123456789abcdef") == (
        "[bootstrap-token] Using token: abcdef.<redacted>")
    assert "0123456789abcdef" not in redact("kubeadm join h:6443 --token abcdef.0123456789abcdef")
    line = '[certs] apiserver serving cert is signed for DNS names [kubernetes.default.svc] and IPs [10.96.0.1]'
    assert redact(line) == line


def test_the_addons_state_requires_local_path_to_stay_the_default_class() -> None:
    objects = load_manifests(DEPLOY_ADDONS, placeholders={"IMAGE_REPOSITORY": "r", **MIRROR.images("r")})
    [storage_class] = [o for o in objects if o.kind == "StorageClass"]
    live = {"metadata": {"name": "local-path", "annotations": {DEFAULT_CLASS: "true"}}}
    assert object_problem(storage_class, live) is None
    live["metadata"]["annotations"][DEFAULT_CLASS] = "false"  # someone made another class the default
    assert object_problem(storage_class, live) == "StorageClass local-path is no longer the default class"
