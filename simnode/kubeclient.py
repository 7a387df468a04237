"""A small async Kubernetes API client (aiohttp, TLS client certificates) used by the simulated node.

Reads kubeconfig files like kubectl does (current-context, file references or inline data). Leaves
nothing on disk: the client certificate and key are loaded from an anonymous memory file (memfd), closed at once.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import yaml

from simnode.paths import NodeRoot

PATCH_CONTENT_TYPES: dict[str, str] = {
    "merge": "application/merge-patch+json",
    "strategic": "application/strategic-merge-patch+json",
    "json": "application/json-patch+json",
    "apply": "application/apply-patch+yaml",
}


# A JSON patch (RFC 6902) is a list of operations; named here because KubeClient.list shadows `list`.
JsonPatch = list[dict[str, Any]]


class ApiError(Exception):
    """The API answered with an error Status (or could not be reached: status 0)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class ApiUnavailable(ApiError):
    """No HTTP answer at all (connection refused, TLS failure, timeout)."""

    def __init__(self, message: str) -> None:
        super().__init__(0, "Unavailable", message)


class KubeconfigError(Exception):
    """The kubeconfig file is missing, malformed, or lacks what a client needs."""


def _error_from_body(status: int, text: str) -> ApiError:
    """Build an ApiError from a Status body, falling back to the raw text."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("kind") == "Status":
        return _status_error(body, status)
    return ApiError(status, "", text.strip()[:500])


def _status_error(body: dict[str, Any], status: int) -> ApiError:
    code = int(body.get("code") or status)
    return ApiError(code, str(body.get("reason", "")), str(body.get("message", "")))


def _named(items: Any, name: str, what: str, path: Path) -> dict[str, Any]:
    for item in items or []:
        if isinstance(item, dict) and item.get("name") == name:
            value = item.get(what)
            if isinstance(value, dict):
                return value
    raise KubeconfigError(f"{path}: no {what} named {name!r}")


def _pem(entry: dict[str, Any], key: str, base: Path, root: NodeRoot | None, path: Path) -> bytes | None:
    """The PEM bytes of `<key>-data` (base64) or of the file `<key>` (relative to the kubeconfig)."""
    data = entry.get(f"{key}-data")
    if data:
        try:
            return base64.b64decode(str(data), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise KubeconfigError(f"{path}: {key}-data is not valid base64") from exc
    ref = entry.get(key)
    if not ref:
        return None
    file = Path(str(ref))
    if not file.is_absolute():
        file = base / file
    elif root is not None:
        file = root.path(file)
    try:
        return file.read_bytes()
    except OSError as exc:
        raise KubeconfigError(f"{path}: cannot read {key} {file}: {exc.strerror}") from exc


def _ssl_context(
    ca_pem: bytes | None, cert_pem: bytes | None, key_pem: bytes | None, verify: bool
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem.decode() if ca_pem else None)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert_pem and key_pem:
        # The ssl module loads certificate chains only by path: a memory file's /proc path, never a disk file
        # (a temp dir would keep the key if the process were killed while it exists).
        cert_fd = os.memfd_create("kubeclient-cert", os.MFD_CLOEXEC)
        key_fd = os.memfd_create("kubeclient-key", os.MFD_CLOEXEC)
        try:
            os.write(cert_fd, cert_pem)
            os.write(key_fd, key_pem)
            ctx.load_cert_chain(f"/proc/self/fd/{cert_fd}", f"/proc/self/fd/{key_fd}")
        except ssl.SSLError as exc:
            raise KubeconfigError(f"client certificate and key do not load: {exc.reason}") from exc
        finally:
            os.close(cert_fd)
            os.close(key_fd)
    return ctx


class KubeClient:
    """Async client for one API server; use as `async with KubeClient.from_kubeconfig(p) as c:`."""

    def __init__(
        self,
        server: str,
        *,
        ssl_context: ssl.SSLContext | None,
        token: str | None = None,
        timeout_s: float = 10.0,
        client_cert_pem: bytes | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        self.timeout_s = timeout_s
        # Kept so callers (the kubelet) can read the identity, e.g. the CN system:node:<name>.
        self.client_cert_pem = client_cert_pem
        self._ssl = ssl_context
        self._token = token
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_parts(
        cls,
        server: str,
        ca_pem: bytes | None,
        cert_pem: bytes | None,
        key_pem: bytes | None,
        *,
        token: str | None = None,
        timeout_s: float = 10.0,
    ) -> KubeClient:
        ctx = _ssl_context(ca_pem, cert_pem, key_pem, True) if server.startswith("https") else None
        return cls(server, ssl_context=ctx, token=token, timeout_s=timeout_s, client_cert_pem=cert_pem)

    @classmethod
    def from_kubeconfig(
        cls, path: Path, *, root: NodeRoot | None = None, timeout_s: float = 10.0
    ) -> KubeClient:
        """Client for the current context of a kubeconfig; file references are re-rooted with `root`."""
        path = root.path(path) if root is not None else Path(path)
        try:
            config = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise KubeconfigError(f"cannot read kubeconfig {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise KubeconfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(config, dict) or config.get("kind", "Config") != "Config":
            raise KubeconfigError(f"{path}: not a kubeconfig (kind Config)")
        current = config.get("current-context")
        if not current:
            raise KubeconfigError(f"{path}: no current-context")
        context = _named(config.get("contexts"), str(current), "context", path)
        cluster = _named(config.get("clusters"), str(context.get("cluster")), "cluster", path)
        user = _named(config.get("users"), str(context.get("user")), "user", path)
        server = cluster.get("server")
        if not isinstance(server, str) or not server.startswith(("https://", "http://")):
            raise KubeconfigError(f"{path}: cluster {context.get('cluster')!r} has no http(s) server")
        base = path.parent
        ca = _pem(cluster, "certificate-authority", base, root, path)
        cert = _pem(user, "client-certificate", base, root, path)
        key = _pem(user, "client-key", base, root, path)
        if (cert is None) != (key is None):
            who = context.get("user")
            raise KubeconfigError(f"{path}: user {who!r} needs both a client certificate and a key")
        token = user.get("token")
        verify = not cluster.get("insecure-skip-tls-verify", False)
        ctx = _ssl_context(ca, cert, key, verify) if server.startswith("https://") else None
        return cls(
            server,
            ssl_context=ctx,
            token=str(token) if token else None,
            timeout_s=timeout_s,
            client_cert_pem=cert,
        )

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def set_token(self, token: str) -> None:
        """Use a new bearer token from the next request on (a rotated service-account token); open
        watches end and are re-established by their informers."""
        if token != self._token:
            self._token = token
            await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        # Created lazily: an aiohttp session must be made inside the running event loop.
        if self._session is None or self._session.closed:
            headers = {"Accept": "application/json", "User-Agent": "simnode-kubeclient"}
            if self._token:
                headers["Authorization"] = f"Bearer {self._token}"
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else False)
            self._session = aiohttp.ClientSession(headers=headers, connector=connector)
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: object | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        """One API call; 2xx -> the decoded JSON object, else ApiError (ApiUnavailable without an answer)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": content_type} if data is not None else {}
        try:
            async with self._http().request(
                method,
                self.server + path,
                params=params,
                data=data,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            ) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise _error_from_body(resp.status, text)
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError, OSError) as exc:
            raise ApiUnavailable(f"{method} {self.server}{path}: {exc or type(exc).__name__}") from exc
        if not text:
            return {}
        try:
            decoded = json.loads(text)
        except ValueError as exc:
            raise ApiError(resp.status, "BadResponse", f"{method} {path}: response is not JSON") from exc
        return decoded if isinstance(decoded, dict) else {"items": decoded}

    async def get(self, path: str, *, params: dict[str, str] | None = None) -> dict[str, Any]:
        return await self.request("GET", path, params=params)

    async def list(
        self, path: str, *, label_selector: str | None = None, field_selector: str | None = None
    ) -> dict[str, Any]:
        return await self.request("GET", path, params=_selectors(label_selector, field_selector))

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", path, body=body)

    async def replace(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PUT", path, body=body)

    async def patch(
        self,
        path: str,
        body: dict[str, Any] | JsonPatch,
        *,
        patch_type: str = "merge",
        field_manager: str | None = None,
        force: bool = False,
    ) -> dict[str, Any]:
        if patch_type not in PATCH_CONTENT_TYPES:
            raise ValueError(f"unknown patch_type {patch_type!r} (known: {sorted(PATCH_CONTENT_TYPES)})")
        if patch_type == "apply" and not field_manager:
            raise ValueError("server-side apply needs a field_manager")
        params: dict[str, str] = {}
        if field_manager:
            params["fieldManager"] = field_manager
        if force:
            params["force"] = "true"
        return await self.request(
            "PATCH", path, params=params or None, body=body, content_type=PATCH_CONTENT_TYPES[patch_type]
        )

    async def delete(
        self, path: str, *, grace_period_s: int | None = None, propagation_policy: str | None = None
    ) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if grace_period_s is not None:
            options["gracePeriodSeconds"] = grace_period_s
        if propagation_policy is not None:
            options["propagationPolicy"] = propagation_policy
        body = {"kind": "DeleteOptions", "apiVersion": "v1", **options} if options else None
        return await self.request("DELETE", path, body=body)

    async def watch(
        self,
        path: str,
        *,
        resource_version: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        timeout_s: float | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield watch events `{"type": ADDED|MODIFIED|DELETED|BOOKMARK, "object": {...}}`.

        Ends when the server closes the stream (e.g. after timeout_s). An ERROR event (410 Gone when
        resource_version is too old) raises ApiError, so the caller relists.
        """
        params = _selectors(label_selector, field_selector) or {}
        params["watch"] = "true"
        params["allowWatchBookmarks"] = "true"
        if resource_version:
            params["resourceVersion"] = resource_version
        if timeout_s is not None:
            params["timeoutSeconds"] = str(max(1, int(timeout_s)))
        # No total timeout: a watch is long-lived. The read timeout guards against a silent dead peer.
        read_timeout_s = None if timeout_s is None else timeout_s + self.timeout_s
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s, sock_read=read_timeout_s)
        try:
            async with self._http().get(self.server + path, params=params, timeout=timeout) as resp:
                if resp.status >= 400:
                    raise _error_from_body(resp.status, await resp.text())
                async for line in resp.content:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        raise _status_error(event.get("object") or {}, 500)
                    yield event
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ApiUnavailable(f"watch {self.server}{path}: {exc or type(exc).__name__}") from exc
        except ValueError as exc:
            raise ApiError(0, "BadResponse", f"watch {path}: event is not JSON") from exc

    async def readyz(self) -> bool:
        """True when GET /readyz answers 200; False on any error."""
        try:
            async with self._http().get(
                self.server + "/readyz", timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError, OSError):
            return False

    async def ensure(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create the object in collection `path`, or return the existing one of that name."""
        try:
            return await self.create(path, body)
        except ApiError as exc:
            if exc.status != 409:
                raise
        name = (body.get("metadata") or {}).get("name")
        if not name:
            raise ApiError(409, "AlreadyExists", f"{path}: object exists and body has no metadata.name")
        return await self.get(f"{path.rstrip('/')}/{name}")


def _selectors(label_selector: str | None, field_selector: str | None) -> dict[str, str] | None:
    params: dict[str, str] = {}
    if label_selector:
        params["labelSelector"] = label_selector
    if field_selector:
        params["fieldSelector"] = field_selector
    return params or None
