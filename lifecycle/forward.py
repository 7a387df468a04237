"""`lifecycle forward`, the host side of LoadBalancer Services: follows the retained `<prefix>/<node>/exposures`
message and keeps one listener on the host per exposure (TCP, or UDP where the Service asks for it) that forwards to
the node's node port. Writes nothing to disk; in step when the open listeners match the last valid message.

`Forwarder` is what a host backend embeds (feed it `ExposureSet`s); `follow` adds the MQTT subscription. The
listeners do not depend on the broker: while it is away they stay as they were, and the retained message sets them
right after the reconnect.
"""

from __future__ import annotations

import asyncio
import errno
import signal
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, cast

import aiomqtt

from lifecycle.exposures import Exposure, ExposuresError, ExposureSet, IpProtocol, parse_exposures

if TYPE_CHECKING:
    from lifecycle.cli import Target

CHUNK_BYTES = 256 * 1024
CONNECT_TIMEOUT_S = 5.0  # to the node port; a node that does not answer in that time is down
UDP_IDLE_S = 60.0  # a UDP "connection" (client address) forgotten after this long without a datagram
UDP_QUEUE_DATAGRAMS = 64  # held per client while its socket to the node opens; more are dropped, as UDP may
UDP_MAX_CLIENTS = 1024  # a socket each: datagrams from further new addresses are dropped until some go idle
RETRY_S = 5.0  # a port that was taken on the host is tried again this often
RECONNECT_MIN_S, RECONNECT_MAX_S = 0.5, 5.0

Say = Callable[[str], None]
Key = tuple[IpProtocol, int]


class _TcpListener:
    """A TCP listener on the host; each connection is spliced to a connection to the node (half-close passed on).

    Protocols, not streams: bytes go from one transport to the other as they arrive, and a full write buffer on
    one side pauses reading on the other (asyncio's flow control), with no task per connection."""

    def __init__(self, exposure: Exposure, *, bind: str, say: Say) -> None:
        self.exposure = exposure  # read at each new connection: a retarget applies to the next one
        self._bind, self._say = bind, say
        self._server: asyncio.Server | None = None
        self.connections: set[_Splice] = set()

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Splice(self), self._bind, self.exposure.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for splice in list(self.connections):
            splice.close()
        if self._server is not None:
            await self._server.wait_closed()

    def say(self, line: str) -> None:
        self._say(line)


class _Half(asyncio.Protocol):
    """One side of a splice: what arrives goes to the other side's transport."""

    def __init__(self, splice: _Splice, *, peer: _Half | None = None) -> None:
        self.splice = splice
        self.transport: asyncio.Transport | None = None
        self.peer = peer
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer is not None and self.peer.transport is not None and self.peer.transport.can_write_eof():
            self.peer.transport.write_eof()
        if self.peer is not None and self.peer.eof:
            self.splice.close()  # both directions done
        return True  # keep the transport: the other direction may still be sending

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.splice.close(reset=exc is not None)


