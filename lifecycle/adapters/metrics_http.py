"""The metrics endpoint: an aiohttp server on the service's own event loop, answering `GET /metrics` with
`generate_latest` of the service's registry.

Not prometheus_client's `start_http_server`: that runs a thread which reads the registry while the loop
changes it, keeps serving when the loop is stalled (a scrape would then hide the stall: here a stalled loop
shows as a failed scrape, which is what an operator wants to see), and cannot be stopped cleanly from
`serve()`'s staged shutdown. aiohttp is already a dependency (aiodocker's HTTP client); rendering a few dozen
series takes well under a millisecond on the loop.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from lifecycle.errors import MetricsListenError


class MetricsServer:
    """`await start()`, then `await close()`; `port` is the bound port."""

    def __init__(self, registry: CollectorRegistry, *, host: str, port: int) -> None:
        self._registry = registry
        self._host = host
        self._port = port
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)  # a scrape every 15 s must not fill the log

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(self._registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST  # carries the format version: set as is
        return response

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise MetricsListenError(f"metrics.listen: cannot listen on {self._host}:{self._port}: "
                                     f"{exc.strerror or exc}") from exc

    async def close(self) -> None:
        await self._runner.cleanup()
