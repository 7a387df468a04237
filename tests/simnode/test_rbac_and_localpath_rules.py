"""Pure rules of the RBAC authorizer (request attributes from URLs, rule matching) and of the local-path
provisioner stand-in (flags, config.json), against the upstream behaviour they cite."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import pytest

from simnode.apiserver.rbac import Attributes, request_attributes, rule_allows
from simnode.kubeclient import KubeClient
from simnode.kubelet.workloads import map_path
from simnode.localpath.config import UsageError, load_config, parse_flags
from simnode.localpath.helperpod import HelperPods, quantity_bytes
from simnode.localpath.main import container_path


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        ("GET", "/api/v1/namespaces/a/pods", {}, ("list", "", "pods", "", "a", "")),
        ("GET", "/api/v1/namespaces/a/pods", {"watch": "true"}, ("watch", "", "pods", "", "a", "")),
        ("GET", "/api/v1/watch/namespaces/a/pods", {}, ("watch", "", "pods", "", "a", "")),
        ("GET", "/api/v1/namespaces/a/pods/p/log", {}, ("get", "", "pods", "log", "a", "p")),
        ("PATCH", "/api/v1/persistentvolumes/pv1/status", {}, ("patch", "", "persistentvolumes", "status", "", "pv1")),
        ("DELETE", "/apis/apps/v1/namespaces/a/deployments", {}, ("deletecollection", "apps", "deployments", "", "a",
                                                                 "")),
        ("POST", "/api/v1/namespaces/a/serviceaccounts/sa/token", {}, ("create", "", "serviceaccounts", "token", "a",
                                                                       "sa")),
        ("GET", "/api/v1/namespaces/a", {}, ("get", "", "namespaces", "", "a", "a")),
        ("PUT", "/api/v1/namespaces/a/status", {}, ("update", "", "namespaces", "status", "a", "a")),
        ("GET", "/apis/storage.k8s.io/v1/storageclasses", {}, ("list", "storage.k8s.io", "storageclasses", "", "",
                                                               "")),
    ],
)
def test_request_attributes_follow_requestinfo(method: str, path: str, query: dict[str, str],
                                               expected: tuple[str, ...]) -> None:
    a = request_attributes(method, path, query)
    assert a.resource_request
    assert (a.verb, a.api_group, a.resource, a.subresource, a.namespace, a.name) == expected


def test_non_resource_paths_use_http_verbs() -> None:
    a = request_attributes("GET", "/apis", {})
    assert not a.resource_request and a.verb == "get" and a.path == "/apis"
    assert rule_allows({"nonResourceURLs": ["/apis/*", "/apis"], "verbs": ["get"]}, a)
    assert not rule_allows({"nonResourceURLs": ["/api"], "verbs": ["get"]}, a)
    assert rule_allows({"nonResourceURLs": ["/api*"], "verbs": ["*"]}, request_attributes("GET", "/apis/x", {}))


def _attrs(**kw: str) -> Attributes:
    return Attributes(**{"verb": "get", "path": "", "resource_request": True, **kw})  # type: ignore[arg-type]


def test_rule_matching_like_rbac_go() -> None:
    rule = {"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list"]}
    assert rule_allows(rule, _attrs(resource="pods"))
    assert rule_allows(rule, _attrs(resource="pods", subresource="log"))
    assert not rule_allows(rule, _attrs(resource="pods", subresource="status"))  # a subresource is its own
    assert not rule_allows(rule, _attrs(resource="pods", api_group="apps"))
    assert not rule_allows(rule, _attrs(resource="pods", verb="delete"))
    assert rule_allows({"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                       _attrs(resource="x", subresource="y", api_group="z", verb="escalate"))
    assert rule_allows({"apiGroups": [""], "resources": ["*/status"], "verbs": ["get"]},
                       _attrs(resource="nodes", subresource="status"))
    named = {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["a"], "verbs": ["get", "list"]}
    assert rule_allows(named, _attrs(resource="configmaps", name="a"))
    assert not rule_allows(named, _attrs(resource="configmaps", name="b"))
    assert not rule_allows(named, _attrs(resource="configmaps", verb="list"))  # a list names no object


def test_provisioner_flags_and_env_fallbacks_are_upstreams() -> None:
    flags = parse_flags(["--debug", "start", "--config", "/etc/config/config.json"],
                        {"POD_NAMESPACE": "storage", "HEALTH_PORT": "9090"})
    assert (flags.debug, flags.config_file, flags.namespace, flags.health_port) == \
        (True, "/etc/config/config.json", "storage", 9090)
    assert flags.provisioner_name == "rancher.io/local-path"
    with pytest.raises(UsageError, match="flag provided but not defined: -bogus"):
        parse_flags(["start", "--bogus=1"], {})
    with pytest.raises(UsageError, match="the only command is `start`"):
        parse_flags(["--debug"], {})


@pytest.mark.parametrize(
    ("node_path_map", "message"),
    [
        ([{"node": "a", "paths": ["relative"]}], "path must start with / for path relative on node a"),
        ([{"node": "a", "paths": ["/"]}], "cannot use root ('/') as path on node a"),
        ([{"node": "a", "paths": ["/x", "/x/"]}], "duplicate path /x/ on node a"),
        ([{"node": "a", "paths": ["/x"]}, {"node": "a", "paths": ["/y"]}], "duplicate node a"),
    ],
)
def test_bad_config_json_is_refused_with_upstreams_words(tmp_path: Path, node_path_map: list[object],
                                                         message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"nodePathMap": node_path_map}))
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(path, "/etc/config/config.json")


def test_container_paths_resolve_through_the_longest_mount() -> None:
    mounts = {"/etc/config/": "/n/cm", "/var/run/secrets/kubernetes.io/serviceaccount": "/n/sa", "/": "/n/root"}
    assert container_path("/etc/config/config.json", mounts) == Path("/n/cm/config.json")
    assert container_path("/var/run/secrets/kubernetes.io/serviceaccount/token", mounts) == Path("/n/sa/token")
    assert container_path("/etc/hosts", mounts) == Path("/n/root/etc/hosts")
    assert container_path("/etc/config", {"/other": "/x"}) is None


def test_helper_pod_is_built_like_create_helper_pod() -> None:
    template = "apiVersion: v1\nkind: Pod\nmetadata: {name: helper-pod}\nspec:\n  containers:\n" \
               "  - {name: helper-pod, image: mirror/library/busybox:1.37.0}\n"
    helper = HelperPods(cast(KubeClient, None), namespace="local-path-storage", service_account="sa",
                        config_map="local-path-config", template_yaml=template)
    pod = helper.pod("create", volume="pvc-1", path="/opt/lpp/pvc-1_default_data", node="simnode", size="128Mi",
                     mode="Filesystem")
    spec = pod["spec"]
    assert pod["metadata"] == {"name": "helper-pod-create-pvc-1", "namespace": "local-path-storage"}
    assert (spec["nodeName"], spec["serviceAccountName"], spec["restartPolicy"]) == ("simnode", "sa", "Never")
    container = spec["containers"][0]
    assert container["image"] == "mirror/library/busybox:1.37.0"
    assert container["command"] == ["/bin/sh", "/script/setup"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["VOL_DIR"] == "/opt/lpp/pvc-1_default_data" and env["VOL_SIZE_BYTES"] == str(128 * 2**20)
    assert {"name": "data", "hostPath": {"path": "/opt/lpp", "type": "DirectoryOrCreate"}} in spec["volumes"]
    assert {"name": "data", "mountPath": "/opt/lpp"} in container["volumeMounts"]
    assert quantity_bytes("1G") == 10**9 and quantity_bytes("2Ki") == 2048 and quantity_bytes("bogus") == 0


def test_script_paths_map_onto_the_node_root() -> None:
    mounts = {"/opt/lpp": "/root/opt/lpp", "/script": "/root/var/lib/kubelet/pods/u/volumes/cm/script"}
    assert map_path("/opt/lpp/pvc-1_default_data", mounts) == "/root/opt/lpp/pvc-1_default_data"
    assert map_path("/script/setup", mounts) == "/root/var/lib/kubelet/pods/u/volumes/cm/script/setup"
    assert map_path("/opt/lppx", mounts) == "/opt/lppx"  # a prefix of a name is not a mount
    assert map_path("-p", mounts) == "-p"