class _Splice(_Half):
    """The client's side; it opens the node's side and holds the pair."""

    def __init__(self, listener: _TcpListener) -> None:
        super().__init__(self)
        self.listener = listener
        self._connecting: asyncio.Task[None] | None = None
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.listener.connections.add(self)
        self.transport.pause_reading()  # type: ignore[union-attr]  # until the node's side is there
        target = self.listener.exposure
        self._connecting = asyncio.create_task(self._connect(target), name=f"forward-connect-{target.port}")

    async def _connect(self, target: Exposure) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                _, node = await loop.create_connection(lambda: _Half(self, peer=self), target.node_ip, target.node_port)
        except (OSError, TimeoutError) as exc:
            self.listener.say(f"{_label(target)}: cannot reach {target.node_ip}:{target.node_port} on the node "
                              f"({_why(exc)}); connection closed")
            self.close()
            return
        if self._closed:  # the client left, or the exposure was removed, meanwhile
            if node.transport is not None:
                node.transport.close()
            return
        self.peer = node
        if self.transport is not None:
            self.transport.resume_reading()

    def close(self, *, reset: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        self.listener.connections.discard(self)
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        for half in (self, self.peer):
            if half is not None and half.transport is not None:
                if reset:
                    half.transport.abort()  # a reset on one side is a reset on the other
                else:
                    half.transport.close()  # what is buffered is still sent


class _UdpListener:
    """A UDP socket on the host; each client address gets its own socket to the node, so replies find their way."""

    def __init__(self, exposure: Exposure, *, bind: str, say: Say) -> None:
        self.exposure = exposure
        self._bind, self._say = bind, say
        self._transport: asyncio.DatagramTransport | None = None
        self._sessions: dict[tuple[str, int], _UdpSession] = {}
        self._reaper: asyncio.Task[None] | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Datagrams(self._from_client), local_addr=(self._bind, self.exposure.port))
        self._reaper = asyncio.create_task(self._reap(), name=f"forward-udp-reaper-{self.exposure.port}")

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()
        if self._transport is not None:
            self._transport.close()

    def _from_client(self, data: bytes, addr: tuple[str, int]) -> None:
        session = self._sessions.get(addr)
        if session is None:
            if len(self._sessions) >= UDP_MAX_CLIENTS:
                return
            session = self._sessions[addr] = _UdpSession(self, addr)
        session.send(data)

    def reply(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._transport is not None:
            self._transport.sendto(data, addr)

    def forget(self, addr: tuple[str, int]) -> None:
        self._sessions.pop(addr, None)

    def say(self, line: str) -> None:
        self._say(line)

    async def _reap(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(UDP_IDLE_S / 4)
            for addr, session in list(self._sessions.items()):
                if loop.time() - session.last_s > UDP_IDLE_S:
                    session.close()
                    self.forget(addr)


class _UdpSession:
    def __init__(self, listener: _UdpListener, addr: tuple[str, int]) -> None:
        self._listener, self._addr = listener, addr
        self._queue: list[bytes] = []
        self._transport: asyncio.DatagramTransport | None = None
        self.last_s = asyncio.get_running_loop().time()
        self._opening = asyncio.create_task(self._open(listener.exposure), name=f"forward-udp-{addr[0]}:{addr[1]}")

    async def _open(self, target: Exposure) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(self._from_node), remote_addr=(target.node_ip, target.node_port))
        except OSError as exc:
            self._listener.say(f"{_label(target)}: cannot reach {target.node_ip}:{target.node_port} on the node "
                                f"({_why(exc)})")
            self._listener.forget(self._addr)
            return
        for data in self._queue:
            self._transport.sendto(data)
        self._queue.clear()

    def send(self, data: bytes) -> None:
        self.last_s = asyncio.get_running_loop().time()
        if self._transport is not None:
            self._transport.sendto(data)
        elif len(self._queue) < UDP_QUEUE_DATAGRAMS:
            self._queue.append(data)

    def _from_node(self, data: bytes, _addr: tuple[str, int]) -> None:
        self.last_s = asyncio.get_running_loop().time()
        self._listener.reply(data, self._addr)

    def close(self) -> None:
        self._opening.cancel()
        if self._transport is not None:
            self._transport.close()


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, tuple[str, int]], None]) -> None:
        self._on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable from the node for one datagram: UDP drops it, so do we


_Listener = _TcpListener | _UdpListener


