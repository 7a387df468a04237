"""serve(): the engine, the MQTT bridge and request handling; on `stop`, a staged shutdown (refuse requests,
cancel the running step cleanly, deliver what is queued, publish `offline`, disconnect). Leaves the saved state
for the next start to resume, and the kubelet running, as a unit of its own would."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from lifecycle.adapters.mqtt import MqttBridge
from lifecycle.bus import Bus, Subscription
from lifecycle.certwatch import CertWatch, Scan
from lifecycle.config import Config
from lifecycle.credentials import kubeconfig_reply
from lifecycle.diagnose import RecentEvents, diagnose_reply
from lifecycle.engine import Accepted, Engine, RenewalDue, RenewRoutine, ResetRoutine, StopRoutine
from lifecycle.errors import RequestError
from lifecycle.exposewatch import ExposureWatch
from lifecycle.logging import RECENT_LOG_LINES, get_logger
from lifecycle.outbox import Outbox
from lifecycle.paths import HostPaths
from lifecycle.pki_bundle_disk import bundle_prepare
from lifecycle.ports import Ports
from lifecycle.protocol import Action, Reply, Request, Topics
from lifecycle.sdnotify import Notifier
from lifecycle.statefile import state_file
from lifecycle.step import Step
from lifecycle.store import Store

if TYPE_CHECKING:
    from lifecycle.adapters.metrics_http import MetricsServer
    from lifecycle.metrics import Metrics

DRAIN_TIMEOUT_S = 5.0


class BridgeFailedError(Exception):
    """The request loop died of a bug: the process must end non-zero (systemd restarts it), never live on deaf."""


async def _until_stop_or_bridge_failure(stop: asyncio.Event, bridge: MqttBridge) -> BaseException | None:
    """Wait for `stop`; return early with the exception that ended the bridge's loop, if one does."""
    stopping = asyncio.create_task(stop.wait(), name="lifecycle-stop-wait")
    watched: set[asyncio.Future[Any]] = {stopping}
    if bridge.task is not None:
        watched.add(bridge.task)
    await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    task = bridge.task
    if task is None or not task.done() or task.cancelled():
        return None
    failure = task.exception() or RuntimeError("the MQTT bridge loop returned")
    while isinstance(failure, BaseExceptionGroup):  # the TaskGroup's wrapping: name the bug itself
        failure = failure.exceptions[0]
    return failure


