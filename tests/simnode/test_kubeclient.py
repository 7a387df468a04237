"""KubeClient against a real HTTPS server that requires client certificates (aiohttp, in-process)."""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).parent))
from test_kubelet_support import Pki, free_port, write_kubeconfig

from simnode.kubeclient import ApiError, ApiUnavailable, KubeClient, KubeconfigError
from simnode.paths import NodeRoot


class FakeApi:
    """Just enough API behaviour to exercise the client; records what it was sent."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.seen: list[dict[str, Any]] = []
        self.ready = True

    def status(self, code: int, reason: str, message: str) -> web.Response:
        body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                "reason": reason, "message": message}
        return web.json_response(body, status=code)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        cn = dict(x[0] for x in peer["subject"]).get("commonName") if peer else None
        body = await request.text()
        self.seen.append({"method": request.method, "path": request.path, "query": dict(request.query),
                          "content_type": request.headers.get("Content-Type"), "cn": cn, "body": body})
        path = request.path
        if path == "/readyz":
            return web.Response(text="ok" if self.ready else "not ready", status=200 if self.ready else 500)
        if request.query.get("watch") == "true":
            return await self.watch(request)
        if request.method == "POST":
            obj = json.loads(body)
            key = f"{path}/{obj['metadata']['name']}"
            if key in self.objects:
                return self.status(409, "AlreadyExists", f"configmaps \"{obj['metadata']['name']}\" already exists")
            self.objects[key] = obj
            return web.json_response(obj, status=201)
        if request.method == "GET" and path in self.objects:
            return web.json_response(self.objects[path])
        if request.method == "GET" and path == CM:
            items = [o for k, o in self.objects.items() if k.startswith(path + "/")]
            return web.json_response({"kind": "ConfigMapList", "items": items})
        if request.method == "PATCH" and path in self.objects:
            return web.json_response(self.objects[path])
        if request.method == "DELETE" and path in self.objects:
            return web.json_response(self.objects.pop(path))
        return self.status(404, "NotFound", f"{path} not found")

    async def watch(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        if request.query.get("resourceVersion") == "1":
            gone = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version: 1"}
            await resp.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
            return resp
        for i, kind in enumerate(("ADDED", "MODIFIED", "DELETED")):
            obj = {"metadata": {"name": "w", "resourceVersion": str(10 + i)}}
            await resp.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
            await asyncio.sleep(0.01)
        return resp


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[FakeApi, Pki, str]]:
    pki = Pki.create()
    cert, key = pki.issue("kube-apiserver", server=True)
    (tmp_path / "srv.crt").write_bytes(cert)
    (tmp_path / "srv.key").write_bytes(key)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cadata=pki.ca_pem.decode())
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(tmp_path / "srv.crt", tmp_path / "srv.key")
    api = FakeApi()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", api.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx)
    await site.start()
    try:
        yield api, pki, f"https://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


CM = "/api/v1/namespaces/default/configmaps"


async def test_inline_kubeconfig_crud_and_errors(server: tuple[FakeApi, Pki, str], tmp_path: Path) -> None:
    api, pki, url = server
    cert, key = pki.issue("system:node:n1", orgs=("system:nodes",))
    kc = write_kubeconfig(tmp_path / "kubelet.conf", url, pki, cert, key)
    async with KubeClient.from_kubeconfig(kc) as client:
        assert client.server == url
        created = await client.create(CM, {"metadata": {"name": "a"}, "data": {"k": "v"}})
        assert created["data"] == {"k": "v"}
        assert (await client.get(f"{CM}/a"))["data"] == {"k": "v"}
        # ensure: an existing object is returned instead of failing with 409
        assert (await client.ensure(CM, {"metadata": {"name": "a"}, "data": {"k": "other"}}))["data"] == {"k": "v"}
        with pytest.raises(ApiError) as err:
            await client.create(CM, {"metadata": {"name": "a"}})
        assert (err.value.status, err.value.reason) == (409, "AlreadyExists")
        with pytest.raises(ApiError) as err:
            await client.get(f"{CM}/missing")
        assert (err.value.status, err.value.reason) == (404, "NotFound")
        assert "missing" in err.value.message
        await client.list(CM, label_selector="app=x", field_selector="metadata.name=a")
        await client.delete(f"{CM}/a", grace_period_s=0)
    assert {s["cn"] for s in api.seen} == {"system:node:n1"}, "client certificate was not presented"
    lst = next(s for s in api.seen if s["method"] == "GET" and s["path"] == CM)
    assert lst["query"] == {"labelSelector": "app=x", "fieldSelector": "metadata.name=a"}
    delete = next(s for s in api.seen if s["method"] == "DELETE")
    assert json.loads(delete["body"])["gracePeriodSeconds"] == 0


async def test_patch_types(server: tuple[FakeApi, Pki, str], tmp_path: Path) -> None:
    api, pki, url = server
    cert, key = pki.issue("kubernetes-admin", orgs=("system:masters",))
    kc = write_kubeconfig(tmp_path / "admin.conf", url, pki, cert, key)
    async with KubeClient.from_kubeconfig(kc) as client:
        await client.create(CM, {"metadata": {"name": "p"}})
        await client.patch(f"{CM}/p", {"data": {"a": "1"}})
        await client.patch(f"{CM}/p", {"data": {"a": "2"}}, patch_type="strategic")
        await client.patch(f"{CM}/p", [{"op": "add", "path": "/data/b", "value": "3"}], patch_type="json")
        await client.patch(f"{CM}/p", {"data": {}}, patch_type="apply", field_manager="kubeadm", force=True)
        with pytest.raises(ValueError, match="unknown patch_type"):
            await client.patch(f"{CM}/p", {}, patch_type="bogus")
    patches = [s for s in api.seen if s["method"] == "PATCH"]
    assert [p["content_type"] for p in patches] == [
        "application/merge-patch+json",
        "application/strategic-merge-patch+json",
        "application/json-patch+json",
        "application/apply-patch+yaml",
    ]
    assert patches[-1]["query"] == {"fieldManager": "kubeadm", "force": "true"}


async def test_watch_events_and_expired(server: tuple[FakeApi, Pki, str], tmp_path: Path) -> None:
    _, pki, url = server
    cert, key = pki.issue("admin")
    kc = write_kubeconfig(tmp_path / "a.conf", url, pki, cert, key)
    async with KubeClient.from_kubeconfig(kc) as client:
        events = [e async for e in client.watch(CM, resource_version="5", timeout_s=5)]
        assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]
        assert events[-1]["object"]["metadata"]["resourceVersion"] == "12"
        with pytest.raises(ApiError) as err:
            async for _ in client.watch(CM, resource_version="1"):
                pass
        assert err.value.status == 410


async def test_file_references_are_rerooted(server: tuple[FakeApi, Pki, str], tmp_path: Path) -> None:
    api, pki, url = server
    root = NodeRoot(tmp_path / "node")
    cert, key = pki.issue("system:kube-scheduler")
    rooted = write_kubeconfig(root.path("/etc/kubernetes/scheduler.conf"), url, pki, cert, key, inline=False)
    # Rewrite the file references as the real paths kubeadm would write.
    text = rooted.read_text().replace(str(root.root), "")
    rooted.write_text(text)
    assert "/etc/kubernetes/ca.crt" in text
    async with KubeClient.from_kubeconfig(Path("/etc/kubernetes/scheduler.conf"), root=root) as client:
        assert await client.readyz()
        api.ready = False
        assert not await client.readyz()
    assert api.seen[-1]["cn"] == "system:kube-scheduler"


async def test_unreachable_and_untrusted(server: tuple[FakeApi, Pki, str], tmp_path: Path) -> None:
    _, pki, url = server
    cert, key = pki.issue("admin")
    other = Pki.create()
    # Trusting another CA must fail the TLS handshake, not silently connect.
    untrusted = write_kubeconfig(tmp_path / "u.conf", url, other, cert, key)
    async with KubeClient.from_kubeconfig(untrusted, timeout_s=3) as client:
        assert not await client.readyz()
        with pytest.raises(ApiUnavailable):
            await client.get("/api/v1/namespaces")
    closed = write_kubeconfig(tmp_path / "c.conf", f"https://127.0.0.1:{free_port()}", pki, cert, key)
    async with KubeClient.from_kubeconfig(closed, timeout_s=3) as client:
        assert not await client.readyz()
        with pytest.raises(ApiUnavailable) as err:
            await client.get("/api/v1/namespaces")
        assert err.value.status == 0


def test_bad_kubeconfigs(tmp_path: Path) -> None:
    with pytest.raises(KubeconfigError, match="cannot read kubeconfig"):
        KubeClient.from_kubeconfig(tmp_path / "nope.conf")
    bad = tmp_path / "bad.conf"
    bad.write_text("apiVersion: v1\nkind: Config\nclusters: []\n")
    with pytest.raises(KubeconfigError, match="no current-context"):
        KubeClient.from_kubeconfig(bad)
    pki = Pki.create()
    cert, key = pki.issue("x")
    kc = write_kubeconfig(tmp_path / "k.conf", "https://127.0.0.1:1", pki, cert, key)
    kc.write_text(kc.read_text().replace("client-key-data: ", "client-key-data: '!!!'\n  x: "))
    with pytest.raises(KubeconfigError, match="client-key-data is not valid base64"):
        KubeClient.from_kubeconfig(kc)
    kc2 = write_kubeconfig(tmp_path / "k2.conf", "https://127.0.0.1:1", pki, key, cert)  # swapped
    with pytest.raises(KubeconfigError, match="do not load"):
        KubeClient.from_kubeconfig(kc2)


async def test_combined_pem_like_kubelet_finalize(server: tuple[FakeApi, Pki, str], tmp_path: Path) -> None:
    """kubeadm's kubelet-finalize points client-certificate and client-key at one pem holding both."""
    api, pki, url = server
    root = NodeRoot(tmp_path / "node")
    cert, key = pki.issue("system:node:n1", orgs=("system:nodes",))
    pem = root.path("/var/lib/kubelet/pki/kubelet-client-current.pem")
    pem.parent.mkdir(parents=True)
    pem.write_bytes(cert + key)
    kc = write_kubeconfig(root.path("/etc/kubernetes/kubelet.conf"), url, pki, cert, key)
    text = kc.read_text().split("users:")[0] + (
        "users:\n- name: admin\n  user:\n"
        "    client-certificate: /var/lib/kubelet/pki/kubelet-client-current.pem\n"
        "    client-key: /var/lib/kubelet/pki/kubelet-client-current.pem\n"
    )
    kc.write_text(text)
    async with KubeClient.from_kubeconfig(Path("/etc/kubernetes/kubelet.conf"), root=root) as client:
        with pytest.raises(ApiError):
            await client.get(f"{CM}/none")
    assert api.seen[-1]["cn"] == "system:node:n1"
