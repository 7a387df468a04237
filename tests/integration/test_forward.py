"""`lifecycle forward` as a process against a real broker: exposures published retained (as the service does), local
TCP/UDP echo servers standing in for the node ports, clients connecting through the host ports it opens."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from pathlib import Path

import pytest
from conftest import free_port
from forwarding import (
    exposure,
    forward_process,
    free_udp_port,
    message,
    publish_retained,
    tcp_ask,
    tcp_echo,
    udp_ask,
    udp_echo,
)
from lifecycle_mqtt import PrivateBroker, unique_prefix

from lifecycle.protocol import Topics


@pytest.fixture
def topic(mqtt_broker: tuple[str, int]) -> tuple[str, str]:
    """(prefix, exposures topic) of a node of the test's own."""
    prefix = unique_prefix("fwd")
    return prefix, Topics(prefix, "fwdnode").exposures


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def test_ports_open_close_and_retarget_as_the_retained_message_changes(topic: tuple[str, str]) -> None:
    prefix, exposures = topic
    web, dns, other = free_port(), free_udp_port(), free_port()
    async with tcp_echo() as node_web, udp_echo() as node_dns, tcp_echo() as node_other:
        # Published before `forward` starts: the retained message is what it finds on subscribing.
        await publish_retained(exposures, message(1, exposure(web, node_web),
                                                  exposure(dns, node_dns, protocol="UDP", service="dns")))
        async with forward_process(prefix, "fwdnode") as fwd:
            await fwd.wait_line(f"tcp 127.0.0.1:{web}: forwarding to 127.0.0.1:{node_web} for default/web")
            await fwd.wait_line(f"udp 127.0.0.1:{dns}: forwarding to 127.0.0.1:{node_dns} for default/dns")
            assert await tcp_ask(web, b"hello" * 100_000) == b"hello" * 100_000
            assert await udp_ask(dns, b"q1") == b"echo:q1"

            # A connection held open while its exposure goes away is closed; the port stops answering.
            reader, writer = await asyncio.open_connection("127.0.0.1", web)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            mark = len(fwd.lines)
            await publish_retained(exposures, message(2, exposure(dns, node_dns, protocol="UDP", service="dns"),
                                                      exposure(other, node_other, service="other")))
            await fwd.wait_line(f"tcp port {web}: closed (default/web is no longer exposed)", after=mark)
            await fwd.wait_line(f"tcp 127.0.0.1:{other}: forwarding", after=mark)
            assert await asyncio.wait_for(reader.read(), 2) == b""
            writer.close()
            assert await refused(web)
            assert await tcp_ask(other, b"x") == b"x"
            assert await udp_ask(dns, b"q2") == b"echo:q2"  # untouched by the change

            # The same port sent elsewhere: kept open, new connections go to the new target.
            mark = len(fwd.lines)
            await publish_retained(exposures, message(3, exposure(other, node_web, service="other")))
            await fwd.wait_line(f"tcp port {other}: now forwarding to 127.0.0.1:{node_web}", after=mark)
            await fwd.wait_line(f"udp port {dns}: closed", after=mark)
            assert await tcp_ask(other, b"y") == b"y"

            # Cleared (as on reset): every port closes.
            mark = len(fwd.lines)
            await publish_retained(exposures, b"")
            await fwd.wait_line(f"tcp port {other}: closed", after=mark)
            assert await refused(other)
            assert await fwd.stop() == 0
            assert fwd.lines[-1] == "stopped; every listener closed"


