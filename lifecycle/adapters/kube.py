"""The Kubernetes API through kubernetes_asyncio (`KubeApiFactory`): list and watch pods, server-side apply, get.

kubernetes_asyncio is imported on first connect (it costs ~1 s and 60 MB). The client key it unpacks from the
kubeconfig goes to a private temp dir (0700) removed when the connection closes; nothing else is left on disk.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from lifecycle.ports import KubeApi, KubeApiError

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
        from kubernetes_asyncio import client, config

        key_dir = tempfile.mkdtemp(prefix="lifecycle-kube-")  # mode 0700: holds the client key while connected
        try:
            configuration = client.Configuration()
            try:
                await config.load_kube_config(
                    config_file=str(kubeconfig),
                    client_configuration=configuration,
                    persist_config=False,
                    temp_file_path=key_dir,
                )
            except (config.ConfigException, OSError, ValueError, KeyError, TypeError) as exc:
                raise KubeApiError(f"{kubeconfig}: cannot use kubeconfig: {exc}", reason="InvalidKubeconfig") from exc
            async with client.ApiClient(configuration=configuration) as api_client:
                yield _KubeClient(api_client, request_timeout_s=self._request_timeout_s)
        finally:
            _forget_temp_files(key_dir)
            shutil.rmtree(key_dir, ignore_errors=True)


def _forget_temp_files(key_dir: str) -> None:
    """kubernetes_asyncio caches unpacked cert/key files by content in a module dict; drop entries for our dir,
    or the next connect with the same kubeconfig would be handed the paths we just deleted."""
    from kubernetes_asyncio.config import kube_config

    cache = getattr(kube_config, "_temp_files", None)
    if isinstance(cache, dict):
        for content, path in list(cache.items()):
            if str(path).startswith(key_dir + "/"):
                del cache[content]


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

    async def watch_pods(self, namespace: str, *, timeout_s: float) -> AsyncGenerator[dict[str, Any], None]:
        from kubernetes_asyncio import client, watch
        from kubernetes_asyncio.client.exceptions import ApiException

        core = client.CoreV1Api(self._api)
        # return_type "object": events stay plain dicts (building V1Pod models is slow and unused).
        watcher = watch.Watch(return_type="object")
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
                auth_settings=["BearerToken"],  # kubeconfigs with a token; client certs need nothing here
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


def _collection_path(api_version: str, *, resource: str, namespace: str | None) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{base}/namespaces/{namespace}/{resource}" if namespace else f"{base}/{resource}"
