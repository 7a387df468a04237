"""`local-path-provisioner [--debug] start --config /etc/config/config.json` inside the simulated kubelet's pod:
in-cluster credentials (the pod's service-account token), the config file and the ConfigMap's helper pod
template, the health server (/health, and /ready listing what the provisioner needs: main.go checkReadiness),
then the provisioning loop until SIGTERM (exit 0). Exits 1 with the reason when it cannot start, as upstream's
`start` does (the kubelet then restarts it with back-off).

Container paths (/etc/config, /var/run/secrets/...) are looked up in the mounts the kubelet passes in
$SIMNODE_MOUNTS; the health port is the host port the kubelet gave the containerPort ($SIMNODE_PORTS).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import yaml
from aiohttp import web

from simnode.kubeclient import ApiError, KubeClient
from simnode.kubelet.workloads import MOUNTS_ENV, PORTS_ENV, SA_MOUNT
from simnode.localpath.config import Config, Flags, UsageError, load_config, parse_flags
from simnode.localpath.controller import Provisioner
from simnode.localpath.helperpod import HelperError, HelperPods
from simnode.paths import NodeRoot, NodeRootError, resolve_root

log = logging.getLogger("local-path-provisioner")
TOKEN_REREAD_S = 60.0


class LogrusFormatter(logging.Formatter):
    """`time="2026-12-03T11:00:00Z" level=info msg="..."`, logrus's text format."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        level = {"WARNING": "warning", "CRITICAL": "fatal"}.get(record.levelname, record.levelname.lower())
        return f'time="{ts}" level={level} msg={json.dumps(record.getMessage())}'


def container_path(path: str, mounts: dict[str, str]) -> Path | None:
    """Where a path inside the container lives on the node: the longest mountPath that contains it."""
    best = ""
    for mount in mounts:
        m = mount.rstrip("/") or "/"
        if (path == m or path.startswith(m.rstrip("/") + "/")) and len(m) > len(best):
            best = m
    if not best:
        return None
    mount_key = next(k for k in mounts if (k.rstrip("/") or "/") == best)
    return Path(mounts[mount_key]) / path[len(best):].lstrip("/")


class Startup:
    def __init__(self, flags: Flags, root: NodeRoot, env: dict[str, str]) -> None:
        self.flags = flags
        self.root = root
        self.mounts: dict[str, str] = json.loads(env.get(MOUNTS_ENV) or "{}")
        self.ports: dict[str, int] = json.loads(env.get(PORTS_ENV) or "{}")
        self.env = env

    def client(self) -> KubeClient:
        """rest.InClusterConfig: the service host/port env and the mounted token and CA."""
        host, port = self.env.get("KUBERNETES_SERVICE_HOST"), self.env.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise UsageError("unable to get client config: unable to load in-cluster configuration, "
                             "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be defined")
        token_path = container_path(f"{SA_MOUNT}/token", self.mounts)
        ca_path = container_path(f"{SA_MOUNT}/ca.crt", self.mounts)
        try:
            token = token_path.read_text().strip() if token_path else ""
            ca = ca_path.read_bytes() if ca_path else b""
        except OSError as exc:
            raise UsageError(f"unable to get client config: open {SA_MOUNT}/token: {exc.strerror}") from exc
        if not token:
            raise UsageError(f"unable to get client config: open {SA_MOUNT}/token: no such file or directory")
        server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        return KubeClient.from_parts(server, ca or None, None, None, token=token)

    def config(self) -> Config:
        file = container_path(self.flags.config_file, self.mounts) if self.flags.config_file else None
        if file is None:
            raise UsageError(f"fail to load config file {self.flags.config_file}: no such file or directory")
        return load_config(file, self.flags.config_file)

    def health_port(self) -> int:
        return int(self.ports.get(str(self.flags.health_port), self.flags.health_port))


