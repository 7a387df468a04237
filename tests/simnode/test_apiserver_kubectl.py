"""The kube-apiserver stand-in driven by the real kubectl: health, discovery, CRUD, selectors, apply (server-
and client-side), patches, watch, wait, tables, and authentication failures."""

from __future__ import annotations

import json
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_apiserver_support import KUBECTL_VERSIONS, ApiServer, module_server, write_kubeconfig

from simnode.launch import build_version

DEPLOYMENT = textwrap.dedent("""\
    apiVersion: apps/v1
    kind: Deployment
    metadata:
      name: {name}
      labels: {{app: {name}}}
    spec:
      replicas: {replicas}
      selector: {{matchLabels: {{app: {name}}}}}
      template:
        metadata: {{labels: {{app: {name}}}}}
        spec:
          containers:
          - name: main
            image: {image}
            ports: [{{containerPort: 80}}]
    """)


@pytest.fixture(scope="module")
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    yield from module_server(tmp_path_factory)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def get_json(server: ApiServer, *args: str) -> dict[str, object]:
    out = server.kubectl("get", *args, "-o", "json").stdout
    result: dict[str, object] = json.loads(out)
    return result


def test_readyz_version_and_bootstrap(apiserver: ApiServer) -> None:
    assert apiserver.kubectl("get", "--raw", "/readyz").stdout == "ok"
    verbose = apiserver.kubectl("get", "--raw", "/readyz?verbose").stdout
    assert "[+]ping ok" in verbose and verbose.strip().endswith("readyz check passed")
    version = json.loads(apiserver.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == build_version()
    names = apiserver.kubectl("get", "ns", "-o", "name").stdout.split()
    for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
        assert f"namespace/{ns}" in names
    svc = get_json(apiserver, "svc", "kubernetes", "-n", "default")
    assert svc["spec"]["clusterIP"] == "10.96.0.1"  # type: ignore[index]
    ep = get_json(apiserver, "endpoints", "kubernetes", "-n", "default")
    assert ep["subsets"][0]["ports"][0]["port"] == apiserver.port  # type: ignore[index]


def test_create_get_list_and_selectors(apiserver: ApiServer) -> None:
    k = apiserver.kubectl
    k("create", "namespace", "sel")
    for name, labels in (("a", "tier=web,env=prod"), ("b", "tier=db,env=prod"), ("c", "tier=web")):
        k("-n", "sel", "create", "configmap", name, "--from-literal=x=1")
        k("-n", "sel", "label", "configmap", name, *labels.split(","))

    def names(*args: str) -> list[str]:
        return sorted(k("-n", "sel", "get", "cm", *args, "-o", "jsonpath={.items[*].metadata.name}").stdout.split())

    assert names("-l", "tier=web") == ["a", "c"]
    assert names("-l", "tier==web,env=prod") == ["a"]
    assert names("-l", "tier!=web") == ["b"]
    assert names("-l", "tier in (db,cache)") == ["b"]
    assert names("-l", "tier notin (db)") == ["a", "c"]
    assert names("-l", "env") == ["a", "b"]
    assert names("-l", "!env") == ["c"]
    assert names("--field-selector", "metadata.name=b") == ["b"]
    assert names("--field-selector", "metadata.name!=b") == ["a", "c"]
    bad = k("-n", "sel", "get", "cm", "--field-selector", "spec.nodeName=x", check=False)
    assert bad.returncode != 0 and "field label not supported" in bad.stderr
    all_ns = k("get", "cm", "-A", "-l", "tier", "-o", "jsonpath={.items[*].metadata.namespace}").stdout.split()
    assert all_ns == ["sel", "sel", "sel"]
    dup = k("-n", "sel", "create", "configmap", "a", check=False)
    assert 'configmaps "a" already exists' in dup.stderr
    missing = k("-n", "nope", "create", "configmap", "z", check=False)
    assert 'namespaces "nope" not found' in missing.stderr
    unknown = k("get", "--raw", "/api/v1/widgets", check=False)
    assert unknown.returncode != 0 and "NotFound" in unknown.stderr


def test_server_side_apply_conflicts_and_force(apiserver: ApiServer, tmp_path: Path) -> None:
    k = apiserver.kubectl
    first = write(tmp_path, "d1.yaml", DEPLOYMENT.format(name="ssa", replicas=2, image="nginx:1.25"))
    assert "serverside-applied" in k("apply", "--server-side", "-f", first).stdout
    d = get_json(apiserver, "deploy", "ssa")
    assert d["metadata"]["generation"] == 1 and d["spec"]["replicas"] == 2  # type: ignore[index]

    second = write(tmp_path, "d2.yaml", DEPLOYMENT.format(name="ssa", replicas=2, image="nginx:1.26"))
    k("apply", "--server-side", "-f", second)
    d = get_json(apiserver, "deploy", "ssa")
    assert d["metadata"]["generation"] == 2  # type: ignore[index]
    assert d["spec"]["template"]["spec"]["containers"][0]["image"] == "nginx:1.26"  # type: ignore[index]

    other = write(tmp_path, "d3.yaml", DEPLOYMENT.format(name="ssa", replicas=5, image="nginx:1.26"))
    clash = k("apply", "--server-side", "--field-manager=other", "-f", other, check=False)
    assert clash.returncode != 0
    assert 'conflict with "kubectl"' in clash.stderr and ".spec.replicas" in clash.stderr
    assert get_json(apiserver, "deploy", "ssa")["spec"]["replicas"] == 2  # type: ignore[index]

    k("apply", "--server-side", "--field-manager=other", "--force-conflicts", "-f", other)
    d = get_json(apiserver, "deploy", "ssa", "--show-managed-fields")
    assert d["spec"]["replicas"] == 5  # type: ignore[index]
    owners = {m["manager"]: m["fieldsV1"] for m in d["metadata"]["managedFields"]}  # type: ignore[index]
    assert "f:replicas" in owners["other"]["f:spec"] and "f:replicas" not in owners["kubectl"]["f:spec"]


def test_client_side_apply_three_way_merge(apiserver: ApiServer, tmp_path: Path) -> None:
    k = apiserver.kubectl
    cm = textwrap.dedent("""\
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: csa, labels: {keep: "1", drop: "1"}}
        data: {a: "1", b: "2"}
        """)
    path = write(tmp_path, "cm.yaml", cm)
    assert "created" in k("apply", "-f", path).stdout
    k("label", "cm", "csa", "external=yes")  # a change made outside the manifest survives the next apply
    write(tmp_path, "cm.yaml", cm.replace(', drop: "1"', "").replace('b: "2"', 'b: "3", c: "4"'))
    assert "configured" in k("apply", "-f", path).stdout
    got = get_json(apiserver, "cm", "csa")
    assert got["data"] == {"a": "1", "b": "3", "c": "4"}
    assert got["metadata"]["labels"] == {"keep": "1", "external": "yes"}  # type: ignore[index]

    dep = write(tmp_path, "dep.yaml", DEPLOYMENT.format(name="csa", replicas=1, image="busybox:1"))
    k("apply", "-f", dep)
    write(tmp_path, "dep.yaml", DEPLOYMENT.format(name="csa", replicas=3, image="busybox:2"))
    k("apply", "-f", dep)
    d = get_json(apiserver, "deploy", "csa")
    assert d["spec"]["replicas"] == 3  # type: ignore[index]
    assert [c["image"] for c in d["spec"]["template"]["spec"]["containers"]] == ["busybox:2"]  # type: ignore[index]


def test_patch_types(apiserver: ApiServer, tmp_path: Path) -> None:
    k = apiserver.kubectl
    k("apply", "-f", write(tmp_path, "d.yaml", DEPLOYMENT.format(name="pt", replicas=1, image="app:1")))
    k("patch", "deploy", "pt", "--type=merge", "-p", '{"metadata":{"labels":{"merged":"yes"}}}')
    k("patch", "deploy", "pt", "--type=json", "-p", '[{"op":"replace","path":"/spec/replicas","value":4}]')
    sidecar = '{"spec":{"template":{"spec":{"containers":[{"name":"side","image":"side:1"}]}}}}'
    k("patch", "deploy", "pt", "--type=strategic", "-p", sidecar)
    d = get_json(apiserver, "deploy", "pt")
    assert d["metadata"]["labels"]["merged"] == "yes"  # type: ignore[index]
    assert d["spec"]["replicas"] == 4  # type: ignore[index]
    containers = d["spec"]["template"]["spec"]["containers"]  # type: ignore[index]
    assert [c["name"] for c in containers] == ["main", "side"]  # strategic merge keeps "main"
    failed = k("patch", "deploy", "pt", "--type=json", "-p", '[{"op":"test","path":"/spec/replicas","value":9}]',
               check=False)
    assert failed.returncode != 0
    assert get_json(apiserver, "deploy", "pt")["metadata"]["generation"] == 3  # type: ignore[index]


def test_get_watch_sees_changes(apiserver: ApiServer) -> None:
    apiserver.kubectl("create", "configmap", "watched", "--from-literal=k=v")
    argv = ["/usr/bin/kubectl", f"--kubeconfig={apiserver.kubeconfig}", f"--cache-dir={apiserver.home}/cache",
            "get", "configmap", "watched", "-w", "--request-timeout=0"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={"HOME": str(apiserver.home), "PATH": "/usr/bin:/bin"}) as watcher:
        guard = threading.Timer(20, watcher.kill)  # a stuck watch ends in EOF and a failed assertion, not a hang
        guard.start()
        try:
            assert watcher.stdout is not None
            header = watcher.stdout.readline()
            assert header.split() == ["NAME", "DATA", "AGE"]
            assert watcher.stdout.readline().split()[:2] == ["watched", "1"]
            apiserver.kubectl("patch", "configmap", "watched", "--type=merge", "-p", '{"data":{"k2":"v2"}}')
            deadline = time.monotonic() + 10
            line = ""
            while time.monotonic() < deadline and not line.startswith("watched"):
                line = watcher.stdout.readline()
            assert line.split()[:2] == ["watched", "2"]
        finally:
            guard.cancel()
            watcher.terminate()


def test_wait_for_available_via_status_subresource(apiserver: ApiServer, tmp_path: Path) -> None:
    k = apiserver.kubectl
    k("apply", "-f", write(tmp_path, "d.yaml", DEPLOYMENT.format(name="waited", replicas=1, image="app:1")))
    argv = ["/usr/bin/kubectl", f"--kubeconfig={apiserver.kubeconfig}", f"--cache-dir={apiserver.home}/cache",
            "wait", "--for=condition=Available", "deployment/waited", "--timeout=20s"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={"HOME": str(apiserver.home)}) as waiter:
        time.sleep(0.5)
        assert waiter.poll() is None, "kubectl wait returned before the condition was set"
        # A write to the main resource must not change status; a write to /status must.
        k("patch", "deployment", "waited", "--type=merge", "-p", '{"status":{"readyReplicas":7}}')
        status = ('{"status":{"observedGeneration":1,"replicas":1,"readyReplicas":1,"availableReplicas":1,'
                  '"updatedReplicas":1,"conditions":[{"type":"Available","status":"True","reason":"MinimumReplicasAvailable"}]}}')
        k("patch", "deployment", "waited", "--subresource=status", "--type=merge", "-p", status)
        out, err = waiter.communicate(timeout=20)
    assert waiter.returncode == 0, err
    assert "condition met" in out
    d = get_json(apiserver, "deploy", "waited")
    assert d["status"]["readyReplicas"] == 1  # type: ignore[index]
    table = k("get", "deploy", "waited").stdout.split("\n")
    assert table[0].split() == ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
    assert table[1].split()[:4] == ["waited", "1/1", "1", "1"]


def test_service_status_subresource_sets_load_balancer_ingress_as_the_real_apiserver(
    apiserver: ApiServer, tmp_path: Path
) -> None:
    """services/status (kubernetes pkg/registry/core/service/storage/storage.go StatusREST, strategy.go
    serviceStatusStrategy): a PATCH or PUT there changes status only; a write to the Service keeps status;
    ingress entries are validated (ValidateLoadBalancerStatus); kubectl shows them under EXTERNAL-IP."""
    k = apiserver.kubectl
    created = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "lb-status"},
               "spec": {"type": "LoadBalancer", "ports": [{"port": 8080, "targetPort": 80}]},
               "status": {"loadBalancer": {"ingress": [{"hostname": "made-up.example"}]}}}
    k("create", "-f", write(tmp_path, "created.json", json.dumps(created)))  # a status sent on create is dropped
    assert k("get", "svc", "lb-status", "--no-headers").stdout.split()[3] == "<pending>"
    node_port = get_json(apiserver, "svc", "lb-status")["spec"]["ports"][0]["nodePort"]  # type: ignore[index]
    # The spec part of a status patch is dropped, the status part kept.
    k("patch", "svc", "lb-status", "--subresource=status", "--type=merge", "-p",
      '{"spec":{"ports":[{"port":9999,"targetPort":80}]},"status":{"loadBalancer":{"ingress":[{"hostname":"localhost"}]}}}')
    row = k("get", "svc", "lb-status", "--no-headers").stdout.split()
    assert row[3] == "localhost" and row[4] == f"8080:{node_port}/TCP", row
    # A write to the Service itself keeps the status.
    k("patch", "svc", "lb-status", "--type=merge", "-p", '{"status":{"loadBalancer":{"ingress":[]}}}')
    assert k("get", "svc", "lb-status", "--no-headers").stdout.split()[3] == "localhost"
    # PUT on /status, with an IP address given as hostname: refused, nothing changes.
    svc = get_json(apiserver, "svc", "lb-status")
    svc["status"] = {"loadBalancer": {"ingress": [{"hostname": "127.0.0.1"}]}}
    bad = k("replace", "--subresource=status", "-f", write(tmp_path, "svc.json", json.dumps(svc)), check=False)
    assert bad.returncode != 0 and "must be a DNS name, not an IP address" in bad.stderr, bad.stderr
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "192.0.2.7"}]}}
    k("replace", "--subresource=status", "-f", write(tmp_path, "svc.json", json.dumps(svc)))
    assert k("get", "svc", "lb-status", "--no-headers").stdout.split()[3] == "192.0.2.7"


