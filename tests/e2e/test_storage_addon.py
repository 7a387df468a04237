"""The storage addon (rancher/local-path-provisioner's manifest) on the simulated node, with the real kubectl:
the addons state notices a provisioner whose ClusterRole lacks a rule, the upstream roles make it Ready, a claim
gets a hostPath volume under the node root when a pod uses it (WaitForFirstConsumer), deleting the claim removes
volume and directory, the service account is held to its RBAC rules, and a provisioner that may not create
PersistentVolumes leaves the claim Pending with the 403 in its events."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from conftest import SimImages
from test_steps_on_simnode import REPO, Node, _kubectl, _kubectl_json, make_node  # noqa: F401 (fixture)

from lifecycle.errors import StepError
from states import build_plan
from states.addons import Addons

SA = "system:serviceaccount:local-path-storage:local-path-provisioner-service-account"
VOLUMES_DIR = "/opt/local-path-provisioner"  # upstream's nodePathMap default


def _variant_without_pv_list(tmp_path: Path) -> Path:
    """deploy/addons with the provisioner's ClusterRole lacking `list` on persistentvolumes."""
    out = tmp_path / "addons-variant"
    out.mkdir()
    text = (REPO / "deploy/addons/local-path-storage.yaml").read_text()
    docs = list(yaml.safe_load_all(text))
    for doc in docs:
        if doc and doc["kind"] == "ClusterRole":
            for rule in doc["rules"]:
                if rule["resources"] == ["persistentvolumes"]:
                    rule["verbs"] = [v for v in rule["verbs"] if v != "list"]
    (out / "local-path-storage.yaml").write_text(yaml.safe_dump_all(docs))
    return out


def _kubectl_run(node: Node, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kubectl", f"--kubeconfig={node.paths.admin_conf}", *args], input=stdin,
                          capture_output=True, text=True, timeout=30)


def _claim_and_pod(name: str) -> str:
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": "default"},
             "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "128Mi"}}}}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{name}-user", "namespace": "default"},
           "spec": {"tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists",
                                     "effect": "NoSchedule"}],
                    "containers": [{"name": "main", "image": "registry.invalid/any:1",
                                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                    "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": name}}]}}
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": [claim, pod]})


async def _until(what: str, check: Callable[[], object], timeout_s: float = 30.0) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.3)


def _events(node: Node, claim: str) -> list[dict[str, str]]:
    items = _kubectl_json(node, "get", "events", "-n", "default",
                          f"--field-selector=involvedObject.name={claim}")["items"]
    return [{"reason": e["reason"], "message": e["message"]} for e in items]  # type: ignore[attr-defined]


