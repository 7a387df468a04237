"""Helpers for the `lifecycle forward` tests: the real process with its output lines, TCP/UDP echo servers that
stand in for the node port, and exposures messages published retained with aiomqtt."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import aiomqtt
from lifecycle_mqtt import REPO


def exposure(port: int, node_port: int, *, protocol: str = "TCP", service: str = "web",
             conflict: str | None = None) -> dict[str, Any]:
    return {"namespace": "default", "service": service, "port": port, "protocol": protocol, "node_ip": "127.0.0.1",
            "node_port": node_port, "conflict": conflict}


def message(seq: int, *exposures: dict[str, Any]) -> bytes:
    return json.dumps({"seq": seq, "host": "localhost", "exposures": list(exposures)}).encode()


async def publish_retained(topic: str, payload: bytes, *, port: int = 1883) -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"exp-{uuid.uuid4().hex[:10]}") as client:
        await client.publish(topic, payload, qos=1, retain=True)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def tcp_echo() -> AsyncIterator[int]:
    """A TCP echo server on a free port (the node port): yields the port."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # a selector transport, not a subclass

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(b"echo:" + data, addr)


@asynccontextmanager
async def udp_echo() -> AsyncIterator[int]:
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(_UdpEcho, local_addr=("127.0.0.1", 0))
    try:
        yield int(transport.get_extra_info("sockname")[1])
    finally:
        transport.close()


async def udp_ask(port: int, data: bytes, *, timeout_s: float = 2.0) -> bytes:
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            if not got.done():
                got.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", port))
    try:
        transport.sendto(data)
        return await asyncio.wait_for(got, timeout_s)
    finally:
        transport.close()


async def tcp_ask(port: int, data: bytes, *, timeout_s: float = 2.0) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout_s)
    try:
        writer.write(data)
        writer.write_eof()  # the forwarder passes the half-close on; the echo server then closes
        return await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()


class ForwardProcess:
    """`python -m lifecycle forward` with its stdout lines collected."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read(), name="forward-stdout")

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.append(line.decode().rstrip("\n"))
            self._changed.set()

    async def wait_line(self, *parts: str, timeout_s: float = 5.0, after: int = 0) -> str:
        """The first line from index `after` on that holds every one of `parts`."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    for line in self.lines[after:]:
                        if all(p in line for p in parts):
                            return line
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"no line with {parts} in {self.lines[after:]}") from None

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.terminate()
        code = await asyncio.wait_for(self.proc.wait(), 10)
        await self._reader
        return code


@asynccontextmanager
async def forward_process(prefix: str, node: str, *, port: int = 1883,
                          flags: tuple[str, ...] | None = None) -> AsyncIterator[ForwardProcess]:
    """`lifecycle forward` for `node` on the broker at `port`, or with `flags` (e.g. `--config FILE`) instead."""
    if flags is None:
        flags = ("--broker", f"mqtt://127.0.0.1:{port}", "--prefix", prefix, "--node", node)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lifecycle", "forward", *flags, "--timeout", "2", cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    fwd = ForwardProcess(proc)
    try:
        yield fwd
    finally:
        await fwd.stop()
