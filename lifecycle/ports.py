"""Small protocols for everything outside the service: container engine, commands, kubelet process, Kubernetes API.

Implemented in `lifecycle/adapters/`, built only in `lifecycle/__main__.py`, reached by steps through
`StepContext.ports`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class PullProgress:
    """Byte progress of one image pull, summed over its layers."""

    image: str
    current_bytes: int
    total_bytes: int | None  # None until every layer's size is known
    status: str  # the engine's last status word ("Downloading", "Pull complete", ...)


class EngineError(Exception):
    """The container engine refused a request or could not be reached; the message is the engine's own.

    `not_found`: the image, tag or container does not exist (repeating cannot help until it does).
    `unreachable`: the engine itself did not answer (socket missing, daemon stopped); the message names the socket.
    """

    def __init__(self, message: str, *, not_found: bool = False, unreachable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.not_found = not_found
        self.unreachable = unreachable


class ContainerEngine(Protocol):
    """Raises `EngineError` for everything the engine reports as an error."""

    async def image_id(self, ref: str) -> str | None:
        """The local image id (sha256:...) of `ref`, or None when it is not present."""

    async def repo_digests(self, ref: str) -> list[str]:
        """The local image's RepoDigests (`repo@sha256:...`); empty when it is absent or was never pulled."""

    async def registry_digest(self, ref: str) -> str | None:
        """The registry's current manifest digest for `ref`, asked through the engine; None when it cannot say."""

    async def pull(self, ref: str, *, on_progress: Callable[[PullProgress], None]) -> str:
        """Pull `ref` (raising on any error inside the stream) and return its local image id."""

    async def create_container(self, image: str, *, labels: Mapping[str, str] | None = None) -> str:
        """Create, never start, a container from `image` with `labels`; return its id."""

    async def remove_containers(self, labels: Mapping[str, str]) -> list[str]:
        """Remove every container (any state) carrying all of `labels`; return the ids removed."""

    async def stop_containers(self, label_filters: Sequence[str], *, timeout_s: int = 10) -> list[str]:
        """Stop (`docker stop -t timeout_s`) every running container matching all of `label_filters` (the
        engine's `label` filter: `key` or `key=value`); return the ids stopped. The containers are kept."""

    def archive(self, container_id: str, path: str) -> AsyncIterator[bytes]:
        """Stream the uncompressed tar of `path` inside the container as it arrives."""

    def save(self, image: str) -> AsyncIterator[bytes]:
        """Stream the image as `docker save` writes it (its layers as the registry has them), as it arrives."""

    async def remove_container(self, container_id: str) -> None: ...

    async def cgroup_driver(self) -> str:
        """The engine's cgroup driver (`docker info` CgroupDriver): "systemd" or "cgroupfs"."""

    async def info(self) -> dict[str, Any]:
        """`docker info` as the engine answers it (for `lifecycle diagnose`)."""

    async def close(self) -> None: ...


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    exit_code: int
    output_tail: tuple[str, ...]  # last lines of stdout+stderr, interleaved as printed


class CommandRunner(Protocol):
    async def run(
        self,
        argv: Sequence[str],
        *,
        on_line: Callable[[str], None] | None = None,
        env: Mapping[str, str] | None = None,
        tail_lines: int = 40,
    ) -> CommandResult:
        """Run to completion (cancellation kills it); every output line goes to `on_line` as it comes."""


class KubeletSupervisor(Protocol):
    """Keeps one kubelet process running, restarting it with backoff if it dies, until `stop`.

    The process is started in its own session so it survives a crash of the service (as a kubelet run by
    systemd would); a restarted service adopts it through its pid file instead of starting a second one.
    """

    async def start(self, argv: Sequence[str], *, log_path: Path) -> None: ...

    async def stop(self, *, timeout_s: float = 10.0) -> None: ...

    def is_running(self) -> bool: ...

    def binary_replaced(self) -> bool:
        """True when the running kubelet started before its binary was last put in place: it runs the old code
        (an upgrade or a repair replaced the file under it). `start` then replaces the process."""
        ...

    @property
    def restarts(self) -> int: ...


class KubeApiError(Exception):
    """The Kubernetes API refused a request (`status` = HTTP code) or could not be reached (`status` None).

    The message is the server's own (its Status message) or the connection error.
    """

    def __init__(self, message: str, *, status: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.reason = reason  # the Status reason word: NotFound, Conflict, Invalid, ...


class KubeApi(Protocol):
    """The Kubernetes API as the readiness and addons steps need it (kubernetes_asyncio behind it).

    Objects are plain dicts as the API serialises them (camelCase keys). Every method raises `KubeApiError`.
    """

    async def list_pods(self, namespace: str) -> list[dict[str, Any]]: ...

    async def list_events(self) -> list[dict[str, Any]]:
        """Events of every namespace (what `lifecycle diagnose` reports)."""

    def watch_pods(self, namespace: str, *, timeout_s: float) -> AsyncGenerator[dict[str, Any], None]:
        """Yields watch events ({"type", "object"}) until `timeout_s` passes or the server ends the watch.

        Starts with the current pods as ADDED events. An async generator: close it (`contextlib.aclosing`)
        when leaving early, so the connection is released at once."""

    async def apply(self, manifest: Mapping[str, Any], *, field_manager: str) -> dict[str, Any]:
        """Server-side apply one object (force=True: the service owns what it applies)."""

    async def get(self, api_version: str, kind: str, name: str, namespace: str | None) -> dict[str, Any] | None: ...


class KubeApiFactory(Protocol):
    def connect(self, kubeconfig: Path) -> AbstractAsyncContextManager[KubeApi]: ...

    async def preload(self) -> None:
        """Load the client library now (a boot does it while the kubelet starts), not at the first `connect`."""


class ServicesApi(Protocol):
    """Services in all namespaces as the exposure watch needs them (lifecycle.exposewatch). Objects are plain
    dicts as the API serialises them. Every method raises `KubeApiError`."""

    async def list_services(self) -> tuple[list[dict[str, Any]], str]:
        """Every Service, and the list's resourceVersion (where a watch picks up)."""

    def watch_services(self, *, resource_version: str, timeout_s: float) -> AsyncGenerator[dict[str, Any], None]:
        """Watch events ({"type", "object"}) after `resource_version`, BOOKMARKs included, until `timeout_s`
        passes or the server ends the watch. An ERROR event is raised as `KubeApiError` with its code (410 when
        the version is too old: list again). Close it (`contextlib.aclosing`) when leaving early."""

    async def set_load_balancer_ingress(self, namespace: str, name: str,
                                        ingress: Sequence[Mapping[str, str]]) -> dict[str, Any]:
        """Write status.loadBalancer.ingress through the status subresource; returns the updated Service."""


class ServicesApiFactory(Protocol):
    def connect_services(self, kubeconfig: Path) -> AbstractAsyncContextManager[ServicesApi]: ...


@dataclass(frozen=True)
class Ports:
    docker: ContainerEngine
    commands: CommandRunner
    kubelet: KubeletSupervisor
    kube: KubeApiFactory
    services: ServicesApiFactory | None = None  # None: no exposures (a test's ports, a client-only use)
