"""What a step is and what it is given: the contract between the engine and the modules in `states/`.

A step never publishes events, never catches `Exception` wholesale and never sleeps without a deadline: it
reports progress through `ctx.progress` and raises `lifecycle.errors` errors; the engine does the rest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, TypeVar, runtime_checkable

from lifecycle.config import Config
from lifecycle.paths import HostPaths
from lifecycle.ports import Ports

T = TypeVar("T")


@dataclass(frozen=True)
class ClusterParams:
    """Fixed for one install and persisted with it, so a resumed install uses the same values.

    Ports configured as 0 are resolved to free ports once, when the install starts; so is the node address when
    `kubernetes.node_ip` is not set (detected from the default route, lifecycle.nodeaddr).
    """

    kubernetes_version: str
    api_port: int
    kubelet_healthz_port: int
    etcd_metrics_port: int = 2381
    node_ip: str = ""  # "": not known (state saved before the key existed, or detection failed: preflight says so)

    def to_json(self) -> dict[str, Any]:
        return {
            "kubernetes_version": self.kubernetes_version,
            "api_port": self.api_port,
            "kubelet_healthz_port": self.kubelet_healthz_port,
            "etcd_metrics_port": self.etcd_metrics_port,
            "node_ip": self.node_ip,
        }


def node_ip_of(config: Config, cluster: ClusterParams) -> str:
    """The node address an install uses: fixed in ClusterParams when it started; the configured one otherwise."""
    return cluster.node_ip or config.kubernetes.node_ip


class ProgressFn(Protocol):
    def __call__(
        self,
        message: str,
        *,
        current: int | float | None = None,
        total: int | float | None = None,
        unit: str | None = None,
    ) -> None: ...


@dataclass(frozen=True)
class StepContext:
    config: Config
    paths: HostPaths
    cluster: ClusterParams
    ports: Ports
    request_id: str | None
    deadline: float  # loop.time() at which the engine cancels the step; waiting steps fail with a precise reason first
    log: Any  # a structlog bound logger, bound to request id and state
    progress: ProgressFn
    # The kind of job the step runs in ("install", "start", "boot", "upgrade", ...): a step whose outcome means
    # less after a stop than at an install says so (states/addons.py on a start).
    job: str = "install"

    @property
    def node_ip(self) -> str:
        return node_ip_of(self.config, self.cluster)


class Step(Protocol):
    name: str  # also the state name and the word on the wire
    timeout_s: float  # default deadline covering all attempts (config `steps.<name>` overrides)
    retries: int  # default number of retries after a retryable error

    async def is_done(self, ctx: StepContext) -> bool:
        """True when the step's outcome already holds (checked, not remembered): the engine then skips run."""

    async def run(self, ctx: StepContext) -> None: ...

    async def before_retry(self, ctx: StepContext) -> None:
        """Undo a failed attempt's partial work so that `run` may start over (most steps: nothing)."""


class BootCheck(StrEnum):
    """What a step's local evidence says at boot (docs/architecture.md "Boot")."""

    HOLDS = "holds"  # the evidence is the whole check: nothing left to verify
    VERIFY_LATER = "verify_later"  # cheap evidence holds; the full `is_done` runs in the background meanwhile
    UNKNOWN = "unknown"  # no usable evidence (none recorded, or it no longer matches): the full `is_done` now


@runtime_checkable
class BootEvidence(Protocol):
    """Optional for a step whose `is_done` is costly (a registry round trip, hashing hundreds of MB). After a
    reboot the engine asks `boot_check` instead, so the kubelet starts without waiting for either; the evidence is
    recorded by `record_boot_evidence`, which the engine calls each time the full `is_done` holds. Both only read
    local files and ask the container engine about local images: never the network."""

    async def boot_check(self, ctx: StepContext) -> BootCheck: ...

    async def record_boot_evidence(self, ctx: StepContext) -> None: ...


StepFactory = Callable[[], list[Step]]


def fail_at(ctx: StepContext) -> float:
    """Loop time at which a waiting step gives up: a little before the engine's deadline, so the step can say
    what it was waiting for instead of being cancelled without a reason."""
    left_s = ctx.deadline - asyncio.get_running_loop().time()
    return ctx.deadline - min(2.0, max(0.1, left_s * 0.1))


async def finish_in_thread(fn: Callable[..., T], /, *args: Any) -> T:
    """`fn(*args)` in a thread, awaited to its end even when the awaiting step is cancelled: a thread cannot be
    stopped, and one that goes on writing files after its step was cancelled races whoever cancelled it (a reset
    removing the pki directory met a temp file the certs step's thread renamed away meanwhile). The cancellation
    still propagates, once the thread is done."""
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.gather(work, return_exceptions=True)
        raise
