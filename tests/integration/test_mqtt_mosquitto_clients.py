"""The contract as any MQTT client sees it: `mosquitto_pub` (MQTT 5 response topic + correlation data) sends the
requests, `mosquitto_sub` reads the replies and the retained status."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from lifecycle_mqtt import service_config, service_in_process, unique_prefix

from lifecycle.protocol import Topics


@pytest.fixture(autouse=True)
def _broker(mqtt_broker: tuple[str, int]) -> None:
    """Every test here needs the shared broker; fail with the command that starts it."""


async def _sub_one(topic: str, *, retained_only: bool = False) -> asyncio.subprocess.Process:
    """mosquitto_sub for one message, returned once its subscription is acknowledged (it prints SUBACK; stdbuf
    makes it print lines as they come instead of at exit)."""
    argv = ["stdbuf", "-oL", "mosquitto_sub", "-V", "mqttv5", "-t", topic, "-C", "1", "-W", "10", "-F", "%J", "-d"]
    if retained_only:
        argv.append("--retained-only")
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    async with asyncio.timeout(5):
        while b"SUBACK" not in await proc.stdout.readline():
            pass
    return proc


async def _message(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=10)
    assert proc.returncode == 0, out
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    assert lines, f"mosquitto_sub printed no message: {out!r}"
    message: dict[str, Any] = json.loads(lines[0])
    return message


async def _pub(topic: str, *args: str) -> None:
    proc = await asyncio.create_subprocess_exec("mosquitto_pub", "-V", "mqttv5", "-q", "1", "-t", topic, *args)
    assert await asyncio.wait_for(proc.wait(), timeout=10) == 0


async def _ask(topics: Topics, reply_topic: str, correlation: str, *payload_args: str) -> dict[str, Any]:
    sub = await _sub_one(reply_topic)
    await _pub(topics.requests, *payload_args, "-D", "publish", "response-topic", reply_topic,
               "-D", "publish", "correlation-data", correlation)
    return await _message(sub)


async def test_mosquitto_clients_install_and_read_the_retained_status(tmp_path: Path) -> None:
    prefix = unique_prefix("mosq")
    async with service_in_process(service_config(tmp_path, prefix=prefix, node="mosq")) as svc:
        await _message(await _sub_one(svc.topics.status))  # published once the service is subscribed
        status = await _message(await _sub_one(svc.topics.status, retained_only=True))
        assert status["retain"] == 1 and status["payload"]["state"] == "idle"

        reply_topic = f"{svc.topics.private_replies}/mosq-1"  # outside <prefix>/#, as the CLI does
        got = await _ask(svc.topics, reply_topic, "corr-42", "-m", '{"id": "m-1", "action": "install"}')
        assert got["properties"]["correlation-data"] == "corr-42"
        assert got["payload"]["id"] == "m-1" and got["payload"]["ok"] is True

        async with asyncio.timeout(10):
            while status["payload"]["state"] != "running":
                await asyncio.sleep(0.1)
                status = await _message(await _sub_one(svc.topics.status, retained_only=True))
        assert status["payload"]["request_id"] == "m-1" and status["payload"]["seq"] > 7


async def test_mosquitto_pub_of_an_oversized_request_gets_payload_too_large(tmp_path: Path) -> None:
    prefix = unique_prefix("mosq-big")
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"id": "big", "action": "install", "pad": "x" * 70_000}))
    async with service_in_process(service_config(tmp_path, prefix=prefix, node="mosq")) as svc:
        await _message(await _sub_one(svc.topics.status))  # published once the service is subscribed
        got = await _ask(svc.topics, f"{svc.topics.replies}/big", "corr-big", "-f", str(big))
        assert got["properties"]["correlation-data"] == "corr-big"
        assert got["payload"] == {"id": None, "ok": False, "state": "idle", "error": {
            "code": "payload_too_large", "message": got["payload"]["error"]["message"]}}
        assert "65536" in got["payload"]["error"]["message"]
