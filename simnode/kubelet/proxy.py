"""The kube-proxy stand-in, hosted in the kubelet process: for each Service port with a `nodePort` (TCP), a
listener on `0.0.0.0:<nodePort>` of the node that forwards every connection to one of the Service's ready
endpoints, round-robin, as kube-proxy's NodePort rules do (kubernetes/kubernetes pkg/proxy/iptables/proxier.go:
KUBE-NODEPORTS -> KUBE-SVC-* with one KUBE-SEP-* per ready endpoint; the userspace proxier of old releases
forwarded round-robin in-process, pkg/proxy/userspace/roundrobin.go, which is what this does).

Endpoints come from the `Endpoints` objects that the simulated kube-controller-manager maintains (it keeps no
EndpointSlices): the subset ports whose name is the Service port's name, `addresses` only (not
`notReadyAddresses`). An endpoint of a pod whose containers the kubelet runs in the engine in a network
namespace of its own is reached inside that namespace (engine.py), one on the node's IP (host network) at
127.0.0.1, any other address as it is. UDP is not forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import socket
from collections.abc import Awaitable, Callable

from simnode.controllers.informer import Informer
from simnode.kubeclient import KubeClient

log = logging.getLogger("kubelet.proxy")

CLONE_NEWNET = 0x40000000
CONNECT_TIMEOUT_S = 5.0
RETRY_LISTEN_S = 5.0


def connect_in_netns(pid: int, port: int) -> socket.socket:
    """A TCP socket connected to 127.0.0.1:port inside the network namespace of `pid` (run in a thread:
    setns(2) changes only the calling thread's namespace, which is restored before returning)."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into the network namespace of pid {pid}")
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # belongs to the pod's namespace from now on
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:  # a thread left in the pod's namespace would be a leak
                os._exit(70)
        try:
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect(("127.0.0.1", port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock
    finally:
        os.close(target)
        os.close(own)


class KubeProxy:
    def __init__(self, client: KubeClient, node_ip: Callable[[], str], pod_pid: Callable[[str], int | None]) -> None:
        self.services = Informer(client, "/api/v1/services")
        self.endpoints = Informer(client, "/api/v1/endpoints")
        self.node_ip = node_ip
        self.pod_pid = pod_pid
        self.servers: dict[int, tuple[tuple[str, str, str], asyncio.Server]] = {}  # nodePort -> (svc key, port name)
        self.failed: dict[int, float] = {}
        self.next: dict[int, int] = {}  # nodePort -> round-robin position

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self.services.run(), name="kube-proxy services")
                group.create_task(self.endpoints.run(), name="kube-proxy endpoints")
                group.create_task(self._loop(), name="kube-proxy sync")
        finally:
            for _, server in self.servers.values():
                server.close()
            self.servers.clear()

    async def _loop(self) -> None:
        while True:
            if self.services.synced.is_set():
                await self.sync()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.services.changed.wait(), 1.0)
            self.services.changed.clear()

    def wanted(self) -> dict[int, tuple[str, str, str]]:
        out: dict[int, tuple[str, str, str]] = {}
        for svc in self.services.values():
            meta, spec = svc.get("metadata") or {}, svc.get("spec") or {}
            for p in spec.get("ports") or []:
                if p.get("nodePort") and str(p.get("protocol") or "TCP") == "TCP":
                    out[int(p["nodePort"])] = (str(meta.get("namespace")), str(meta.get("name")),
                                               str(p.get("name") or ""))
        return out

    async def sync(self) -> None:
        wanted = self.wanted()
        for port in [p for p in self.servers if self.servers[p][0] != wanted.get(p)]:
            _, server = self.servers.pop(port)
            server.close()
            log.info("closed node port %d", port)
        loop = asyncio.get_running_loop()
        for port, target in wanted.items():
            if port in self.servers or loop.time() < self.failed.get(port, 0.0):
                continue
            try:
                server = await asyncio.start_server(self._handler(port), "0.0.0.0", port, reuse_address=True)
            except OSError as exc:
                log.warning("cannot listen on node port %d for %s/%s: %s", port, target[0], target[1], exc)
                self.failed[port] = loop.time() + RETRY_LISTEN_S
                continue
            self.servers[port] = (target, server)
            log.info("listening on node port %d for service %s/%s", port, target[0], target[1])

    def _handler(self, port: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        return lambda reader, writer: self._forward(port, reader, writer)

    def ready_endpoints(self, port: int) -> list[tuple[str, int, str]]:
        """(ip, port, pod uid) of the ready endpoints behind a node port, in a stable order."""
        entry = self.servers.get(port)
        if entry is None:
            return []
        ns, name, port_name = entry[0]
        ep = self.endpoints.get(f"{ns}/{name}") or {}
        out = []
        for subset in ep.get("subsets") or []:
            ports = [p for p in subset.get("ports") or [] if str(p.get("name") or "") == port_name]
            for p in ports:
                for a in subset.get("addresses") or []:
                    out.append((str(a.get("ip")), int(p["port"]), str((a.get("targetRef") or {}).get("uid") or "")))
        return sorted(out)

    async def _open(self, ip: str, port: int, uid: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        pid = self.pod_pid(uid) if uid else None
        if pid:
            sock = await asyncio.to_thread(connect_in_netns, pid, port)
            return await asyncio.open_connection(sock=sock)
        host = "127.0.0.1" if ip == self.node_ip() else ip
        return await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)

    async def _forward(self, node_port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            endpoints = self.ready_endpoints(node_port)
            if not endpoints:
                return  # kube-proxy: REJECT ("has no endpoints"): the client sees the connection close
            i = self.next.get(node_port, 0) % len(endpoints)
            self.next[node_port] = i + 1
            ip, port, uid = endpoints[i]
            try:
                up_reader, up_writer = await self._open(ip, port, uid)
            except (OSError, TimeoutError) as exc:
                log.warning("node port %d: cannot reach endpoint %s:%d: %s", node_port, ip, port, exc)
                return
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
        finally:
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, ConnectionError):
        pass