async def _ready(client: KubeClient, namespace: str) -> str | None:
    """main.go checkReadiness: the lists the provisioner depends on; the first failure, or None."""
    checks = (("configmaps", f"/api/v1/namespaces/{namespace}/configmaps"),
              ("pods", f"/api/v1/namespaces/{namespace}/pods"),
              ("persistentvolumeclaims", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims"),
              ("persistentvolumes", "/api/v1/persistentvolumes"),
              ("storageclasses", "/apis/storage.k8s.io/v1/storageclasses"))
    for name, path in checks:
        try:
            await client.get(path, params={"limit": "1"})
        except ApiError as exc:
            return f"readiness check {name} failed: {exc.message}"
    return None


async def _serve_health(client: KubeClient, namespace: str, port: int) -> web.AppRunner:
    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def ready(_request: web.Request) -> web.Response:
        problem = await _ready(client, namespace)
        if problem is not None:
            log.warning("Readiness check failed: %s", problem)
            return web.Response(status=503, text=problem + "\n")
        return web.Response(text="OK")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    log.info("Health server started on :%d", port)
    return runner


async def _follow_token(client: KubeClient, start: Startup) -> None:
    """client-go re-reads the projected token file (cached for a minute): the kubelet rotates it."""
    path = container_path(f"{SA_MOUNT}/token", start.mounts)
    while path is not None:
        await asyncio.sleep(TOKEN_REREAD_S)
        try:
            token = path.read_text().strip()
        except OSError as exc:
            log.warning("cannot re-read the service-account token: %s", exc)
            continue
        if token:
            await client.set_token(token)


async def run(start: Startup) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    client = start.client()
    async with client:
        health = await _serve_health(client, start.flags.namespace, start.health_port())
        try:
            config = start.config()
            path = f"/api/v1/namespaces/{start.flags.namespace}/configmaps/{start.flags.configmap_name}"
            try:
                cm = await client.get(path)
            except ApiError as exc:
                raise UsageError(f"invalid empty flag helper-pod-file and it also does not exist at ConfigMap "
                                 f"{start.flags.namespace}/{start.flags.configmap_name} with err: "
                                 f"{exc.message}") from exc
            data = cm.get("data") or {}
            if "helperPod.yaml" not in data:
                raise UsageError(f"invalid empty flag helper-pod-file and it also does not exist at ConfigMap "
                                 f"{start.flags.namespace}/{start.flags.configmap_name} with err: "
                                 "helperPod.yaml is not found")
            identity = f"{start.flags.provisioner_name}_{socket.gethostname()}_{uuid.uuid4()}"
            try:
                helper = HelperPods(client, namespace=start.flags.namespace,
                                    service_account=start.flags.service_account_name,
                                    config_map=start.flags.configmap_name, template_yaml=str(data["helperPod.yaml"]))
            except (HelperError, yaml.YAMLError) as exc:
                raise UsageError(f"invalid helper pod template: {exc}") from exc
            provisioner = Provisioner(client, name=start.flags.provisioner_name, config=config, helper=helper,
                                      identity=identity)
            log.debug("Provisioner started")
            task = asyncio.create_task(provisioner.run(), name="provisioner")
            stopping = asyncio.create_task(stop.wait(), name="stop signal")
            rotation = asyncio.create_task(_follow_token(client, start), name="token rotation")
            done, _ = await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
            for t in (task, stopping, rotation):
                t.cancel()
            if task in done and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
            log.debug("Provisioner stopped")
        finally:
            await health.cleanup()
    return 0


def main(argv: list[str]) -> int:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogrusFormatter())
    logging.getLogger().handlers[:] = [handler]
    try:
        flags = parse_flags(argv)
        logging.getLogger().setLevel(logging.DEBUG if flags.debug else logging.INFO)
        logging.getLogger("aiohttp").setLevel(logging.WARNING)
        root = resolve_root()
        return asyncio.run(run(Startup(flags, root, dict(os.environ))))
    except (UsageError, NodeRootError) as exc:
        log.critical("Error starting daemon: %s", exc)
        return 1
