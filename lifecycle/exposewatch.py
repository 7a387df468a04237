"""Follows the Services of type LoadBalancer while the cluster runs: lists them, watches from the list's
resourceVersion (listing again after a 410 Gone, a lost watch or a restart), writes each one's
status.loadBalancer.ingress and hands the ports to the engine, which publishes the retained exposures message
and the events. Stops when the cluster leaves `running`; on a reset the engine clears the message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lifecycle.bus import Bus
from lifecycle.engine import Engine
from lifecycle.exposurestate import SkippedPort, exposures_from_services, is_load_balancer, skipped_ports
from lifecycle.logging import get_logger
from lifecycle.machine import State
from lifecycle.ports import KubeApiError, ServicesApi, ServicesApiFactory

WATCH_S = 300.0  # one watch request; the server may end it sooner, then the next starts at its last version
RETRY_MIN_S, RETRY_MAX_S = 0.5, 10.0  # after an error: list again, backing off while it keeps failing
_CLEAR_STATES = (State.RESETTING, State.IDLE)  # nothing runs: nothing is exposed

ServiceKey = tuple[str, str]  # (namespace, name)


def _key(svc: Mapping[str, Any]) -> ServiceKey:
    meta = svc.get("metadata") or {}
    return (str(meta.get("namespace", "")), str(meta.get("name", "")))


class ExposureWatch:
    """The supervisor task `serve` owns: one follower task while the state is `running`, none otherwise."""

    def __init__(self, *, engine: Engine, bus: Bus, services: ServicesApiFactory, kubeconfig: Path,
                 host: str) -> None:
        self._engine = engine
        self._services = services
        self._kubeconfig = kubeconfig
        self._host = host
        self._changes = bus.subscribe("exposure-watch", max_items=1000)
        self._log = get_logger("lifecycle.exposewatch")
        self._listed = False  # the current connection listed once (then a failure retries at once)
        self._skipped: frozenset[SkippedPort] = frozenset()  # reported by this process: each is told once

    async def run(self) -> None:
        follower: asyncio.Task[None] | None = None
        try:
            while True:
                state = self._engine.state
                if state == State.RUNNING and follower is None:
                    follower = asyncio.create_task(self._follow(), name="lifecycle-exposures-follow")
                elif state != State.RUNNING and follower is not None:
                    await _stopped(follower)
                    follower = None
                if state in _CLEAR_STATES:
                    self._engine.clear_exposures()
                await self._changes.state_changed()
        finally:
            if follower is not None:
                await _stopped(follower)

    async def _follow(self) -> None:
        delay_s = RETRY_MIN_S
        while True:
            self._listed = False
            try:
                async with self._services.connect_services(self._kubeconfig) as api:
                    await self._list_and_watch(api)
            except Exception as exc:
                if self._listed:  # it worked for a while: come back fast, then back off
                    delay_s = RETRY_MIN_S
                if isinstance(exc, KubeApiError):
                    self._log.warning("services watch failed; listing again", error=exc.message, retry_in_s=delay_s)
                else:  # a bug must not end the exposures for the life of the service
                    self._log.exception("services watch failed; listing again", retry_in_s=delay_s)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, RETRY_MAX_S)

    async def _list_and_watch(self, api: ServicesApi) -> None:
        """Returns only by raising: a 410 Gone lists again at once; other errors go to `_follow`'s backoff."""
        while True:
            items, version = await api.list_services()
            services = {_key(svc): svc for svc in items}
            await self._sync(api, services)
            self._listed = True
            try:
                while True:  # a watch the server ended in time continues from the last version seen
                    started_s = asyncio.get_running_loop().time()
                    version = await self._watch(api, services, version)
                    if asyncio.get_running_loop().time() - started_s < RETRY_MIN_S:
                        await asyncio.sleep(RETRY_MIN_S)  # a server ending watches at once is not polled flat out
            except KubeApiError as exc:
                if exc.status != 410:
                    raise
                self._log.info("services watch expired; listing again", error=exc.message)

    async def _watch(self, api: ServicesApi, services: dict[ServiceKey, dict[str, Any]], version: str) -> str:
        async with contextlib.aclosing(api.watch_services(resource_version=version, timeout_s=WATCH_S)) as events:
            async for event in events:
                kind, obj = event.get("type"), event["object"]
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if kind == "BOOKMARK":
                    continue
                if kind == "DELETED":
                    services.pop(_key(obj), None)
                else:
                    services[_key(obj)] = obj
                await self._sync(api, services)
        return version

    async def _sync(self, api: ServicesApi, services: dict[ServiceKey, dict[str, Any]]) -> None:
        node_ip = self._engine.node_ip
        if not node_ip:
            self._log.error("the node address is not known: no exposures can be published")
            return
        exposures = exposures_from_services(services.values(), node_ip=node_ip)
        self._engine.report_exposures(exposures)
        skipped = skipped_ports(services.values())
        self._engine.report_skipped_ports([s for s in skipped if s not in self._skipped])
        self._skipped = frozenset(skipped)
        # EXTERNAL-IP: the host name for a Service the host forwards at least one port of; none (kubectl shows
        # <pending>) for one whose every port is in conflict, since the host forwards none of them.
        forwarded = {(e.namespace, e.service) for e in exposures if e.conflict is None}
        ours = [{"hostname": self._host}]
        for key, svc in list(services.items()):
            current = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
            if is_load_balancer(svc):
                wanted = ours if key in forwarded else []
            elif current == ours:
                # No longer a LoadBalancer: its ingress is taken back, as a service controller does when a Service
                # stops wanting a load balancer (k8s.io/cloud-provider controllers/service/controller.go,
                # syncLoadBalancerIfNeeded: deleteLoadBalancer, then an empty LoadBalancerStatus).
                wanted = []
            else:
                continue
            if current == wanted:
                continue
            try:
                services[key] = await api.set_load_balancer_ingress(key[0], key[1], wanted)
            except KubeApiError as exc:
                if exc.status != 404:  # 404: deleted meanwhile; its DELETED event follows
                    raise
            else:
                self._log.info("load balancer ingress set", service=f"{key[0]}/{key[1]}",
                               ingress=self._host if wanted else None)


async def _stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
