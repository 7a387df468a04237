"""KubernetesApiFactory against the simulated node's real HTTPS API server (client-certificate auth):
list/watch pods, server-side apply (create, update, discovery for kinds outside the table), get, errors."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import ipaddress
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import free_port
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lifecycle.adapters.kube import KubernetesApiFactory
from lifecycle.ports import KubeApi, KubeApiError

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ApiServer:
    kubeconfig: Path
    port: int


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    root = tmp_path_factory.mktemp("node")
    pki = root / "etc" / "kubernetes" / "pki"
    pki.mkdir(parents=True)
    ca_key, ca_cert = _issue("kubernetes", (), None, ca=True)
    server_key, server_cert = _issue("kube-apiserver", (), (ca_key, ca_cert), server=True)
    client_key, client_cert = _issue("kubernetes-admin", ("system:masters",), (ca_key, ca_cert))
    for name, key, cert in (("ca", ca_key, ca_cert), ("apiserver", server_key, server_cert)):
        (pki / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (pki / f"{name}.key").write_bytes(_key_pem(key))
        (pki / f"{name}.key").chmod(0o600)
    port = free_port()
    kubeconfig = root / "etc" / "kubernetes" / "admin.conf"
    kubeconfig.write_text(_kubeconfig(f"https://127.0.0.1:{port}", ca_cert, client_cert, client_key))
    env = {**os.environ, "SIMNODE_ROOT": str(root), "PYTHONPATH": str(REPO)}
    log = open(root / "apiserver.log", "wb")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(
        [sys.executable, "-m", "simnode", "kube-apiserver", "--advertise-address=127.0.0.1",
         f"--secure-port={port}", "--bind-address=127.0.0.1",
         "--tls-cert-file=/etc/kubernetes/pki/apiserver.crt",
         "--tls-private-key-file=/etc/kubernetes/pki/apiserver.key",
         "--client-ca-file=/etc/kubernetes/pki/ca.crt", "--service-cluster-ip-range=10.96.0.0/12"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
    )
    try:
        _wait_ready(kubeconfig, proc, root / "apiserver.log")
        yield ApiServer(kubeconfig=kubeconfig, port=port)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
async def api(api_server: ApiServer) -> AsyncIterator[KubeApi]:
    async with KubernetesApiFactory().connect(api_server.kubeconfig) as client:
        yield client


def _deployment(name: str, *, replicas: int = 1, image: str = "127.0.0.1:5000/pause:3.10") -> dict[str, object]:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "kube-system"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                         "spec": {"containers": [{"name": "c", "image": image}]}},
        },
    }


async def test_server_side_apply_creates_then_updates_with_our_field_manager(api: KubeApi) -> None:
    name = f"apply-{uuid.uuid4().hex[:8]}"
    created = await api.apply(_deployment(name), field_manager="lifecycle")
    assert created["metadata"]["name"] == name
    updated = await api.apply(_deployment(name, replicas=3), field_manager="lifecycle")
    assert updated["spec"]["replicas"] == 3
    assert updated["metadata"]["uid"] == created["metadata"]["uid"]
    managers = {m.get("manager") for m in updated["metadata"].get("managedFields", [])}
    assert "lifecycle" in managers
    fetched = await api.get("apps/v1", "Deployment", name, "kube-system")
    assert fetched is not None and fetched["spec"]["replicas"] == 3


async def test_cluster_scoped_and_discovered_kinds_are_applied(api: KubeApi) -> None:
    suffix = uuid.uuid4().hex[:8]
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": f"role-{suffix}"},
            "rules": [{"apiGroups": [""], "resources": ["services"], "verbs": ["get"]}]}
    await api.apply(role, field_manager="lifecycle")
    assert await api.get("rbac.authorization.k8s.io/v1", "ClusterRole", f"role-{suffix}", None) is not None
    # EndpointSlice is not in the adapter's table: found through API discovery.
    slice_ = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
              "metadata": {"name": f"slice-{suffix}", "namespace": "default"},
              "addressType": "IPv4", "endpoints": [], "ports": []}
    await api.apply(slice_, field_manager="lifecycle")
    assert await api.get("discovery.k8s.io/v1", "EndpointSlice", f"slice-{suffix}", "default") is not None


async def test_get_of_a_missing_object_is_none_and_unknown_kinds_fail(api: KubeApi) -> None:
    assert await api.get("v1", "ConfigMap", f"absent-{uuid.uuid4().hex[:8]}", "kube-system") is None
    with pytest.raises(KubeApiError) as caught:
        await api.get("example.com/v1", "Widget", "w", "default")
    assert caught.value.status == 404


async def test_an_invalid_object_is_rejected_with_the_servers_reason(api: KubeApi) -> None:
    bad = _deployment("Not_A_Valid_Name")
    with pytest.raises(KubeApiError) as caught:
        await api.apply(bad, field_manager="lifecycle")
    assert caught.value.status is not None and 400 <= caught.value.status < 500
    assert "Not_A_Valid_Name" in caught.value.message


async def test_pods_are_listed_and_watched(api: KubeApi) -> None:
    name = f"watched-{uuid.uuid4().hex[:8]}"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "kube-system",
                                                           "labels": {"component": name}},
           "spec": {"containers": [{"name": "c", "image": "127.0.0.1:5000/pause:3.10"}]}}
    seen: list[str] = []

    async def watch() -> None:
        async with contextlib.aclosing(api.watch_pods("kube-system", timeout_s=10)) as events:
            async for event in events:
                if event["object"]["metadata"]["name"] == name:
                    seen.append(event["type"])
                    return

    watcher = asyncio.create_task(watch(), name="watch-under-test")
    await asyncio.sleep(0.3)
    await api.apply(pod, field_manager="lifecycle")
    await asyncio.wait_for(watcher, timeout=10)
    assert seen == ["ADDED"]
    names = [p["metadata"]["name"] for p in await api.list_pods("kube-system")]
    assert name in names


async def test_the_watch_ends_when_its_timeout_passes(api: KubeApi) -> None:
    started = time.monotonic()
    async with contextlib.aclosing(api.watch_pods(f"ns-{uuid.uuid4().hex[:6]}", timeout_s=1)) as events:
        async for _ in events:
            pass
    assert time.monotonic() - started < 5


async def test_connections_write_no_key_and_close_every_file(
    api_server: ApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 8, defects 7 and 9: kubernetes_asyncio's kubeconfig loader wrote the CA, certificate and key to temp
    files and kept 3 descriptors open per connection. 20 connections: no new descriptor, none to a deleted file,
    and the key in no file of the temp dir while connected or after."""
    key_pem = _client_key_pem(api_server.kubeconfig)
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))  # where a temp file would go: scanned below
    async with KubernetesApiFactory().connect(api_server.kubeconfig) as api:  # imports, loop and pool warm-up
        await api.list_pods("kube-system")
    before = await _settled_fds(len(_open_fds()))
    for _ in range(20):
        async with KubernetesApiFactory().connect(api_server.kubeconfig) as api:
            await api.list_pods("kube-system")
            assert not _files_holding(key_pem, private_tmp)
    after = await _settled_fds(len(before))
    print(f"fds before: {len(before)}, after 20 connections: {len(after)}")
    # (pytest's output capture holds deleted temp files of its own: only descriptors new since `before` count.)
    assert [t for fd, t in after.items() if t.endswith("(deleted)") and before.get(fd) != t] == []
    assert len(after) - len(before) == 0, sorted(set(after.values()) - set(before.values()))
    assert not _files_holding(key_pem, private_tmp)