def test_service_ports_are_validated_and_node_ports_allocated_as_the_real_apiserver(
    apiserver: ApiServer, tmp_path: Path
) -> None:
    """ValidateService (port names required with several ports, unique, no (protocol, port) twice), the
    allocator (allocateLoadBalancerNodePorts: false allocates none; a requested node port taken or out of range
    is refused), as simnode/apiserver/validation.py and services.py cite. Each refusal creates nothing."""
    k = apiserver.kubectl

    def svc(name: str, ports: list[dict[str, object]], **spec: object) -> str:
        body = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                "spec": {"type": "LoadBalancer", "ports": ports, **spec}}
        return write(tmp_path, f"{name}.json", json.dumps(body))

    k("create", "-f", svc("lb-no-alloc", [{"port": 81}], allocateLoadBalancerNodePorts=False))
    spec = get_json(apiserver, "svc", "lb-no-alloc")["spec"]
    assert "nodePort" not in spec["ports"][0] and spec["allocateLoadBalancerNodePorts"] is False  # type: ignore
    assert k("get", "svc", "lb-no-alloc", "--no-headers").stdout.split()[4] == "81/TCP"
    k("create", "-f", svc("lb-default", [{"port": 82}]))
    spec = get_json(apiserver, "svc", "lb-default")["spec"]
    assert spec["allocateLoadBalancerNodePorts"] is True  # type: ignore[index]
    taken = spec["ports"][0]["nodePort"]  # type: ignore[index]
    refusals = {
        "lb-unnamed": ([{"port": 83}, {"port": 84}], "spec.ports[0].name: Required value"),
        "lb-dup-name": ([{"name": "a", "port": 83}, {"name": "a", "port": 84}],
                        'spec.ports[1].name: Duplicate value: "a"'),
        "lb-dup-port": ([{"name": "a", "port": 83}, {"name": "b", "port": 83}], "spec.ports[1]: Duplicate value"),
        "lb-taken": ([{"port": 85, "nodePort": taken}],
                     f"spec.ports[0].nodePort: Invalid value: {taken}: provided port is already allocated"),
        "lb-range": ([{"port": 86, "nodePort": 8080}], "spec.ports[0].nodePort: Invalid value: 8080: provided port "
                     "is not in the valid range. The range of valid ports is 30000-32767"),
    }
    for name, (ports, message) in refusals.items():
        bad = k("create", "-f", svc(name, ports), check=False)
        assert bad.returncode != 0 and message in bad.stderr, (name, bad.stderr)
        assert k("get", "svc", name, check=False).returncode != 0, name
    # The same port number over TCP and UDP is two ports, as for DNS.
    k("create", "-f", svc("lb-dns", [{"name": "dns", "port": 53, "protocol": "UDP"},
                                     {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]))


def test_pod_tables_look_real(apiserver: ApiServer, tmp_path: Path) -> None:
    k = apiserver.kubectl
    k("create", "namespace", "tables")
    k("-n", "tables", "run", "web", "--image=nginx:1.25")
    status = {"status": {"phase": "Running", "podIP": "10.244.0.7", "containerStatuses": [
        {"name": "web", "ready": True, "restartCount": 0, "image": "nginx:1.25", "imageID": "",
         "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}}}]}}
    k("-n", "tables", "patch", "pod", "web", "--subresource=status", "--type=merge", "-p", json.dumps(status))
    lines = [line.split() for line in k("get", "pods", "-A").stdout.splitlines()]
    assert lines[0] == ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert ["tables", "web", "1/1", "Running", "0"] in [row[:5] for row in lines[1:]]
    wide = k("-n", "tables", "get", "pods", "-o", "wide").stdout.splitlines()
    assert wide[0].split()[:8] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE", "NOMINATED"]
    assert "10.244.0.7" in wide[1]
    svc = k("-n", "tables", "create", "service", "clusterip", "web", "--tcp=80:8080")
    assert svc.returncode == 0
    row = k("-n", "tables", "get", "svc", "web", "--no-headers").stdout.split()
    assert row[1] == "ClusterIP" and row[2].startswith("10.") and row[4] == "80/TCP"


def test_unauthenticated_clients_get_401(apiserver: ApiServer, tmp_path: Path) -> None:
    intruder = write_kubeconfig(tmp_path / "intruder.kubeconfig", apiserver.port, apiserver.pki, user="intruder")
    res = apiserver.kubectl("get", "pods", kubeconfig=intruder, check=False)
    assert res.returncode == 1
    assert "error: You must be logged in to the server (Unauthorized)" in res.stderr
    code, body = apiserver.request("/api/v1/namespaces", user=None)
    assert code == 401 and json.loads(body)["reason"] == "Unauthorized"
    code, body = apiserver.request("/api/v1/namespaces", user="intruder")
    assert code == 401
    code, _ = apiserver.request("/api/v1/namespaces")
    assert code == 200
    assert apiserver.request("/livez", user=None)[0] == 200  # like --anonymous-auth=true: health is public


@pytest.mark.parametrize("binary", KUBECTL_VERSIONS, ids=[p.name for p in KUBECTL_VERSIONS])
def test_every_installed_kubectl(apiserver: ApiServer, tmp_path: Path, binary: Path) -> None:
    ns = "v-" + binary.name.split("kubectl.")[1].replace(".", "-")

    def k(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return apiserver.kubectl(*args, binary=str(binary), check=check)

    k("create", "namespace", ns)  # kubectl >= 1.32 sends this as protobuf
    k("-n", ns, "create", "configmap", "c", "--from-literal=a=b")
    k("-n", ns, "create", "deployment", "typed", "--image=nginx", "--replicas=0")
    manifest = write(tmp_path, "d.yaml", DEPLOYMENT.format(name="web", replicas=1, image="nginx:1"))
    k("-n", ns, "apply", "-f", manifest)
    k("-n", ns, "apply", "--server-side", "--force-conflicts", "-f", manifest)
    k("-n", ns, "scale", "deployment", "web", "--replicas=2")
    rows = k("-n", ns, "get", "deploy,cm").stdout
    assert "deployment.apps/web" in rows and "configmap/c" in rows
    assert k("-n", ns, "get", "deploy", "typed", "-o", "jsonpath={.spec.replicas}").stdout == "0"
    assert k("-n", ns, "get", "deploy", "web", "-o", "jsonpath={.spec.replicas}").stdout == "2"
    k("delete", "namespace", ns)
    assert k("get", "namespace", ns, check=False).returncode != 0