async def _after_boot_checks(engine: Engine, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """A watch, started once the boot after a restart is past its checks (Engine.past_boot_checks)."""
    await engine.past_boot_checks()
    await run()


async def _ready_once_online(sd: Notifier, bridge: MqttBridge) -> None:
    """READY=1 once the saved state is loaded (the caller has started the engine) and the bridge is connected:
    it sets `connected` only after the broker acknowledged the retained `online`."""
    await bridge.connected.wait()
    sd.notify("READY=1")


class RequestHandler:
    """Turns a parsed request into an engine call and the engine's answer (or refusal) into a reply."""

    def __init__(self, engine: Engine, *, diagnose: Callable[[Request], Awaitable[Reply]] | None = None) -> None:
        self._engine = engine
        self._diagnose = diagnose
        self._log = get_logger("lifecycle.requests")

    async def handle(self, request: Request) -> Reply:
        log = self._log.bind(request_id=request.id, action=request.action.value)
        log.info("request", kubernetes_version=request.kubernetes_version,
                 pki_files=len(request.pki) if request.pki is not None else None)  # names and content stay out
        engine = self._engine
        try:
            accepted: Accepted
            if request.action == Action.STATUS:
                status = engine.status()
                return Reply(id=request.id, ok=True, state=status.state, request_id=status.request_id, status=status)
            if request.action == Action.KUBECONFIG:
                return await kubeconfig_reply(request, status=engine.status(), config=engine.config,
                                              paths=engine.paths)
            if request.action == Action.DIAGNOSE:  # read-only: in any state, beside whatever job runs
                if self._diagnose is not None:
                    return await self._diagnose(request)
                return Reply(id=request.id, ok=False, state=engine.state.value,
                             error=("unsupported", "this service was started without diagnostics"))
            if request.action == Action.INSTALL:
                prepare = None
                if request.pki is not None:  # checked before the engine sees the request
                    prepare = await bundle_prepare(request.pki, config=engine.config, paths=engine.paths, log=log)
                accepted = await engine.install(request_id=request.id, version=request.kubernetes_version,
                                                prepare=prepare)
            elif request.action == Action.RESET:
                accepted = await engine.reset(request_id=request.id)
            elif request.action == Action.RENEW_CERTS:
                accepted = await engine.renew_certs(request_id=request.id)
            elif request.action == Action.STOP:
                accepted = await engine.stop(request_id=request.id)
            elif request.action == Action.START:
                accepted = await engine.start_cluster(request_id=request.id)
            elif request.action == Action.UPGRADE:
                assert request.kubernetes_version is not None  # parse_request requires it for an upgrade
                accepted = await engine.upgrade(request_id=request.id, version=request.kubernetes_version)
            else:
                accepted = await engine.cancel(request_id=request.id)
        except RequestError as exc:
            log.info("request refused", code=exc.code, error=exc.message)
            return Reply(id=request.id, ok=False, state=engine.state.value, error=(exc.code, exc.message))
        except Exception as exc:  # a bug must not kill the request loop; the requester gets told
            log.exception("request failed")
            return Reply(id=request.id, ok=False, state=engine.state.value,
                         error=("internal", f"{type(exc).__name__}: {exc}"))
        return Reply(id=request.id, ok=True, state=engine.state.value, request_id=accepted.request_id,
                     note=accepted.note)


class _Metrics:
    """The metrics and their endpoint (`[metrics]`, docs/metrics.md); prometheus_client and aiohttp's server are
    imported only when configured."""

    def __init__(self, config: Config, bus: Bus) -> None:
        self._config = config
        self._sub = bus.subscribe("metrics")  # before the engine starts: it sees the first status
        self._metrics: Metrics | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._server: MetricsServer | None = None

    async def start(self, *, bridge: MqttBridge, outbox: Subscription, ports: Ports) -> None:
        # prometheus_client and aiohttp's server cost ~80 ms of CPU to import: in a thread, not on the loop (the
        # loop check of the e2e tests caught it here).
        await asyncio.to_thread(importlib.import_module, "lifecycle.adapters.metrics_http")
        await asyncio.to_thread(importlib.import_module, "lifecycle.metrics")
        from lifecycle import metrics as m
        from lifecycle.adapters.metrics_http import MetricsServer

        live = m.LiveSources(mqtt_connected=bridge.connected.is_set, mqtt_connects=lambda: bridge.connects,
                             queued_events=outbox.__len__, kubelet_restarts=lambda: ports.kubelet.restarts)
        self._metrics = m.Metrics(live)
        assert self._config.metrics.listen is not None
        host, port = self._config.metrics.listen
        server = MetricsServer(self._metrics.registry, host=host, port=port)
        await server.start()
        self._server = server
        self._tasks.append(asyncio.create_task(m.run_sink(self._metrics, self._sub), name="lifecycle-metrics-sink"))
        get_logger("lifecycle.metrics").info("metrics endpoint listening", url=f"http://{host}:{port}/metrics")

    def on_reply(self, action: str, reply: Reply) -> None:
        if self._metrics is not None:
            self._metrics.request_answered(action, reply)

    def on_scan(self, scan: Scan) -> None:
        if self._metrics is not None:
            self._metrics.certificates(scan.certs)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.close()


async def serve(
    config: Config, *, plan: Sequence[Step], reset: ResetRoutine, ports: Ports, stop: asyncio.Event,
    drain_timeout_s: float = DRAIN_TIMEOUT_S, renew: RenewRoutine | None = None,
    renewal_due: RenewalDue | None = None, notifier: Notifier | None = None, stop_node: StopRoutine | None = None,
    upgrade_plan: Sequence[Step] = (), store: Store | None = None, kubelet_started_at_boot: bool = False,
) -> None:
    """Run the service until `stop` is set (the caller owns signals; tests set it themselves). With a `notifier`,
    systemd hears READY=1 once the saved state is loaded and `online` is on the broker, STATUS= on each change,
    WATCHDOG=1 from this loop and STOPPING=1 when the shutdown begins. A `store` is the state file already locked
    by the caller (lifecycle.__main__, which reads it before the boot's first step and may start the kubelet then:
`kubelet_started_at_boot`); serve() releases it."""
    sd = notifier or Notifier(address=None, watchdog_usec=None)
    log = get_logger("lifecycle.service", node=config.node_name)
    paths = HostPaths(config.root)
    if store is None:
        store = state_file(paths)
        store.lock()
    durable = Outbox(paths.state_dir)
    stack = contextlib.AsyncExitStack()  # the fsync, systemd and metrics tasks end whichever way serve() ends
    try:
        # The watchdog runs from the first moment: a start that hangs (before READY=1) is caught as well.
        watchdog = asyncio.create_task(sd.watchdog(), name="lifecycle-sd-watchdog")
        stack.callback(watchdog.cancel)
        bus = Bus()
        outbox = bus.subscribe("mqtt")
        recent = RecentEvents(bus.subscribe("diagnostics"))
        recorder = asyncio.create_task(recent.run(), name="lifecycle-recent-events")
        stack.callback(recorder.cancel)
        if sd.enabled:
            reporter = asyncio.create_task(sd.report_status(bus.subscribe("systemd", max_items=100)),
                                           name="lifecycle-sd-status")
            stack.callback(reporter.cancel)
        for event in durable.open():  # state changes a crash kept from the broker go out first, in order
            bus.publish(event)
        engine = Engine(config=config, paths=paths, ports=ports, plan=plan, reset=reset, store=store, bus=bus,
                        renew=renew, renewal_due=renewal_due, outbox=durable, stop_node=stop_node,
                    upgrade_plan=upgrade_plan, kubelet_started_at_boot=kubelet_started_at_boot)
        metrics = _Metrics(config, bus) if config.metrics.listen is not None else None
        certs = CertWatch(pki=config.pki, paths=paths, engine=engine, bus=bus,
                          on_scan=metrics.on_scan if metrics is not None else None)
        exposures = None
        if ports.services is not None:
            exposures = ExposureWatch(engine=engine, bus=bus, services=ports.services, kubeconfig=paths.admin_conf,
                                      host=config.exposures.host)
        topics = Topics(config.mqtt.prefix, config.node_name)

        async def diagnose(request: Request) -> Reply:
            return await diagnose_reply(request, config=engine.config, paths=paths, ports=ports,
                                        status=engine.status(), events=recent.events, log_lines=RECENT_LOG_LINES,
                                        source=topics.source)

        bridge = MqttBridge(
            config=config.mqtt, topics=topics, outbox=outbox,
            status=engine.status, handle=RequestHandler(engine, diagnose=diagnose).handle,
            client_id=config.mqtt.client_id or f"lifecycle-{config.node_name}", durable=durable,
            on_reply=metrics.on_reply if metrics is not None else None,
        )
        if metrics is not None:  # before the bridge: a port in use stops the start, before `online` is said
            await metrics.start(bridge=bridge, outbox=outbox, ports=ports)
            stack.push_async_callback(metrics.close)
        async with bridge:
            log.info("started", root=str(config.root), state=engine.state.value, broker=config.mqtt.broker)
            await engine.start()
            # The Kubernetes client's import (a second of CPU in a thread) now, while nothing is asked of the
            # service: during an install it held the GIL through the kubeadm and kubelet steps, and each system
            # call of the loop then waited for it (events 5-30 ms late, bench_event_latency). Costs its memory
            # from the start (an idle service: 55 MB RSS before, 91 MB after), which one that runs a cluster pays
            # anyway.
            preload = asyncio.create_task(engine.preload_kube_client(), name="lifecycle-preload-kube-client")
            stack.callback(preload.cancel)
            ready = asyncio.create_task(_ready_once_online(sd, bridge), name="lifecycle-sd-ready")
            stack.callback(ready.cancel)
            watches = {asyncio.create_task(_after_boot_checks(engine, certs.run), name="lifecycle-certs-watch")}
            if exposures is not None:
                watches.add(asyncio.create_task(_after_boot_checks(engine, exposures.run),
                                                name="lifecycle-exposures-watch"))
            failure = await _until_stop_or_bridge_failure(stop, bridge)
            sd.notify("STOPPING=1")
            log.info("stopping", state=engine.state.value)
            for watch in watches:
                watch.cancel()
            await asyncio.wait(watches)
            await engine.shutdown()
            await bridge.close(drain_timeout_s=drain_timeout_s)
        if failure is not None:
            log.error("stopped: the MQTT bridge failed, exiting to be restarted", state=engine.state.value)
            raise BridgeFailedError(f"the MQTT bridge failed: {type(failure).__name__}: {failure}") from failure
        log.info("stopped", state=engine.state.value)
    finally:
        await stack.aclose()
        durable.close()
        store.unlock()