class Forwarder:
    """Listeners that follow `apply(ExposureSet)`: diffed by (protocol, port); one `say` line per change."""

    def __init__(self, *, bind: str, say: Say) -> None:
        self.bind = bind
        self._say = say
        self._open: dict[Key, _Listener] = {}
        self._failed: dict[Key, str] = {}  # port taken etc.: retried by `retry`, reported once per reason
        self._skipped: dict[Key, str] = {}  # conflicts, reported once
        self._last: ExposureSet | None = None
        self._lock = asyncio.Lock()

    @property
    def open_ports(self) -> dict[Key, Exposure]:
        return {key: listener.exposure for key, listener in self._open.items()}

    async def apply(self, wanted: ExposureSet) -> None:
        async with self._lock:
            self._last = wanted
            desired = {e.key: e for e in wanted.exposures if e.conflict is None}
            skipped = {e.key: f"{e.name}: {e.conflict}" for e in wanted.exposures if e.conflict is not None}
            for key in sorted(self._open.keys() - desired.keys()):
                listener = self._open.pop(key)
                await listener.close()
                self._say(f"{_label(listener.exposure)}: closed ({listener.exposure.name} is no longer exposed)")
            for key in sorted(skipped.keys() - desired.keys()):
                if self._skipped.get(key) != skipped[key]:
                    self._say(f"{key[0].lower()} port {key[1]}: not forwarded, conflict: {skipped[key]}")
            self._skipped = skipped
            self._failed = {key: why for key, why in self._failed.items() if key in desired}
            for key in sorted(desired):
                await self._ensure(desired[key])

    async def retry(self) -> None:
        """Try the ports that could not be opened again (a port freed on the host starts forwarding)."""
        if self._failed and self._last is not None:
            await self.apply(self._last)

    async def close(self) -> None:
        async with self._lock:
            for key in sorted(self._open):
                await self._open.pop(key).close()

    async def _ensure(self, exposure: Exposure) -> None:
        listener = self._open.get(exposure.key)
        if listener is not None:
            if listener.exposure != exposure:
                listener.exposure = exposure  # open connections keep their target; new ones take this one
                self._say(f"{_label(exposure)}: now forwarding to {exposure.node_ip}:{exposure.node_port} "
                          f"for {exposure.name}")
            return
        kind = _TcpListener if exposure.protocol == "TCP" else _UdpListener
        listener = kind(exposure, bind=self.bind, say=self._say)
        try:
            await listener.open()
        except OSError as exc:
            why = _why(exc)
            if self._failed.get(exposure.key) != why:
                self._say(f"{_label(exposure, self.bind)}: cannot listen for {exposure.name}: {why} "
                          f"(retrying every {RETRY_S:g} s)")
            self._failed[exposure.key] = why
            return
        self._failed.pop(exposure.key, None)
        self._open[exposure.key] = listener
        self._say(f"{_label(exposure, self.bind)}: forwarding to {exposure.node_ip}:{exposure.node_port} "
                  f"for {exposure.name}")


def _label(exposure: Exposure, bind: str | None = None) -> str:
    where = f"{bind}:{exposure.port}" if bind else f"port {exposure.port}"
    return f"{exposure.protocol.lower()} {where}"


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT_S:g} s"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return "the port is already in use on the host"
    if isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
        return "connection refused"
    if isinstance(exc, OSError) and exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


async def follow(target: Target, forwarder: Forwarder, *, say: Say, timeout_s: float) -> None:
    """Apply every message on the exposures topic to `forwarder`, forever; reconnect when the broker goes away."""
    topic, delay_s = target.topics.exposures, RECONNECT_MIN_S
    while True:
        try:
            async with target.client(role="forward", timeout_s=timeout_s) as client:
                await client.subscribe(topic, qos=1)
                say(f"watching {topic} on {target.mqtt.broker}")
                delay_s = RECONNECT_MIN_S
                async for message in client.messages:
                    payload = bytes(message.payload) if isinstance(message.payload, bytes | bytearray) else b""
                    try:
                        wanted = parse_exposures(payload)
                    except ExposuresError as exc:
                        say(f"refused an exposures message: {exc}; listeners unchanged")
                        continue
                    await forwarder.apply(wanted)
        except aiomqtt.MqttError as exc:
            say(f"broker {target.mqtt.broker}: {exc}; listeners kept, reconnecting in {delay_s:g} s")
            await asyncio.sleep(delay_s)
            delay_s = min(2 * delay_s, RECONNECT_MAX_S)


async def run_forward(target: Target, *, bind: str, timeout_s: float, say: Say) -> int:
    """`lifecycle forward`: until SIGTERM/SIGINT, then close every listener."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    forwarder = Forwarder(bind=bind, say=say)

    async def retry_forever() -> None:
        while True:
            await asyncio.sleep(RETRY_S)
            await forwarder.retry()

    tasks = [asyncio.create_task(follow(target, forwarder, say=say, timeout_s=timeout_s), name="forward-follow"),
             asyncio.create_task(retry_forever(), name="forward-retry")]
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with suppress(asyncio.CancelledError):
                await task
        await forwarder.close()
        say("stopped; every listener closed")
    return 0