async def test_local_path_storage_provisions_and_deletes_volumes_under_rbac(
    sim_images: SimImages, make_node: Callable[..., Node], tmp_path: Path  # noqa: F811 (fixture)
) -> None:
    node = make_node("storage")
    # Every state of the service's own plan up to the addons (whatever states come before them).
    for step in build_plan():
        if step.name == "addons":
            break
        ctx = node.ctx(step.name)
        if not await step.is_done(ctx):
            await step.run(ctx)

    # 1. A ClusterRole without `list` on persistentvolumes: the provisioner's /ready fails, so the addons
    #    state reports the Deployment not available instead of passing.
    variant = replace(node, config=replace(node.config, addons=replace(
        node.config.addons, manifests_dir=_variant_without_pv_list(tmp_path))))
    with pytest.raises(StepError) as caught:
        await Addons().run(variant.ctx("addons", timeout_s=12))
    assert "Deployment local-path-storage/local-path-provisioner" in caught.value.message
    assert not await Addons().is_done(variant.ctx("addons"))
    log_dir = node.paths.under("/var/log/pods")
    logs = "".join(p.read_text() for p in log_dir.glob("local-path-storage_local-path-provisioner-*/*.log"))
    assert (f'persistentvolumes is forbidden: User \\"{SA}\\" cannot list resource \\"persistentvolumes\\" '
            'in API group \\"\\" at the cluster scope') in logs

    # 2. The upstream roles, applied again by the addons state: the same pod becomes Ready.
    await Addons().run(node.ctx("addons", timeout_s=60))
    assert await Addons().is_done(node.ctx("addons"))

    # 3. The service account is held to its roles (impersonated by the admin, as `kubectl --as` does).
    assert _kubectl_run(node, f"--as={SA}", "get", "pv").returncode == 0
    denied = _kubectl_run(node, f"--as={SA}", "-n", "kube-system", "get", "secrets")
    assert denied.returncode != 0
    assert denied.stderr.strip() == (f'Error from server (Forbidden): secrets is forbidden: User "{SA}" cannot list '
                                     'resource "secrets" in API group "" in the namespace "kube-system"')

    # 4. A claim without a class gets local-path; it waits for its first consumer, then gets a volume.
    assert _kubectl_run(node, "apply", "-f", "-", stdin=json.dumps(
        json.loads(_claim_and_pod("data"))["items"][0])).returncode == 0
    claim = _kubectl_json(node, "get", "pvc", "data")
    assert claim["spec"]["storageClassName"] == "local-path"  # type: ignore[index]
    await _until("WaitForFirstConsumer event", lambda: any(e["reason"] == "WaitForFirstConsumer"
                                                           for e in _events(node, "data")))
    assert _kubectl_json(node, "get", "pvc", "data")["status"]["phase"] == "Pending"  # type: ignore[index]
    assert _kubectl_run(node, "apply", "-f", "-", stdin=_claim_and_pod("data")).returncode == 0
    await _until("claim bound", lambda: _kubectl_json(node, "get", "pvc", "data")["status"].get(  # type: ignore[attr-defined]
        "phase") == "Bound")
    claim = _kubectl_json(node, "get", "pvc", "data")
    volume_name = claim["spec"]["volumeName"]  # type: ignore[index]
    assert volume_name == f"pvc-{claim['metadata']['uid']}"  # type: ignore[index]
    assert claim["metadata"]["annotations"]["volume.kubernetes.io/selected-node"] == "simnode"  # type: ignore[index]
    volume = _kubectl_json(node, "get", "pv", volume_name)
    path = f"{VOLUMES_DIR}/{volume_name}_default_data"
    assert volume["spec"]["hostPath"]["path"] == path  # type: ignore[index]
    assert volume["spec"]["claimRef"]["name"] == "data"  # type: ignore[index]
    assert volume["status"]["phase"] == "Bound"  # type: ignore[index]
    assert node.paths.under(path).is_dir()
    # The directory was made by a helper pod (the ConfigMap's setup script, busybox image), deleted afterwards.
    assert list(node.paths.under("/var/log/pods").glob(f"local-path-storage_helper-pod-create-{volume_name}"))
    assert "helper-pod-create" not in _kubectl(node, "get", "pods", "-n", "local-path-storage", "-o", "name")
    await _until("pod bound to the node", lambda: _kubectl_json(node, "get", "pod", "data-user")["spec"].get(  # type: ignore[attr-defined]
        "nodeName") == "simnode")
    assert "ProvisioningSucceeded" in {e["reason"] for e in _events(node, "data")}

    # 5. Deleting the claim releases the volume; the provisioner removes it and its directory.
    _kubectl(node, "delete", "pod", "data-user", "--wait=false")
    _kubectl(node, "delete", "pvc", "data", "--wait=false")
    await _until("volume deleted", lambda: _kubectl_run(node, "get", "pv", volume_name).returncode != 0)
    await _until("directory removed", lambda: not node.paths.under(path).exists())

    # 6. Without `create` on persistentvolumes the claim stays Pending and its events carry the 403.
    _kubectl(node, "patch", "clusterrole", "local-path-provisioner-role", "--type=json", "-p",
             json.dumps([{"op": "replace", "path": "/rules/1/verbs",
                          "value": ["get", "list", "watch", "patch", "update", "delete"]}]))
    assert _kubectl_run(node, "apply", "-f", "-", stdin=_claim_and_pod("denied")).returncode == 0
    failed = await _until("ProvisioningFailed", lambda: [e["message"] for e in _events(node, "denied")
                                                          if e["reason"] == "ProvisioningFailed"])
    uid = _kubectl_json(node, "get", "pvc", "denied")["metadata"]["uid"]  # type: ignore[index]
    assert failed[0] == (  # type: ignore[index]
        f'Error creating provisioned PV object for claim default/denied: persistentvolumes is forbidden: User "{SA}" '
        'cannot create resource "persistentvolumes" in API group "" at the cluster scope. Deleting the volume.')
    assert _kubectl_json(node, "get", "pvc", "denied")["status"]["phase"] == "Pending"  # type: ignore[index]
    await _until("directory torn down again",  # after a setup helper pod, a teardown one
                 lambda: list(node.paths.under("/var/log/pods").glob(
                     f"local-path-storage_helper-pod-delete-pvc-{uid}"))
                 and not node.paths.under(f"{VOLUMES_DIR}/pvc-{uid}_default_denied").exists())
    shutil.rmtree(tmp_path / "addons-variant")
