"""The kube-apiserver stand-in driven by kubernetes_asyncio (what the service uses): watch, server-side apply,
optimistic concurrency, status and binding subresources, garbage collection, dry run."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException
from test_apiserver_support import ApiServer, module_server

APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"


@pytest.fixture(scope="module")
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    yield from module_server(tmp_path_factory)


@pytest.fixture
async def api(apiserver: ApiServer) -> AsyncIterator[client.ApiClient]:
    cfg = client.Configuration()
    await config.load_kube_config(config_file=str(apiserver.kubeconfig), client_configuration=cfg)
    async with client.ApiClient(cfg) as api_client:
        yield api_client


async def make_namespace(api: client.ApiClient, name: str) -> None:
    await client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})


def pod(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}},
            "spec": {"containers": [{"name": "c", "image": "busybox:1"}]}}


def deployment(name: str, replicas: int, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "main", "image": "app:1"}]}}},
    }


async def test_watch_pods_sees_add_modify_delete(api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    await make_namespace(api, "w1")
    listing = await v1.list_namespaced_pod("w1")
    events: list[tuple[str, str, str]] = []
    selected: list[tuple[str, str]] = []

    async def collect() -> None:
        async with watch.Watch() as w:
            async for ev in w.stream(v1.list_namespaced_pod, "w1", resource_version=listing.metadata.resource_version,
                                     timeout_seconds=10):
                events.append((ev["type"], ev["object"].metadata.name, ev["object"].status.phase or ""))
                if ev["type"] == "DELETED":
                    return

    async def collect_selected() -> None:
        # With a label selector an object that stops matching is reported DELETED, like the real server.
        async with watch.Watch() as w:
            async for ev in w.stream(v1.list_namespaced_pod, "w1", label_selector="role=web", timeout_seconds=10):
                selected.append((ev["type"], ev["object"].metadata.name))
                if ev["type"] == "DELETED":
                    return

    tasks = [asyncio.create_task(collect(), name="watch-all"),
             asyncio.create_task(collect_selected(), name="watch-selected")]
    await asyncio.sleep(0.3)
    await v1.create_namespaced_pod("w1", pod("p1", {"role": "web"}))
    await v1.patch_namespaced_pod_status("p1", "w1", {"status": {"phase": "Running"}}, _content_type=MERGE)
    await v1.patch_namespaced_pod("p1", "w1", {"metadata": {"labels": {"role": "db"}}}, _content_type=MERGE)
    await v1.delete_namespaced_pod("p1", "w1")
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
    assert events == [("ADDED", "p1", "Pending"), ("MODIFIED", "p1", "Running"), ("MODIFIED", "p1", "Running"),
                      ("DELETED", "p1", "Running")]
    assert selected == [("ADDED", "p1"), ("MODIFIED", "p1"), ("DELETED", "p1")]


async def test_server_side_apply(api: client.ApiClient) -> None:
    apps = client.AppsV1Api(api)
    await make_namespace(api, "ssa")
    body = deployment("web", 2, {"app": "web", "team": "a"})
    created = await apps.patch_namespaced_deployment("web", "ssa", body, field_manager="svc", _content_type=APPLY)
    assert created.metadata.generation == 1 and created.spec.replicas == 2
    managers = {m.manager: m.operation for m in created.metadata.managed_fields}
    assert managers == {"svc": "Apply"}

    body = deployment("web", 3, {"app": "web"})  # stops applying the "team" label
    again = await apps.patch_namespaced_deployment("web", "ssa", body, field_manager="svc", _content_type=APPLY)
    assert again.spec.replicas == 3 and again.metadata.generation == 2
    assert again.metadata.labels == {"app": "web"}

    rival = deployment("web", 9, {"app": "web"})
    with pytest.raises(ApiException) as err:
        await apps.patch_namespaced_deployment("web", "ssa", rival, field_manager="rival", _content_type=APPLY)
    assert err.value.status == 409
    status = json.loads(err.value.body)
    assert status["reason"] == "Conflict" and 'conflict with "svc"' in status["message"]
    assert {c["field"] for c in status["details"]["causes"]} == {".spec.replicas"}
    forced = await apps.patch_namespaced_deployment("web", "ssa", rival, field_manager="rival", force=True,
                                                    _content_type=APPLY)
    assert forced.spec.replicas == 9

    with pytest.raises(ApiException) as err:
        await apps.patch_namespaced_deployment("web", "ssa", rival, _content_type=APPLY)
    assert err.value.status == 422 and "fieldManager" in err.value.body


async def test_optimistic_concurrency_and_noop_updates(api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    await make_namespace(api, "occ")
    cm = await v1.create_namespaced_config_map("occ", {"metadata": {"name": "c"}, "data": {"a": "1"}})
    rv = cm.metadata.resource_version
    cm.data = {"a": "2"}
    updated = await v1.replace_namespaced_config_map("c", "occ", cm)
    assert int(updated.metadata.resource_version) > int(rv)
    cm.data = {"a": "3"}  # still carries the old resourceVersion
    with pytest.raises(ApiException) as err:
        await v1.replace_namespaced_config_map("c", "occ", cm)
    assert err.value.status == 409 and "the object has been modified" in err.value.body
    same = await v1.replace_namespaced_config_map("c", "occ", updated)
    assert same.metadata.resource_version == updated.metadata.resource_version  # no-op: no new version
    assert (await v1.read_namespaced_config_map("c", "occ")).data == {"a": "2"}


async def test_create_rules_generate_name_and_dry_run(api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    await make_namespace(api, "cr")
    made = await v1.create_namespaced_config_map("cr", {"metadata": {"generateName": "gen-"}})
    assert made.metadata.name.startswith("gen-") and len(made.metadata.name) == 9
    assert made.metadata.uid and made.metadata.creation_timestamp
    with pytest.raises(ApiException) as err:
        await v1.create_namespaced_config_map("absent", {"metadata": {"name": "x"}})
    assert err.value.status == 404 and json.loads(err.value.body)["reason"] == "NotFound"
    with pytest.raises(ApiException) as err:
        await v1.create_namespaced_config_map("cr", {"metadata": {"name": "Bad_Name"}})
    assert err.value.status == 422 and json.loads(err.value.body)["reason"] == "Invalid"
    rbac = client.RbacAuthorizationV1Api(api)
    role = await rbac.create_cluster_role({"metadata": {"name": "kubeadm:get-nodes"},
                                           "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]})
    assert role.metadata.name == "kubeadm:get-nodes"  # RBAC names are path segments, not DNS names
    with pytest.raises(ApiException) as err:
        await rbac.create_cluster_role({"metadata": {"name": "a/b"}})
    assert err.value.status == 422
    dry = await v1.create_namespaced_config_map("cr", {"metadata": {"name": "dry"}}, dry_run="All")
    assert dry.metadata.name == "dry"
    names = [c.metadata.name for c in (await v1.list_namespaced_config_map("cr")).items]
    assert "dry" not in names
    svc = await v1.create_namespaced_service("cr", {"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}})
    assert svc.spec.cluster_ip.startswith("10.") and svc.spec.ports[0].target_port == 80
    with pytest.raises(ApiException) as err:
        await v1.create_namespaced_service("cr", {"metadata": {"name": "s2"},
                                                  "spec": {"clusterIP": svc.spec.cluster_ip, "ports": [{"port": 80}]}})
    assert err.value.status == 422 and "already allocated" in err.value.body


async def test_status_subresource_and_binding(api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    await make_namespace(api, "sub")
    await v1.create_namespaced_pod("sub", pod("p"))
    main = await v1.patch_namespaced_pod("p", "sub", {"status": {"phase": "Failed"}}, _content_type=MERGE)
    assert main.status.phase == "Pending"  # the main resource ignores status
    st = await v1.patch_namespaced_pod_status("p", "sub", {"status": {"phase": "Running"},
                                                           "spec": {"nodeName": "sneaky"}}, _content_type=MERGE)
    assert st.status.phase == "Running" and st.spec.node_name is None  # /status changes only status

    binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p"},
               "target": {"apiVersion": "v1", "kind": "Node", "name": "node-1"}}
    resp = await v1.create_namespaced_pod_binding("p", "sub", binding, _preload_content=False)
    assert resp.status == 201
    bound = await v1.read_namespaced_pod("p", "sub")
    assert bound.spec.node_name == "node-1"
    assert any(c.type == "PodScheduled" and c.status == "True" for c in bound.status.conditions)
    again = await v1.create_namespaced_pod_binding("p", "sub", binding, _preload_content=False)
    assert again.status == 409 and "already assigned" in (await again.text())


async def test_garbage_collection_and_deletecollection(api: client.ApiClient) -> None:
    v1, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    await make_namespace(api, "gc")
    dep = await apps.create_namespaced_deployment("gc", deployment("d", 1, {"app": "d"}))
    owner = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "d", "uid": dep.metadata.uid, "controller": True}
    rs_body = deployment("d-1", 1, {"app": "d"}) | {"kind": "ReplicaSet"}
    rs_body["metadata"]["ownerReferences"] = [owner]
    rs_body["spec"]["selector"] = {"matchLabels": {"app": "d-1"}}
    rs_body["spec"]["template"]["metadata"]["labels"] = {"app": "d-1"}
    rs = await apps.create_namespaced_replica_set("gc", rs_body)
    owned_pod = pod("d-1-x", {"app": "d-1"})
    owned_pod["metadata"]["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "d-1",
                                                 "uid": rs.metadata.uid}]
    await v1.create_namespaced_pod("gc", owned_pod)
    for name in ("free-1", "free-2", "other"):
        await v1.create_namespaced_pod("gc", pod(name, {"grp": "free" if name != "other" else "x"}))

    await apps.delete_namespaced_deployment("d", "gc")
    assert (await apps.list_namespaced_replica_set("gc")).items == []
    remaining = sorted(p.metadata.name for p in (await v1.list_namespaced_pod("gc")).items)
    assert remaining == ["free-1", "free-2", "other"]
    await v1.delete_collection_namespaced_pod("gc", label_selector="grp=free")
    assert [p.metadata.name for p in (await v1.list_namespaced_pod("gc")).items] == ["other"]
    await v1.delete_namespace("gc")
    assert (await v1.list_pod_for_all_namespaces(field_selector="metadata.namespace=gc")).items == []
    with pytest.raises(ApiException) as err:
        await v1.read_namespace("gc")
    assert err.value.status == 404


async def test_finalizers_hold_deletion(api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    await make_namespace(api, "fin")
    await v1.create_namespaced_config_map("fin", {"metadata": {"name": "held", "finalizers": ["example.com/x"]}})
    await v1.delete_namespaced_config_map("held", "fin")
    held = await v1.read_namespaced_config_map("held", "fin")
    assert held.metadata.deletion_timestamp is not None
    await v1.patch_namespaced_config_map("held", "fin", {"metadata": {"finalizers": None}}, _content_type=MERGE)
    with pytest.raises(ApiException) as err:
        await v1.read_namespaced_config_map("held", "fin")
    assert err.value.status == 404
