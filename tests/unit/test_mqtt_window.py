"""The MQTT bridge keeps several QoS 1 publishes of the outbox in flight (issue 11: one broker round trip per
event made bursts of events wait in line), publishes them in order, acknowledges the durable outbox oldest first,
and puts back at the front what was in flight when the connection failed. A stand-in client whose PUBACKs the
test releases; the real broker is in tests/integration/test_mqtt_outbox.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiomqtt
import pytest

from lifecycle.adapters.mqtt import MAX_INFLIGHT, MqttBridge
from lifecycle.bus import Bus
from lifecycle.config import MqttConfig
from lifecycle.outbox import Outbox
from lifecycle.protocol import Event, EventType, Reply, Request, Status, Topics


class HeldAcks:
    """`publish` records the payload and returns only when the test acknowledges it (or fails it)."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.acks: list[asyncio.Future[None]] = []

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        self.sent.append(json.loads(payload)["data"]["seq"])
        ack = asyncio.get_running_loop().create_future()
        self.acks.append(ack)
        await ack


async def _handle(request: Request) -> Reply:
    raise AssertionError("no request expected")


def _bridge(tmp_path: Path, bus: Bus, durable: Outbox) -> MqttBridge:
    return MqttBridge(config=MqttConfig(), topics=Topics("t", "n"), outbox=bus.subscribe("mqtt"),
                      status=lambda: Status(node="n", state="idle", since=0.0, seq=0), handle=_handle,
                      client_id="test", durable=durable)


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_burst_goes_out_in_order_with_a_window_of_publishes_in_flight(tmp_path: Path) -> None:
    bus, durable = Bus(), Outbox(tmp_path)
    durable.open()
    syncer = asyncio.create_task(durable.run())
    bridge = _bridge(tmp_path, bus, durable)
    client = HeldAcks()
    for seq in range(1, 31):
        kind = EventType.STATE_CHANGED if seq == 1 else EventType.STEP_PROGRESS
        event = Event(type=kind, seq=seq, data={"seq": seq})
        if kind is EventType.STATE_CHANGED:
            durable.append(event)  # as the engine does: on disk before it may go out
        bus.publish(event)
    drain = asyncio.create_task(bridge._drain_outbox(client))  # type: ignore[arg-type]
    await asyncio.sleep(0.2)  # the state change's fsync (a thread)
    await _settle()
    assert client.sent == list(range(1, MAX_INFLIGHT + 1)), "a window of publishes before any PUBACK, in order"
    client.acks[0].set_result(None)
    await _settle()
    assert client.sent == list(range(1, MAX_INFLIGHT + 2)), "one acknowledged: one more goes out"
    assert (tmp_path / "outbox.acked").read_text().strip().lstrip("0") == "1"
    client.acks[2].set_exception(aiomqtt.MqttError("connection lost"))  # a later one fails first: seq 3
    client.acks[1].set_result(None)
    with pytest.raises(aiomqtt.MqttError):
        await drain
    # Seq 1 and 2 were acknowledged; 3 onwards (in flight or queued) are published again, in order, after a reconnect.
    retry = HeldAcks()
    drain = asyncio.create_task(bridge._drain_outbox(retry))  # type: ignore[arg-type]
    await _settle()
    assert retry.sent == list(range(3, 3 + MAX_INFLIGHT))
    drain.cancel()
    syncer.cancel()
    await asyncio.gather(drain, syncer, return_exceptions=True)
    durable.close()


