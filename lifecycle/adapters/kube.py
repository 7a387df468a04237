"""The Kubernetes API through kubernetes_asyncio (`KubeApiFactory`): list and watch pods, server-side apply, get.

kubernetes_asyncio is imported in a thread (~1 s of CPU, ~36 MB of RSS): by `preload`, which `serve` calls at
start, or else by the first connect. The kubeconfig's CA,
client certificate and key never reach a disk: they are loaded into the connection's SSL context from memory
files (`lifecycle.tls`), not through kubernetes_asyncio's kubeconfig loader, which writes them to temp files.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import json
import os
import shutil
import ssl
import tempfile
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lifecycle.kubefiles import KubeconfigContent, parse_kubeconfig
from lifecycle.ports import KubeApi, KubeApiError, ServicesApi
from lifecycle.tls import client_context

# Where versions before the in-memory credentials unpacked the client key (kubernetes_asyncio's temp files).
LEGACY_KEY_DIR_PREFIX = "lifecycle-kube-"

# apiVersion, kind -> (resource, namespaced) for what our manifests and steps use; anything else is looked up
# through API discovery once per connection.
_KNOWN_KINDS: dict[tuple[str, str], tuple[str, bool]] = {
    ("v1", "Pod"): ("pods", True),
    ("v1", "Service"): ("services", True),
    ("v1", "ServiceAccount"): ("serviceaccounts", True),
    ("v1", "ConfigMap"): ("configmaps", True),
    ("v1", "Secret"): ("secrets", True),
    ("v1", "Endpoints"): ("endpoints", True),
    ("v1", "PersistentVolumeClaim"): ("persistentvolumeclaims", True),
    ("v1", "PersistentVolume"): ("persistentvolumes", False),
    ("v1", "Namespace"): ("namespaces", False),
    ("v1", "Node"): ("nodes", False),
    ("apps/v1", "Deployment"): ("deployments", True),
    ("apps/v1", "DaemonSet"): ("daemonsets", True),
    ("apps/v1", "StatefulSet"): ("statefulsets", True),
    ("apps/v1", "ReplicaSet"): ("replicasets", True),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): ("clusterroles", False),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): ("clusterrolebindings", False),
    ("rbac.authorization.k8s.io/v1", "Role"): ("roles", True),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("rolebindings", True),
    ("storage.k8s.io/v1", "StorageClass"): ("storageclasses", False),
    ("coordination.k8s.io/v1", "Lease"): ("leases", True),
    ("policy/v1", "PodDisruptionBudget"): ("poddisruptionbudgets", True),
}


class KubernetesApiFactory:
    """`KubeApiFactory`: one `ApiClient` per `connect`, configured from a kubeconfig (no global state)."""

    def __init__(self, *, request_timeout_s: float = 10.0) -> None:
        self._request_timeout_s = request_timeout_s

    @contextlib.asynccontextmanager
    async def connect(self, kubeconfig: Path) -> AsyncIterator[KubeApi]:
        await _import_kubernetes_asyncio()
        content = await asyncio.to_thread(_read_kubeconfig, kubeconfig)  # YAML: off the loop
        async with _api_client(content) as api_client:
            yield _KubeClient(api_client, request_timeout_s=self._request_timeout_s)

    async def preload(self) -> None:
        await _import_kubernetes_asyncio()

    @contextlib.asynccontextmanager
    async def connect_services(self, kubeconfig: Path) -> AsyncIterator[ServicesApi]:
        """The same connection as `connect` (one ApiClient, closed on exit), seen as a `ServicesApi`."""
        async with self.connect(kubeconfig) as api:
            assert isinstance(api, _KubeClient)
            yield api


# Held by the thread that imports kubernetes_asyncio: a second caller waits for it in its own thread.
_import_lock = threading.Lock()
_imported = False


def _load_kubernetes_asyncio() -> None:
    """Import kubernetes_asyncio once; a caller that comes while another thread imports waits for it here.
    (A module is in `sys.modules` from the start of its import: a check of that lets a connect go on while the
    preload is half way, and its `from kubernetes_asyncio import client` then waits for the module's import lock
    on the event loop, for up to the rest of that second.)"""
    global _imported
    with _import_lock:
        if _imported:
            return
        for module in ("kubernetes_asyncio.client", "kubernetes_asyncio.watch", "aiohttp"):
            importlib.import_module(module)
        # The import leaves ~1 M objects that live as long as the process: out of the collector's sight, or a
        # full collection walks them all, ~200 ms on the loop at a random moment (seen by lifecycle.loopwatch).
        gc.freeze()
        _imported = True


async def _import_kubernetes_asyncio() -> None:
    """Off the event loop: the first import takes about a second; later ones return at once."""
    if not _imported:
        await asyncio.to_thread(_load_kubernetes_asyncio)


def _read_kubeconfig(kubeconfig: Path) -> KubeconfigContent:
    def read_file(name: str) -> bytes:  # a file named in the kubeconfig: relative to the kubeconfig's dir
        return (kubeconfig.parent / name).read_bytes()

    try:
        content = parse_kubeconfig(kubeconfig.read_bytes(), read_file=read_file)
    except (OSError, ValueError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise KubeApiError(f"{kubeconfig}: cannot use kubeconfig: {detail}", reason="InvalidKubeconfig") from exc
    if urlsplit(content.server).scheme != "https":
        raise KubeApiError(f"{kubeconfig}: cannot use kubeconfig: server {content.server!r} is not an https:// URL",
                           reason="InvalidKubeconfig")
    return content


@contextlib.asynccontextmanager
async def _api_client(content: KubeconfigContent) -> AsyncIterator[Any]:
    """An `ApiClient` whose SSL context holds the kubeconfig's credentials; its connections close on exit.

    The SSL context is built in a thread: parsing the CA, the certificate and the key costs 1.5-4 ms of CPU, which
    on the loop delayed the events published meanwhile (seen in bench_event_latency's tail: readiness, addons and
    the exposure watch connect several times per install)."""
    from kubernetes_asyncio import client

    configuration = client.Configuration(host=content.server.rstrip("/"))
    try:
        context = await asyncio.to_thread(client_context, ca_pem=content.ca_pem, cert_pem=content.cert_pem,
                                          key_pem=content.key_pem)
    except ValueError as exc:
        raise KubeApiError(f"kubeconfig's CA, client certificate or key is unusable: {exc}",
                           reason="InvalidKubeconfig") from exc
    async with _client_over(client, configuration, context) as api_client:
        yield api_client


def _client_over(client: Any, configuration: Any, context: ssl.SSLContext) -> Any:
    """kubernetes_asyncio's `ApiClient` over an SSL context built beforehand. `ApiClient.__init__` and
    `RESTClientObject.__init__` (kubernetes_asyncio 36.1, client/api_client.py and client/rest.py) build their
    own context and offer no way to pass one: this sets the attributes they set, with ours
    (tests/integration/test_kube_adapter.py compares them with a client built the library's way)."""
    import aiohttp

    rest = client.rest.RESTClientObject.__new__(client.rest.RESTClientObject)
    rest.server_hostname = configuration.tls_server_name
    rest.proxy = configuration.proxy
    rest.proxy_headers = configuration.proxy_headers
    rest.pool_manager = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=configuration.connection_pool_maxsize, ssl=context),
        trust_env=True,
        read_bufsize=2**21,  # as the library: watch events of large objects exceed aiohttp's default buffer
    )
    api_client = client.ApiClient.__new__(client.ApiClient)
    api_client.configuration = configuration
    api_client.pool_threads = 1
    api_client.rest_client = rest
    api_client.default_headers = {}
    api_client.cookie = None
    api_client.user_agent = "OpenAPI-Generator/33.3.0+snapshot/python"
    api_client.client_side_validation = configuration.client_side_validation
    return api_client