async def test_a_taken_host_port_is_reported_and_the_others_keep_working(topic: tuple[str, str]) -> None:
    prefix, exposures = topic
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken, free = int(squatter.getsockname()[1]), free_port()
        async with tcp_echo() as node_port, forward_process(prefix, "fwdnode") as fwd:
            await fwd.wait_line(f"watching {exposures}")
            await publish_retained(exposures, message(1, exposure(taken, node_port, service="a"),
                                                      exposure(free, node_port, service="b")))
            line = await fwd.wait_line(f"tcp 127.0.0.1:{taken}: cannot listen for default/a")
            assert "the port is already in use on the host" in line, line
            await fwd.wait_line(f"tcp 127.0.0.1:{free}: forwarding")
            assert await tcp_ask(free, b"b") == b"b"

            # A node port nobody answers on: the client's connection is closed, with a line saying why.
            dead, mark = free_port(), len(fwd.lines)
            await publish_retained(exposures, message(2, exposure(free, dead, service="b")))
            await fwd.wait_line(f"tcp port {free}: now forwarding to 127.0.0.1:{dead}", after=mark)
            with contextlib.suppress(OSError):  # or a reset (its bytes were never read)
                assert await tcp_ask(free, b"lost") == b""
            await fwd.wait_line(f"tcp port {free}: cannot reach 127.0.0.1:{dead} on the node (connection refused)")

            # The port is freed, the next message opens it (the periodic retry does the same without one).
            squatter.close()
            mark = len(fwd.lines)
            await publish_retained(exposures, message(3, exposure(taken, node_port, service="a"),
                                                      exposure(free, node_port, service="b")))
            await fwd.wait_line(f"tcp 127.0.0.1:{taken}: forwarding", after=mark)
            assert await tcp_ask(taken, b"a") == b"a"
    await publish_retained(exposures, b"")


BAD_MESSAGES = {
    b"not json": "not UTF-8 JSON",
    b"[]": "not a JSON object",
    json.dumps({"seq": "1", "host": "localhost", "exposures": []}).encode(): "seq: expected an integer",
    message(2, {**exposure(1, 2), "protocol": "SCTP"}): "exposures[0].protocol: expected 'TCP' or 'UDP'",
    message(2, {**exposure(1, 2), "node_ip": "node.example"}): "exposures[0].node_ip: expected an IP address",
    message(2, exposure(0, 2)): "exposures[0].port: expected an integer 1..65535",
    message(2, exposure(9, 2), exposure(9, 3, service="x")): "TCP port 9 is given to default/web and default/x",
}


async def test_an_invalid_message_is_refused_and_changes_nothing(topic: tuple[str, str]) -> None:
    prefix, exposures = topic
    web, other = free_port(), free_port()
    async with tcp_echo() as node_port, forward_process(prefix, "fwdnode") as fwd:
        await publish_retained(exposures, message(1, exposure(web, node_port)))
        await fwd.wait_line(f"tcp 127.0.0.1:{web}: forwarding")
        for payload, why in BAD_MESSAGES.items():
            await publish_retained(exposures, payload)
            line = await fwd.wait_line("refused an exposures message", why, after=len(fwd.lines) - 1)
            assert line.endswith("; listeners unchanged"), line
            assert await tcp_ask(web, b"still") == b"still"
        # Conflicted entries are valid, and not forwarded: the host cannot tell which Service is meant.
        mark = len(fwd.lines)
        conflict = "also asked for by default/web2"
        await publish_retained(exposures, message(3, exposure(web, node_port), exposure(other, node_port, service="a",
                                                                                        conflict=conflict)))
        await fwd.wait_line(f"tcp port {other}: not forwarded, conflict: default/a: {conflict}", after=mark)
        assert await refused(other) and await tcp_ask(web, b"w") == b"w"
        assert not any("closed" in line or "forwarding" in line for line in fwd.lines[mark:])
    await publish_retained(exposures, b"")


async def test_listeners_survive_the_broker_going_away_and_follow_it_after_it_returns(tmp_path: Path) -> None:
    broker = PrivateBroker(tmp_path, PrivateBroker.anonymous)
    broker.start()
    exposures = Topics("fwd", "fwdnode").exposures
    web, later = free_port(), free_port()
    try:
        async with tcp_echo() as node_port, forward_process("fwd", "fwdnode", port=broker.port) as fwd:
            await publish_retained(exposures, message(1, exposure(web, node_port)), port=broker.port)
            await fwd.wait_line(f"tcp 127.0.0.1:{web}: forwarding")
            broker.stop()
            await fwd.wait_line(f"broker mqtt://127.0.0.1:{broker.port}", "listeners kept, reconnecting")
            assert await tcp_ask(web, b"still") == b"still"  # the data path does not need the broker
            broker.start()
            mark = len(fwd.lines)
            await fwd.wait_line(f"watching {exposures}", after=mark, timeout_s=10)
            await publish_retained(exposures, message(2, exposure(later, node_port)), port=broker.port)
            await fwd.wait_line(f"tcp port {web}: closed", after=mark)
            await fwd.wait_line(f"tcp 127.0.0.1:{later}: forwarding", after=mark)
            assert await tcp_ask(later, b"back") == b"back"
    finally:
        broker.stop()
