"""The container runtime as the kubelet sees it: the Docker Engine API over its unix socket (as
cri-dockerd does). Only read here: version and image presence. Writes nothing.
"""

from __future__ import annotations

from pathlib import Path
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


async def refresh_images(runtime: DockerRuntime, containers: list[ContainerSim], now: float) -> bool:
    """Check the image of every container still waiting for one (respecting its back-off).
    True if some container's image state changed."""
    changed = False
    for c in containers:
        if c.image_id is not None or now < c.image_next_check:
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