class _Deserializer:
    """The connection's ApiClient, for a Watch to deserialize with, which the Watch's close() leaves open."""

    def __init__(self, api_client: Any) -> None:
        self._api_client = api_client

    def deserialize(self, *, response: Any, response_type: str) -> Any:
        return self._api_client.deserialize(response=response, response_type=response_type)

    async def close(self) -> None:
        return None


def _plain_watch(watch_class: Any, api_client: Any) -> Any:
    """A kubernetes_asyncio Watch with return_type "object" (events stay plain dicts: V1Pod models are slow and
    unused) that does not build an ApiClient of its own: `Watch.__init__` (kubernetes_asyncio/watch/watch.py)
    calls `ApiClient()`, whose `ssl.create_default_context()` loads the system CA store, 30-60 ms of CPU on the
    event loop at every watch (lifecycle.loopwatch caught it). Sets the attributes that `__init__` sets."""
    watcher = watch_class.__new__(watch_class)
    watcher._raw_return_type = "object"
    watcher._stop = False
    watcher._api_client = _Deserializer(api_client)
    watcher.resource_version = None
    watcher.resp = None
    return watcher


def remove_legacy_key_dirs() -> list[Path]:
    """Temp dirs holding a client key that a killed older version left behind (only this user's): removed."""
    removed: list[Path] = []
    for stale in Path(tempfile.gettempdir()).glob(f"{LEGACY_KEY_DIR_PREFIX}*"):
        with contextlib.suppress(OSError):
            if stale.is_dir() and not stale.is_symlink() and stale.stat().st_uid == os.geteuid():
                shutil.rmtree(stale)
                removed.append(stale)
    return removed


