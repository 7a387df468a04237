"""The exposures message: `parse_exposures` accepts exactly what docs/schemas/exposures.schema.json accepts (plus the
uniqueness rule a schema cannot say), and `Forwarder` in-process: a port freed on the host is picked up by `retry`."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from forwarding import exposure, message, tcp_ask, tcp_echo
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]

from lifecycle.exposures import CLEARED, Exposure, ExposuresError, ExposureSet, parse_exposures
from lifecycle.forward import Forwarder

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "docs" / "schemas" / "exposures.schema.json").read_text())
VALIDATOR = Draft202012Validator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)

VALID: list[Any] = [
    {"seq": 0, "host": "localhost", "exposures": []},
    json.loads(message(7, exposure(8080, 30080), exposure(53, 30053, protocol="UDP", service="dns"))),
    json.loads(message(8, exposure(8080, 30080, conflict="x"), exposure(8080, 30081, service="b", conflict="x"))),
    json.loads(message(9, exposure(8080, 30080), exposure(8080, 30081, protocol="UDP"))),  # TCP and UDP: two keys
    {**json.loads(message(1, {**exposure(1, 2), "node_ip": "fd00::2", "later": 1})), "added_later": True},
    json.loads(message(1, {**exposure(1, 2), "port": 8.0})),
]
INVALID: list[Any] = [
    [], "x", 3, {"host": "localhost", "exposures": []}, {"seq": -1, "host": "localhost", "exposures": []},
    {"seq": True, "host": "localhost", "exposures": []}, {"seq": 1, "host": "", "exposures": []},
    {"seq": 1, "host": "localhost", "exposures": {}}, {"seq": 1, "host": "localhost", "exposures": [7]},
    *[json.loads(message(1, {**exposure(1, 2), field: value})) for field, value in [
        ("port", 0), ("port", 65536), ("port", "80"), ("port", 8.5), ("node_port", None), ("protocol", "tcp"),
        ("namespace", ""), ("service", 3), ("node_ip", "localhost"), ("node_ip", 2130706433), ("conflict", 1)]],
    json.loads(message(1, {k: v for k, v in exposure(1, 2).items() if k != "conflict"})),
]


@pytest.mark.parametrize("doc", VALID)
def test_what_the_schema_accepts_parses(doc: Any) -> None:
    VALIDATOR.validate(doc)
    parsed = parse_exposures(json.dumps(doc).encode())
    assert parsed.seq == doc["seq"] and len(parsed.exposures) == len(doc["exposures"])
    VALIDATOR.validate(parsed.to_json())  # what the service would publish from these types


@pytest.mark.parametrize("doc", INVALID)
def test_what_the_schema_refuses_is_refused(doc: Any) -> None:
    assert not VALIDATOR.is_valid(doc)
    with pytest.raises(ExposuresError):
        parse_exposures(json.dumps(doc).encode())


def test_a_port_given_twice_without_a_conflict_is_refused_and_an_empty_payload_is_no_exposures() -> None:
    with pytest.raises(ExposuresError, match="TCP port 80 is given to default/web and default/b without a conflict"):
        parse_exposures(message(1, exposure(80, 1), exposure(80, 2, service="b")))
    assert parse_exposures(b"") == CLEARED
    with pytest.raises(ExposuresError, match="more than"):
        parse_exposures(b" " * (1024 * 1024 + 1))


async def test_a_port_freed_on_the_host_is_opened_by_retry() -> None:
    lines: list[str] = []
    forwarder = Forwarder(bind="127.0.0.1", say=lines.append)
    async with tcp_echo() as node_port:
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", free_port()))
            squatter.listen()
            port = int(squatter.getsockname()[1])
            wanted = ExposureSet(seq=1, host="localhost", exposures=(
                Exposure("default", "web", port, "TCP", "127.0.0.1", node_port),))
            await forwarder.apply(wanted)
            await forwarder.retry()  # still taken: no second line
            assert len(lines) == 1 and "already in use" in lines[0] and forwarder.open_ports == {}
        await forwarder.retry()
        assert lines[1] == f"tcp 127.0.0.1:{port}: forwarding to 127.0.0.1:{node_port} for default/web"
        assert await tcp_ask(port, b"ok") == b"ok"
        await forwarder.close()
        await asyncio.sleep(0)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