# OpenSSL work that parses the kubeconfig's CA, certificate or key (C methods of ssl.SSLContext).
_TLS_LOADS = {"load_cert_chain", "load_verify_locations", "load_default_certs", "set_default_verify_paths"}


async def test_a_connection_loads_its_tls_material_off_the_loop(api_server: ApiServer) -> None:
    """Issue 11: `ApiClient()` built its SSL context on the event loop, 1.5-4 ms of CPU per connection that held
    back the events published meanwhile. A profiler on the loop's thread sees no TLS loading while a connection
    is made and used, and the connection still verifies the server and presents the client certificate."""
    async with KubernetesApiFactory().connect(api_server.kubeconfig) as api:  # imports, once
        await api.list_pods("kube-system")
    on_loop: list[str] = []

    def profile(frame: object, event: str, arg: object) -> None:
        if event == "c_call" and getattr(arg, "__name__", "") in _TLS_LOADS:
            on_loop.append(str(getattr(arg, "__qualname__", arg)))

    sys.setprofile(profile)  # this thread only: the loop's
    try:
        async with KubernetesApiFactory().connect(api_server.kubeconfig) as api:
            pods = await api.list_pods("kube-system")
    finally:
        sys.setprofile(None)
    assert on_loop == [], f"TLS material loaded on the event loop: {on_loop}"
    assert isinstance(pods, list)


