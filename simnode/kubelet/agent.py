"""The running kubelet: static pods, /healthz and the API side until SIGTERM/SIGINT (exit 0, pod
processes keep running) or the kubelet_exit_after_s fault (exit 1). State lives in static.py/apisync.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from pathlib import Path

from aiohttp import web

from simnode.faults import Faults, FaultsFileError, load_faults
from simnode.kubeclient import ApiError, KubeClient, KubeconfigError
from simnode.kubelet.apisync import PodSync
from simnode.kubelet.certstore import ClientCertManager
from simnode.kubelet.cni import SYNC_PERIOD_S as CNI_SYNC_PERIOD_S
from simnode.kubelet.cni import CniPlugin
from simnode.kubelet.config import Settings
from simnode.kubelet.docker import DockerRuntime, RuntimeUnavailable
from simnode.kubelet.node import NodeAgent, default_node_ip, node_name_from_cert
from simnode.kubelet.proxy import KubeProxy
from simnode.kubelet.static import StaticPods
from simnode.launch import build_version

log = logging.getLogger("kubelet")

STATIC_PERIOD_S = 0.3  # manifest poll and pod state step
SYNC_PERIOD_S = 0.3
HEARTBEAT_S = 10.0
CONNECT_RETRY_S = 0.5
HEALTHZ_RETRY_S = 5.0


class Reconnect(Exception):
    """Better credentials appeared (kubelet.conf after bootstrap): start a new API session."""


class Kubelet:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.root = s.root
        self.faults = Faults()
        self._faults_error: str | None = None
        self.docker = DockerRuntime(s.runtime_socket)
        self.static = StaticPods(s.root, s.manifest_dir, self.docker)
        self.node_ip = s.node_ip or default_node_ip()
        self.static.host_ip = self.node_ip
        self.static.sandbox.kubelet_cgroup_driver = s.cgroup_driver
        self.stop = asyncio.Event()
        self.exit_code = 0
        self.runtime_version = ""
        # cmd/kubelet/app/server.go buildKubeletClientConfig: with rotateCertificates the client certificate comes
        # from the store in --cert-dir (bootstrapped from kubelet.conf's embedded pair), and is rotated.
        self.certs = ClientCertManager(s.root, s.cert_dir, s.kubeconfig) if s.config.rotate_certificates else None
        # cri-dockerd's CNI network plugin, hosted here: the simulated node has no separate cri-dockerd process,
        # so a kubelet restart stands for a cri-dockerd restart as far as the loaded network goes.
        self.cni = CniPlugin(s.root)
        self.network_changed = asyncio.Event()

    def reload_faults(self) -> Faults:
        try:
            self.faults = load_faults(self.root.faults_file)
            self._faults_error = None
        except FaultsFileError as exc:
            if str(exc) != self._faults_error:  # report each distinct problem once, keep the last good knobs
                log.error("faults file: %s (keeping the previous settings)", exc)  # noqa: TRY400 (expected condition, no traceback)
                self._faults_error = str(exc)
        return self.faults

    def finish(self, code: int) -> None:
        self.exit_code = code
        self.stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.finish, 0)
        try:
            self.runtime_version = await self.docker.version()
        except RuntimeUnavailable as exc:
            log.error("failed to run kubelet: validate service connection: %s", exc)  # noqa: TRY400 (expected condition, no traceback)
            await self.docker.close()
            return 1
        log.info("kubelet %s starting: root %s, manifests %s, runtime %s (%s)", build_version(), self.root.root,
                 self.s.manifest_dir, self.s.runtime_endpoint, self.runtime_version)
        if self.certs is not None:
            self.certs.bootstrap()
        await self.cni.sync()
        if self.cni.error():
            log.error("%s", self.cni.error())
        tasks = [
            asyncio.create_task(self.cni_loop(), name="kubelet cni sync"),
            asyncio.create_task(self.serve_healthz(), name="kubelet healthz"),
            asyncio.create_task(self.static_loop(), name="kubelet static pods"),
            asyncio.create_task(self.api_loop(), name="kubelet api"),
        ]
        if self.certs is not None:
            tasks.append(asyncio.create_task(self.certs.run(self.reload_faults), name="kubelet client certificate"))
        stop_wait = asyncio.create_task(self.stop.wait(), name="kubelet stop")
        pending: set[asyncio.Task[None] | asyncio.Task[bool]] = {stop_wait, *tasks}
        while not self.stop.is_set():
            # A task that returns (healthz disabled) is fine; one that raises ends the kubelet.
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stop_wait and not task.cancelled() and task.exception() is not None:
                    log.error("%s failed", task.get_name(), exc_info=task.exception())
                    self.finish(1)
        for task in tasks:
            task.cancel()
        stop_wait.cancel()
        await asyncio.gather(*tasks, stop_wait, return_exceptions=True)
        await self.static.close()
        await self.docker.close()
        log.info("kubelet exiting with %d; pod processes keep running", self.exit_code)
        return self.exit_code

    async def serve_healthz(self) -> None:
        await asyncio.sleep(self.reload_faults().delay_s("kubelet_start"))
        port, address = self.s.config.healthz_port, self.s.config.healthz_bind_address
        if port == 0:
            return  # healthzPort 0 disables the endpoint, as in the real kubelet
        app = web.Application()
        app.router.add_get("/healthz", lambda _req: _ok())
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        while True:
            # Like the real kubelet: a busy port is logged and retried, it does not stop the node.
            error: OSError | None = None
            try:
                await web.TCPSite(runner, address, port).start()
            except OSError as exc:
                error = exc
            if error is None:
                break
            log.error("failed to serve /healthz on %s:%d: %s; retrying in %.0fs", address, port, error.strerror,
                      HEALTHZ_RETRY_S)
            await asyncio.sleep(HEALTHZ_RETRY_S)
        log.info("serving /healthz on http://%s:%d", address, port)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    async def static_loop(self) -> None:
        started = time.monotonic()
        while True:
            faults = self.reload_faults()
            if faults.kubelet_exit_after_s is not None and time.monotonic() - started >= faults.kubelet_exit_after_s:
                log.error("fault kubelet_exit_after_s=%s: exiting with status 1", faults.kubelet_exit_after_s)
                self.finish(1)
                return
            try:
                await self.static.tick(faults)
            except Exception:  # one bad pass (e.g. a full disk) must not take the node down
                log.exception("static pod sync failed")
            await asyncio.sleep(STATIC_PERIOD_S)

    async def cni_loop(self) -> None:
        """cri-dockerd's periodic syncNetworkConfig; a change of NetworkReady posts the node status at once."""
        before = self.cni.error()
        while True:
            await asyncio.sleep(CNI_SYNC_PERIOD_S)
            await self.cni.sync()
            now = self.cni.error()
            if now != before:
                log.info("runtime network %s", f"not ready: {now}" if now else "ready")
                before = now
                self.network_changed.set()

    def credentials(self) -> tuple[Path, bool] | None:
        """(kubeconfig, is_bootstrap): --kubeconfig if it exists, else --bootstrap-kubeconfig."""
        if self.s.kubeconfig is not None and self.s.kubeconfig.exists():
            return self.s.kubeconfig, False
        if self.s.bootstrap_kubeconfig is not None and self.s.bootstrap_kubeconfig.exists():
            return self.s.bootstrap_kubeconfig, True
        return None

    def node_name(self, client: KubeClient) -> str:
        return (
            self.s.hostname_override
            or node_name_from_cert(client.client_cert_pem)
            or socket.gethostname().lower()
        )

    async def api_loop(self) -> None:
        waiting_logged = False
        while True:
            creds = self.credentials()
            if creds is None:
                if not waiting_logged:
                    log.info("no kubeconfig yet (%s); running static pods only", self.s.kubeconfig)
                    waiting_logged = True
                await asyncio.sleep(CONNECT_RETRY_S)
                continue
            try:
                client = KubeClient.from_kubeconfig(creds[0], root=self.root)
            except KubeconfigError as exc:
                log.error("%s", exc)  # noqa: TRY400 (expected condition, no traceback)
                await asyncio.sleep(CONNECT_RETRY_S * 5)
                continue
            try:
                await self.api_session(client, creds[0], bootstrap=creds[1])
            except Exception as exc:  # the session restarts on anything; only surprises get a traceback
                expected = (ApiError, Reconnect)
                if isinstance(exc, expected) or (isinstance(exc, ExceptionGroup) and exc.split(expected)[1] is None):
                    log.info("API session ended (%s); reconnecting", _describe(exc))
                else:
                    log.exception("API session failed; reconnecting")
            finally:
                await client.close()
            await asyncio.sleep(CONNECT_RETRY_S)

    async def api_session(self, client: KubeClient, source: Path, *, bootstrap: bool) -> None:
        agent = NodeAgent(client, self.node_name(client), self.node_ip, self.runtime_version,
                          network_error=self.cni.error)
        logged = False
        while True:
            try:
                await agent.register()
                break
            except ApiError as exc:
                if not logged:
                    log.info("waiting for the API server at %s to register node %s: %s", client.server,
                             agent.name, exc)
                    logged = True
            if bootstrap and self.credentials() != (self.s.bootstrap_kubeconfig, True):
                raise Reconnect("kubeconfig appeared")
            await asyncio.sleep(CONNECT_RETRY_S)
        log.info("node %s registered at %s using %s", agent.name, client.server, self.root.real(source))
        sync = PodSync(self.root, client, agent, self.static, self.docker, config_pod_cidr=self.s.config.pod_cidr,
                       sandbox_error=self.cni.sandbox_error, kubeconfig=source)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(sync.pods.run(), name="kubelet pod informer")
                group.create_task(self.heartbeat_loop(agent), name="kubelet heartbeat")
                group.create_task(self.sync_loop(sync, bootstrap), name="kubelet pod sync")
                proxy = KubeProxy(client, lambda: agent.node_ip, sync.engine.pid_of)
                group.create_task(proxy.run(), name="kube-proxy")
        finally:
            await sync.runner.close()
            await sync.engine.close()

    async def heartbeat_loop(self, agent: NodeAgent) -> None:
        while True:
            try:
                await agent.renew_lease()
            except ApiError as exc:
                log.warning("lease renewal for node %s failed: %s", agent.name, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.network_changed.wait(), HEARTBEAT_S)
            self.network_changed.clear()
            try:
                await agent.heartbeat()
            except ApiError as exc:
                log.warning("node status update for %s failed: %s", agent.name, exc)

    async def sync_loop(self, sync: PodSync, bootstrap: bool) -> None:
        while True:
            if bootstrap and self.credentials() != (self.s.bootstrap_kubeconfig, True):
                raise Reconnect(f"{self.s.kubeconfig} appeared")
            if self.certs is not None and self.certs.rotated.is_set():
                self.certs.rotated.clear()  # pkg/kubelet/certificate/transport.go: connections closed on rotation
                raise Reconnect("client certificate rotated")
            await sync.sync(self.faults)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sync.pods.changed.wait(), SYNC_PERIOD_S)
            sync.pods.changed.clear()


async def _ok() -> web.Response:
    return web.Response(text="ok")


def _describe(exc: BaseException) -> str:
    """The messages of an exception or of every exception inside a group."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return str(exc) or type(exc).__name__