def _transport_errors() -> tuple[type[BaseException], ...]:
    import aiohttp

    return (aiohttp.ClientError, OSError, TimeoutError)


class _KubeClient:
    """`KubeApi` over one `ApiClient`; answers are the API's JSON as dicts (no model classes)."""

    def __init__(self, api_client: Any, *, request_timeout_s: float) -> None:
        self._api = api_client
        self._timeout_s = request_timeout_s
        self._discovered: dict[str, dict[str, tuple[str, bool]]] = {}

    async def list_pods(self, namespace: str) -> list[dict[str, Any]]:
        answer = await self._call("GET", f"/api/v1/namespaces/{namespace}/pods")
        return list(answer.get("items") or [])

    async def list_events(self) -> list[dict[str, Any]]:
        answer = await self._call("GET", "/api/v1/events")
        return list(answer.get("items") or [])

    async def watch_pods(self, namespace: str, *, timeout_s: float) -> AsyncGenerator[dict[str, Any], None]:
        from kubernetes_asyncio import client, watch
        from kubernetes_asyncio.client.exceptions import ApiException

        core = client.CoreV1Api(self._api)
        watcher = _plain_watch(watch.Watch, self._api)
        try:
            stream = watcher.stream(
                core.list_namespaced_pod,
                namespace,
                timeout_seconds=max(1, int(timeout_s)),
                _request_timeout=timeout_s + self._timeout_s,
            )
            async for event in stream:
                yield {"type": event["type"], "object": event["raw_object"]}
        except ApiException as exc:
            raise KubeApiError(f"watch pods in {namespace}: {exc.reason}", status=exc.status) from exc
        except _transport_errors() as exc:
            raise KubeApiError(f"watch pods in {namespace}: {exc or type(exc).__name__}") from exc
        finally:
            await watcher.close()

    async def apply(self, manifest: Mapping[str, Any], *, field_manager: str) -> dict[str, Any]:
        api_version, kind, name = manifest["apiVersion"], manifest["kind"], manifest["metadata"]["name"]
        resource, namespaced = await self._resource(api_version, kind)
        body = json.loads(json.dumps(manifest))  # a private deep copy we may complete
        namespace: str | None = None
        if namespaced:
            namespace = body["metadata"].setdefault("namespace", "default")
        path = f"{_collection_path(api_version, resource=resource, namespace=namespace)}/{name}"
        return await self._call(
            "PATCH",
            path,
            query={"fieldManager": field_manager, "force": "true"},
            body=body,
            # JSON is YAML: the apply patch type takes either.
            content_type="application/apply-patch+yaml",
        )

    async def get(self, api_version: str, kind: str, name: str, namespace: str | None) -> dict[str, Any] | None:
        resource, namespaced = await self._resource(api_version, kind)
        collection = _collection_path(api_version, resource=resource, namespace=namespace if namespaced else None)
        path = f"{collection}/{name}"
        try:
            return await self._call("GET", path)
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list_services(self) -> tuple[list[dict[str, Any]], str]:
        answer = await self._call("GET", "/api/v1/services")
        return list(answer.get("items") or []), str((answer.get("metadata") or {}).get("resourceVersion") or "")

    async def watch_services(self, *, resource_version: str, timeout_s: float) -> AsyncGenerator[dict[str, Any], None]:
        # The watch is read line by line here, not through kubernetes_asyncio's Watch: an ERROR event (410 Gone)
        # must reach the caller as such, and the response must be closed whichever way the caller leaves.
        path = "/api/v1/services"
        query = {"watch": "true", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                 "timeoutSeconds": str(max(1, int(timeout_s)))}
        try:
            response = await self._api.call_api(
                path, "GET", query_params=query, header_params={"Accept": "application/json"},
                _preload_content=False, _request_timeout=timeout_s + self._timeout_s,
            )
        except _transport_errors() as exc:
            raise KubeApiError(f"watch services: {exc or type(exc).__name__}") from exc
        async with response:
            if response.status != 200:
                raw = await response.read()
                raise KubeApiError(f"watch services: {response.status} {raw[:200].decode(errors='replace')}",
                                   status=response.status)
            try:
                async for line in _lines(response.content):
                    event = json.loads(line)
                    if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
                        raise KubeApiError("watch services: an event that is not a JSON object")
                    if event.get("type") == "ERROR":
                        status = event["object"]
                        raise KubeApiError(f"watch services: {status.get('message') or 'error'}",
                                           status=int(status.get("code") or 0) or None,
                                           reason=str(status.get("reason") or ""))
                    yield event
            except ValueError as exc:  # a line that is not JSON
                raise KubeApiError(f"watch services: unreadable event: {exc}") from exc
            except _transport_errors() as exc:
                raise KubeApiError(f"watch services: {exc or type(exc).__name__}") from exc

    async def set_load_balancer_ingress(self, namespace: str, name: str,
                                        ingress: Sequence[Mapping[str, str]]) -> dict[str, Any]:
        # A merge patch of the status subresource, as Docker Desktop's vpnkit-controller and cloud controllers
        # do (k8s.io/cloud-provider controllers/service/controller.go, patchStatus).
        return await self._call(
            "PATCH", f"/api/v1/namespaces/{namespace}/services/{name}/status",
            body={"status": {"loadBalancer": {"ingress": [dict(i) for i in ingress]}}},
            content_type="application/merge-patch+json",
        )

    # ---- internals ---------------------------------------------------------------------------------------

    async def _resource(self, api_version: str, kind: str) -> tuple[str, bool]:
        known = _KNOWN_KINDS.get((api_version, kind))
        if known is not None:
            return known
        if api_version not in self._discovered:
            base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
            listing = await self._call("GET", base)
            self._discovered[api_version] = {
                r["kind"]: (r["name"], bool(r.get("namespaced")))
                for r in listing.get("resources", [])
                if "/" not in r.get("name", "/")  # subresources (pods/status) share the kind
            }
        found = self._discovered[api_version].get(kind)
        if found is None:
            raise KubeApiError(f'no kind "{kind}" is served in version "{api_version}"', status=404,
                               reason="NotFound")
        return found

    async def _call(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        try:
            response = await self._api.call_api(
                path,
                method,
                query_params=dict(query or {}),
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                _preload_content=False,
                _request_timeout=self._timeout_s,
            )
            async with response:
                status, raw = response.status, await response.read()
        except _transport_errors() as exc:
            raise KubeApiError(f"{method} {path}: {exc or type(exc).__name__}") from exc
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            answer = {"message": raw[:200].decode(errors="replace")}
        if not 200 <= status < 300:
            message = answer.get("message") if isinstance(answer, dict) else None
            reason = answer.get("reason", "") if isinstance(answer, dict) else ""
            raise KubeApiError(f"{method} {path}: {status} {message or reason or 'error'}", status=status,
                               reason=str(reason))
        if not isinstance(answer, dict):
            raise KubeApiError(f"{method} {path}: answer is not a JSON object", status=status)
        return answer


MAX_WATCH_EVENT_BYTES = 8 * 1024 * 1024  # an object is at most 1.5 MiB in etcd; JSON escaping can grow it


async def _lines(content: Any) -> AsyncIterator[bytes]:
    """The non-empty lines of a watch stream. aiohttp's own line reading refuses lines over 128 KiB, which a
    Service with large annotations can reach; this one takes up to MAX_WATCH_EVENT_BYTES."""
    buffer = bytearray()
    async for chunk in content.iter_any():
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end])
            del buffer[:end + 1]
            if line.strip():
                yield line
        if len(buffer) > MAX_WATCH_EVENT_BYTES:
            raise KubeApiError(f"watch services: an event longer than {MAX_WATCH_EVENT_BYTES} bytes")
    if bytes(buffer).strip():
        yield bytes(buffer)


def _collection_path(api_version: str, *, resource: str, namespace: str | None) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{base}/namespaces/{namespace}/{resource}" if namespace else f"{base}/{resource}"