async def test_the_api_client_has_what_the_librarys_own_construction_sets(api_server: ApiServer) -> None:
    """The adapter builds kubernetes_asyncio's ApiClient and RESTClientObject around its own SSL context (the
    library offers no way to pass one): every attribute their constructors set must be there, so that a new
    version of the library that sets more fails here rather than in a cluster."""
    from kubernetes_asyncio import client

    async with KubernetesApiFactory().connect(api_server.kubeconfig) as api:
        ours = api._api  # type: ignore[attr-defined]
        theirs = client.ApiClient(configuration=client.Configuration(host="https://127.0.0.1:1"))
        try:
            assert sorted(vars(ours)) == sorted(vars(theirs))
            assert sorted(vars(ours.rest_client)) == sorted(vars(theirs.rest_client))
            assert ours.default_headers == theirs.default_headers
            assert ours.rest_client.pool_manager._read_bufsize == theirs.rest_client.pool_manager._read_bufsize
            assert ours.rest_client.pool_manager.trust_env == theirs.rest_client.pool_manager.trust_env
            assert ours.rest_client.pool_manager.connector.limit == theirs.rest_client.pool_manager.connector.limit
        finally:
            await theirs.close()


async def test_services_are_listed_watched_from_the_lists_version_and_get_an_ingress(api_server: ApiServer) -> None:
    """The ServicesApi of the exposure watch (issue 9): a watch from the list's resourceVersion sees a Service made
    after the list (and not the ones before it), the ingress goes through services/status, and 20 watches
    left early (`aclosing`) leave no descriptor behind."""
    factory = KubernetesApiFactory()
    name = f"lb-{uuid.uuid4().hex[:8]}"
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
               "spec": {"type": "LoadBalancer", "ports": [{"port": 8080, "targetPort": 80}]}}
    async with factory.connect_services(api_server.kubeconfig) as services, \
            factory.connect(api_server.kubeconfig) as api:
        items, version = await services.list_services()
        assert version and all(s["kind"] == "Service" or "spec" in s for s in items)
        seen: list[tuple[str, str]] = []

        async def watch() -> None:
            async with contextlib.aclosing(services.watch_services(resource_version=version, timeout_s=10)) as events:
                async for event in events:
                    seen.append((event["type"], event["object"]["metadata"]["name"]))
                    if event["object"]["metadata"]["name"] == name:
                        return

        watcher = asyncio.create_task(watch(), name="services-watch-under-test")
        # An event over aiohttp's 128 KiB line limit (annotations may hold 256 KiB) comes through whole.
        big = {**service, "metadata": {**service["metadata"], "annotations": {"note": "x" * 200_000}}}
        await api.apply(big, field_manager="lifecycle")
        await asyncio.wait_for(watcher, timeout=10)
        assert seen == [("ADDED", name)]
        updated = await services.set_load_balancer_ingress("default", name, [{"hostname": "localhost"}])
        assert updated["status"]["loadBalancer"]["ingress"] == [{"hostname": "localhost"}]
        assert updated["spec"]["ports"][0]["nodePort"] >= 30000
        with pytest.raises(KubeApiError) as refused:
            await services.set_load_balancer_ingress("default", name, [{"hostname": "127.0.0.1"}])
        assert refused.value.status == 422
        with pytest.raises(KubeApiError) as missing:
            await services.set_load_balancer_ingress("default", f"{name}-gone", [{"hostname": "localhost"}])
        assert missing.value.status == 404

        _, version = await services.list_services()
        before = await _settled_fds(len(_open_fds()))
        for _ in range(20):
            async with contextlib.aclosing(services.watch_services(resource_version=version, timeout_s=30)) as events:
                waiting = asyncio.create_task(anext(events), name="services-watch-left-early")
                await asyncio.sleep(0.05)
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)
        after = await _settled_fds(len(before))
        assert len(after) <= len(before), sorted(set(after.values()) - set(before.values()))


