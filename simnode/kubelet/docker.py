"""The container runtime as the kubelet sees it: the Docker Engine API over its unix socket (as
cri-dockerd does): version, image presence and pulls, and (engine.py) the containers of API pods.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from simnode.kubelet.pods import ContainerSim


class RuntimeUnavailable(Exception):
    """The Docker Engine socket does not answer."""


class DockerRuntime:
    def __init__(self, socket_path: Path, *, timeout_s: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(self.socket_path)),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get(self, path: str) -> tuple[int, object]:
        try:
            async with self._http().get(f"http://docker{path}") as resp:
                body = await resp.json(content_type=None) if resp.status == 200 else await resp.text()
                return resp.status, body
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise RuntimeUnavailable(f"container runtime at unix://{self.socket_path}: {exc}") from exc

    async def call(self, method: str, path: str, *, body: Any = None, timeout_s: float | None = None
                   ) -> tuple[int, Any]:
        """One Engine API request; (status, JSON body or text). Raises RuntimeUnavailable."""
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.timeout_s)
        try:
            async with self._http().request(method, f"http://docker{path}", json=body, timeout=timeout) as resp:
                text = await resp.text()
                try:
                    return resp.status, json.loads(text) if text else None
                except ValueError:
                    return resp.status, text
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise RuntimeUnavailable(f"container runtime at unix://{self.socket_path}: {exc}") from exc

    async def pull(self, ref: str, *, timeout_s: float = 120.0) -> str | None:
        """`docker pull ref`: None when it worked, else the engine's error (it streams errors in a 200)."""
        name, tag = split_tag(ref)
        status, body = await self.call("POST", f"/images/create?fromImage={quote(name, safe='')}&tag={quote(tag)}",
                                       timeout_s=timeout_s)
        if status != 200:
            return str(body.get("message") if isinstance(body, dict) else body).strip()
        text = body if isinstance(body, str) else json.dumps(body)
        for line in text.splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict) and item.get("error"):
                return str(item["error"]).strip()
        return None

    async def version(self) -> str:
        """`docker://<engine version>`, the form nodeInfo.containerRuntimeVersion takes."""
        status, body = await self._get("/version")
        if status != 200 or not isinstance(body, dict):
            raise RuntimeUnavailable(f"container runtime at unix://{self.socket_path}: /version answered {status}")
        return f"docker://{body.get('Version', 'unknown')}"

    async def info(self) -> dict[str, object]:
        """`docker info` (GET /info): CgroupDriver is what cri-dockerd's sandboxes are checked against."""
        status, body = await self._get("/info")
        if status != 200 or not isinstance(body, dict):
            raise RuntimeUnavailable(f"container runtime at unix://{self.socket_path}: /info answered {status}")
        return body

    async def image_id(self, ref: str) -> str | None:
        """The image ID (sha256:...) if `ref` is present in the engine, None if it is not."""
        # Slashes and the tag colon stay as they are: that is how the docker CLI sends references.
        status, body = await self._get(f"/images/{quote(ref, safe='/:@')}/json")
        if status == 404:
            return None
        if status != 200 or not isinstance(body, dict):
            raise RuntimeUnavailable(f"image inspect {ref}: engine answered {status}: {body}")
        return str(body.get("Id", ""))


def split_tag(ref: str) -> tuple[str, str]:
    """"host:5000/a/b:tag" -> ("host:5000/a/b", "tag"); no tag means latest (a digest stays in the name)."""
    if "@" in ref:
        return ref, ""
    name, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        return ref, "latest"
    return name, tag


async def refresh_images(runtime: DockerRuntime, containers: list[ContainerSim], now: float, *,
                         pull_policy: bool = False) -> bool:
    """Check the image of every container still waiting for one (respecting its back-off).
    True if some container's image state changed. With `pull_policy` (API pods), each container's
    imagePullPolicy applies as in kubernetes/kubernetes pkg/kubelet/images/image_manager.go EnsureImageExists:
    Never uses only a present image (else ErrImageNeverPull, `Container image "<image>" is not present with pull
    policy of Never`); IfNotPresent pulls only when absent; Always pulls every time a container starts, so an
    image no registry has fails with ErrImagePull (`Failed to pull image "<image>": <engine error>`), then
    ImagePullBackOff (`Back-off pulling image "<image>"`)."""
    changed = False
    for c in containers:
        if c.image_id is not None or now < c.image_next_check:
            continue
        if pull_policy:
            changed |= await _ensure_image(runtime, c, now)
            continue
        try:
            image_id = await runtime.image_id(c.image)
        except RuntimeUnavailable as exc:
            c.image_missing(now, f"failed to pull image {c.image!r}: {exc}")
            changed = True
            continue
        if image_id is None:
            c.image_missing(
                now,
                f'failed to pull and unpack image "{c.image}": {c.image}: not found '
                f"in the container runtime (images are pre-loaded into the Docker Engine)",
            )
        else:
            c.image_id = image_id
        changed = True
    return changed


async def _ensure_image(runtime: DockerRuntime, c: ContainerSim, now: float) -> bool:
    policy = str(c.spec.get("imagePullPolicy") or "IfNotPresent")
    try:
        present = await runtime.image_id(c.image)
        if policy == "Never" and present is None:
            c.image_missing(now, f'Container image "{c.image}" is not present with pull policy of Never',
                            reason="ErrImageNeverPull")
            return True
        if policy == "Always" or present is None:
            error = await runtime.pull(c.image)
            if error is not None:
                c.image_missing(now, f'Failed to pull image "{c.image}": {error}')
                return True
            present = await runtime.image_id(c.image)
    except RuntimeUnavailable as exc:
        c.image_missing(now, f'Failed to pull image "{c.image}": {exc}')
        return True
    if present is None:
        c.image_missing(now, f'Failed to pull image "{c.image}": not present after the pull')
        return True
    c.image_id = present
    c.image_reason = ""
    return True
