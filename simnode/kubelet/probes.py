"""HTTP readiness probes of the containers that run as processes, for static pods (static.py) and API pods
(workloads.py) alike: each due probe is one GET in a task of its own, and its answer sets the container's
`probe_ok`. Writes nothing.

Follows kubernetes/kubernetes pkg/kubelet/prober/prober.go (runProbe: httpGet's scheme, host, port by number or
by the container port's name, path) and pkg/probe/http/http.go (DoHTTPProbe: ready on 200 <= status < 400; the
serving certificate is not verified).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp

from simnode.kubelet.pods import ContainerSim, PodSim, readiness_probe

PROBE_PERIOD_MAX_S = 2.0  # probes run at most this far apart (real default 10 s) to keep tests quick

# (pod, container, the probe's httpGet) -> the URL to ask, or None when the probe cannot reach anything.
UrlOf = Callable[[PodSim, ContainerSim, dict[str, Any]], str | None]


def container_port(c: ContainerSim, port: object) -> object:
    """An httpGet port as a number: a name is looked up among the container's ports (None when unknown)."""
    if isinstance(port, str) and not port.isdigit():
        named = [p.get("containerPort") for p in c.spec.get("ports") or [] if p.get("name") == port]
        return named[0] if named else None
    return port


class HttpProber:
    """Starts the probes that are due; `close` cancels those in flight and closes the HTTP session."""

    def __init__(self, url_of: UrlOf) -> None:
        self._url_of = url_of
        self._probing: set[tuple[str, str]] = set()  # (pod key, container): one probe at a time each
        self._tasks: set[asyncio.Task[None]] = set()
        self._http: aiohttp.ClientSession | None = None

    def start_due(self, sim: PodSim, now: float, *, key: str) -> None:
        """Start a probe for each container of `sim` (known as `key`) whose period has passed."""
        for c in sim.containers:
            probe = readiness_probe(c)
            if probe is None or c.pid is None or now < c.probe_next or (key, c.name) in self._probing:
                continue
            c.probe_next = now + min(float(probe.get("periodSeconds") or 10), PROBE_PERIOD_MAX_S)
            self._probing.add((key, c.name))
            task = asyncio.create_task(self._run(sim, c, probe, key=key), name=f"probe {sim.key}/{c.name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, sim: PodSim, c: ContainerSim, probe: dict[str, Any], *, key: str) -> None:
        try:
            c.probe_ok = await self._get_ok(self._url_of(sim, c, probe["httpGet"]), probe)
        finally:
            self._probing.discard((key, c.name))

    async def _get_ok(self, url: str | None, probe: dict[str, Any]) -> bool:
        if url is None:
            return False
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False))
        timeout_s = min(float(probe.get("timeoutSeconds") or 1), PROBE_PERIOD_MAX_S)
        try:
            async with self._http.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                await resp.read()
                return 200 <= resp.status < 400
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._http is not None:
            await self._http.close()
