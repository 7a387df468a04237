"""`ContainerEngine` over the Docker Engine API (aiodocker): inspect, pull with byte progress, copy files out.
Leaves pulled images in the engine; the containers it creates are never started and are removed by the caller
(by id, or by their labels when a crash lost the id).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiodocker
import aiohttp
from aiodocker.exceptions import DockerError
from aiodocker.types import JSONObject

from lifecycle.ports import EngineError, PullProgress

ARCHIVE_CHUNK_BYTES = 64 * 1024
# Pull and archive streams can run for minutes: only the connect is bounded, the step's deadline bounds the rest.
_STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_read=None, connect=30)
# Words the engine and the registry use when an image or tag does not exist.
_NOT_FOUND_WORDS = ("not found", "manifest unknown", "repository does not exist", "no such image")
_DUMMY_CMD = ["/lifecycle-never-started"]  # the container is only a source for the archive endpoint


def split_ref(ref: str) -> tuple[str, str]:
    """`registry:5000/repo/name:tag` -> (`registry:5000/repo/name`, `tag`); a digest ref keeps `@sha256:...`."""
    if "@" in ref:
        repo, digest = ref.split("@", 1)
        return repo, "@" + digest
    name_start = ref.rfind("/") + 1
    colon = ref.rfind(":")
    if colon > name_start:
        return ref[:colon], ref[colon + 1 :]
    return ref, "latest"


def _looks_not_found(message: str) -> bool:
    lowered = message.lower()
    return any(word in lowered for word in _NOT_FOUND_WORDS)


@dataclass
class _LayerSums:
    """Download bytes per layer, summed; "Extracting" lines are not downloads and are ignored."""

    current: dict[str, int] = field(default_factory=dict)
    total: dict[str, int | None] = field(default_factory=dict)

    def update(self, message: dict[str, Any]) -> None:
        layer = message.get("id")
        status = str(message.get("status", ""))
        if not isinstance(layer, str) or status.startswith(("Pulling from", "Digest:", "Status:")):
            return
        detail = message.get("progressDetail") or {}
        self.current.setdefault(layer, 0)
        self.total.setdefault(layer, None)
        if status == "Downloading" and isinstance(detail.get("current"), int):
            self.current[layer] = detail["current"]
            if isinstance(detail.get("total"), int) and detail["total"] > 0:
                self.total[layer] = detail["total"]
        elif status == "Already exists":
            self.current[layer], self.total[layer] = 0, 0
        elif status in ("Download complete", "Pull complete", "Verifying Checksum"):
            known = self.total[layer]
            if known is not None:
                self.current[layer] = known

    def progress(self, image: str, status: str) -> PullProgress:
        totals = list(self.total.values())
        total = sum(t for t in totals if t is not None) if totals and None not in totals else None
        return PullProgress(image=image, current_bytes=sum(self.current.values()), total_bytes=total, status=status)

    def final(self, image: str) -> PullProgress:
        # Layers too small to report "Downloading" have no known size: count what was seen as the whole.
        done = sum(self.current.values())
        return PullProgress(image=image, current_bytes=done, total_bytes=done, status="Pull complete")


class DockerEngine:
    """One aiohttp session to the engine, opened on first use (it needs a running loop) and closed by `close`."""

    def __init__(self, host: str) -> None:
        self._host = host
        self._docker: aiodocker.Docker | None = None

    def _client(self) -> aiodocker.Docker:
        if self._docker is None:
            self._docker = aiodocker.Docker(url=self._host)
        return self._docker

    async def close(self) -> None:
        if self._docker is not None:
            await self._docker.close()
            self._docker = None

    def _error(self, exc: DockerError, doing: str) -> EngineError:
        if exc.status == 900:  # aiodocker's code for "cannot connect"
            return EngineError(f"{doing}: the container engine at {self._host} does not answer ({exc.message})",
                               unreachable=True)
        not_found = exc.status == 404 or _looks_not_found(exc.message)
        return EngineError(f"{doing}: {exc.message}", not_found=not_found)

    def _connection_error(self, exc: aiohttp.ClientError, doing: str) -> EngineError:
        """A connection that failed or broke under way (the engine stopped); other client errors are the engine's."""
        if isinstance(exc, aiohttp.ClientConnectionError):
            return EngineError(f"{doing}: the connection to the container engine at {self._host} failed: {exc}",
                               unreachable=True)
        return EngineError(f"{doing}: {exc}")

    async def _inspect(self, ref: str) -> dict[str, Any] | None:
        try:
            return await self._client().images.inspect(ref)
        except DockerError as exc:
            if exc.status == 404:
                return None
            raise self._error(exc, f"inspecting image {ref}") from exc

    async def image_id(self, ref: str) -> str | None:
        info = await self._inspect(ref)
        return str(info["Id"]) if info else None

    async def repo_digests(self, ref: str) -> list[str]:
        info = await self._inspect(ref)
        return [str(d) for d in (info or {}).get("RepoDigests") or []]

    async def registry_digest(self, ref: str) -> str | None:
        # Any failure (registry down, tag gone, engine too old) means "cannot say": callers then trust the local copy.
        try:
            info = await self._client()._query_json(f"distribution/{quote(ref, safe='/:@')}/json")
        except (DockerError, aiohttp.ClientError, TimeoutError):
            return None
        digest = (info.get("Descriptor") or {}).get("digest") if isinstance(info, dict) else None
        return digest if isinstance(digest, str) and digest.startswith("sha256:") else None

    async def pull(self, ref: str, *, on_progress: Callable[[PullProgress], None]) -> str:
        repo, tag = split_ref(ref)
        params = {"fromImage": repo + tag} if tag.startswith("@") else {"fromImage": repo, "tag": tag}
        sums = _LayerSums()
        try:
            async with self._client()._query(
                "images/create", "POST", params=params, timeout=_STREAM_TIMEOUT
            ) as response:
                try:
                    async for line in response.content:
                        message = _parse_line(line)
                        if message is None:
                            continue
                        _raise_on_stream_error(message, ref)
                        sums.update(message)
                        on_progress(sums.progress(ref, str(message.get("status", ""))))
                finally:
                    response.close()  # aiodocker's _query leaves it open: drop the connection on any exit
        except DockerError as exc:
            raise self._error(exc, f"pulling {ref}") from exc
        except aiohttp.ClientError as exc:
            raise self._connection_error(exc, f"pulling {ref}") from exc
        on_progress(sums.final(ref))
        image = await self.image_id(ref)
        if image is None:
            raise EngineError(f"pulling {ref}: the engine reported success but has no such image")
        return image

    async def create_container(self, image: str, *, labels: Mapping[str, str] | None = None) -> str:
        config: JSONObject = {"Image": image, "Cmd": list(_DUMMY_CMD), "Labels": dict(labels or {})}
        try:
            container = await self._client().containers.create(config)
        except DockerError as exc:
            raise self._error(exc, f"creating a container from {image}") from exc
        return str(container.id)

    async def archive(self, container_id: str, path: str) -> AsyncIterator[bytes]:
        # identity: otherwise dockerd gzips the tar, and the client would inflate it (CPU twice for nothing).
        try:
            async with self._client()._query(
                f"containers/{container_id}/archive",
                params={"path": path},
                headers={"Accept-Encoding": "identity"},
                timeout=_STREAM_TIMEOUT,
            ) as response:
                try:
                    async for chunk in response.content.iter_chunked(ARCHIVE_CHUNK_BYTES):
                        yield chunk
                finally:
                    # aiodocker's _query leaves it open; an open stream keeps dockerd busy with the container,
                    # and removing the container would then wait for it.
                    response.close()
        except DockerError as exc:
            raise self._error(exc, f"reading {path} from container {container_id[:12]}") from exc
        except aiohttp.ClientError as exc:
            raise self._connection_error(exc, f"reading {path} from container {container_id[:12]}") from exc

    async def save(self, image: str) -> AsyncIterator[bytes]:
        try:
            async with self._client()._query(
                f"images/{quote(image, safe='/:@')}/get", timeout=_STREAM_TIMEOUT
            ) as response:
                try:
                    async for chunk in response.content.iter_chunked(ARCHIVE_CHUNK_BYTES):
                        yield chunk
                finally:
                    response.close()  # aiodocker's _query leaves it open: drop the connection on any exit
        except DockerError as exc:
            raise self._error(exc, f"reading the layers of {image}") from exc
        except aiohttp.ClientError as exc:
            raise self._connection_error(exc, f"reading the layers of {image}") from exc

    async def cgroup_driver(self) -> str:
        # Docker Engine picks systemd on a cgroup v2 host run by systemd unless told otherwise (moby
        # daemon/daemon_unix.go UsingSystemd), and cri-dockerd up to v0.3.16 cannot pass that on to the kubelet.
        try:
            info = await self._client().system.info()
        except DockerError as exc:
            raise self._error(exc, "asking the engine for its cgroup driver (docker info)") from exc
        except aiohttp.ClientError as exc:
            raise self._connection_error(exc, "asking the engine for its cgroup driver (docker info)") from exc
        driver = info.get("CgroupDriver")
        if driver not in ("systemd", "cgroupfs"):
            raise EngineError(f"docker info reports cgroup driver {driver!r}; the kubelet needs systemd or cgroupfs")
        return str(driver)

    async def info(self) -> dict[str, Any]:
        try:
            info = dict(await self._client().system.info())
        except DockerError as exc:
            raise self._error(exc, "docker info") from exc
        except aiohttp.ClientError as exc:
            raise self._connection_error(exc, "docker info") from exc
        return info

    async def remove_containers(self, labels: Mapping[str, str]) -> list[str]:
        if not labels:
            raise ValueError("remove_containers needs at least one label: it would remove every container")
        filters = {"label": [f"{key}={value}" for key, value in labels.items()]}
        removed = await self._container_ids({"all": "1", "filters": json.dumps(filters)})
        for container_id in removed:
            await self.remove_container(container_id)
        return removed

    async def stop_containers(self, label_filters: Sequence[str], *, timeout_s: int = 10) -> list[str]:
        if not label_filters:
            raise ValueError("stop_containers needs at least one label filter: it would stop every container")
        filters = {"label": list(label_filters), "status": ["running"]}
        stopped = await self._container_ids({"filters": json.dumps(filters)})
        for container_id in stopped:
            try:
                await self._client()._query_json(f"containers/{container_id}/stop", "POST",
                                                 params={"t": str(timeout_s)}, timeout=timeout_s + 30)
            except DockerError as exc:
                if exc.status not in (304, 404):  # already stopped or gone is what we wanted
                    raise self._error(exc, f"stopping container {container_id[:12]}") from exc
            except aiohttp.ClientError as exc:
                raise self._connection_error(exc, f"stopping container {container_id[:12]}") from exc
        return stopped

    async def _container_ids(self, params: Mapping[str, str]) -> list[str]:
        """The ids `GET /containers/json` lists with `params` (its `all` and `filters`)."""
        try:
            found = await self._client()._query_json("containers/json", params=dict(params))
        except DockerError as exc:
            raise self._error(exc, "listing containers by label") from exc
        except aiohttp.ClientError as exc:
            raise self._connection_error(exc, "listing containers by label") from exc
        return [str(c["Id"]) for c in found if isinstance(c, dict) and "Id" in c]

    async def remove_container(self, container_id: str) -> None:
        try:
            await self._client()._query_json(
                f"containers/{container_id}", "DELETE", params={"force": "1", "v": "1"}
            )
        except DockerError as exc:
            if exc.status != 404:  # already gone is what we wanted
                raise self._error(exc, f"removing container {container_id[:12]}") from exc
        except aiohttp.ClientError as exc:
            raise self._connection_error(exc, f"removing container {container_id[:12]}") from exc


def _parse_line(line: bytes) -> dict[str, Any] | None:
    text = line.strip()
    if not text:
        return None
    try:
        message = json.loads(text)
    except ValueError as exc:
        raise EngineError(f"the engine sent a line that is not JSON: {text[:200]!r}") from exc
    return message if isinstance(message, dict) else None


def _raise_on_stream_error(message: dict[str, Any], ref: str) -> None:
    detail = message.get("errorDetail")
    error = message.get("error") or (detail.get("message") if isinstance(detail, dict) else None)
    if error:
        raise EngineError(f"pulling {ref}: {error}", not_found=_looks_not_found(str(error)))