def test_a_killed_client_leaves_no_key_in_the_temp_dir(api_server: ApiServer, tmp_path: Path) -> None:
    """Issue 8, defect 7: SIGKILL while connected left /tmp/lifecycle-kube-* holding the admin key."""
    key_pem = _client_key_pem(api_server.kubeconfig)
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from lifecycle.adapters.kube import KubernetesApiFactory\n"
        "async def main():\n"
        "    async with KubernetesApiFactory().connect(Path(sys.argv[1])) as api:\n"
        "        await api.list_pods('kube-system')\n"
        "        print('connected', flush=True)\n"
        "        await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "TMPDIR": str(private_tmp), "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", script, str(api_server.kubeconfig)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line == b"connected\n", child.stderr.read() if child.stderr else line
    finally:
        child.kill()
        child.communicate()
    assert not _files_holding(key_pem, private_tmp)


def _client_key_pem(kubeconfig: Path) -> bytes:
    doc = yaml.safe_load(kubeconfig.read_text())
    return base64.b64decode(doc["users"][0]["user"]["client-key-data"])


def _open_fds() -> dict[str, str]:
    found: dict[str, str] = {}
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone already
            found[fd.name] = str(fd.readlink())
    return found


async def _settled_fds(expected: int) -> dict[str, str]:
    """Open descriptors once closing TLS connections are done (aiohttp closes them a little after the session)."""
    deadline = time.monotonic() + 2
    fds = _open_fds()
    while len(fds) > expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        fds = _open_fds()
    return fds


def _files_holding(secret: bytes, directory: Path) -> list[Path]:
    return [path for path in directory.rglob("*") if path.is_file() and secret.strip() in path.read_bytes()]


async def test_an_unreachable_server_is_an_error_without_status(tmp_path: Path, api_server: ApiServer) -> None:
    doc = yaml.safe_load(api_server.kubeconfig.read_text())
    doc["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{free_port()}"
    moved = tmp_path / "moved.conf"
    moved.write_text(yaml.safe_dump(doc))
    async with KubernetesApiFactory(request_timeout_s=3).connect(moved) as api:
        with pytest.raises(KubeApiError) as caught:
            await api.list_pods("kube-system")
    assert caught.value.status is None


async def test_an_unusable_kubeconfig_is_named(tmp_path: Path) -> None:
    broken = tmp_path / "broken.conf"
    broken.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\n")
    with pytest.raises(KubeApiError) as caught:
        async with KubernetesApiFactory().connect(broken):
            pass
    assert str(broken) in caught.value.message


# ---- PKI and kubeconfig ----------------------------------------------------------------------------------


def _issue(
    cn: str, orgs: tuple[str, ...], issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None,
    *, ca: bool = False, server: bool = False,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
                     + [x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder().subject_name(name)
        .issuer_name(issuer[1].subject if issuer else name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = builder.sign(issuer[0] if issuer else key, hashes.SHA256())
    return key, cert


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _kubeconfig(server: str, ca: x509.Certificate, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> str:
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {
            "server": server, "certificate-authority-data": b64(ca.public_bytes(serialization.Encoding.PEM))}}],
        "users": [{"name": "admin", "user": {
            "client-certificate-data": b64(cert.public_bytes(serialization.Encoding.PEM)),
            "client-key-data": b64(_key_pem(key))}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
    })


def _wait_ready(kubeconfig: Path, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    """Real kubectl says when the server is ready (and proves the certificates work for a Go client too)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"kube-apiserver exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        probe = subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", "get", "--raw", "/readyz"],
                               capture_output=True, text=True, timeout=10)
        if probe.returncode == 0 and probe.stdout.strip() == "ok":
            return
        time.sleep(0.2)
    raise AssertionError(f"kube-apiserver not ready within 30s:\n{log_path.read_text()[-3000:]}")
