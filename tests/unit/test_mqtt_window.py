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
from paho.mqtt.client import ConnectFlags
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from lifecycle.adapters.mqtt import MAX_INFLIGHT, MqttBridge
from lifecycle.bus import Bus
from lifecycle.config import MqttConfig
from lifecycle.outbox import Outbox
from lifecycle.protocol import Event, EventType, Reply, Request, Status, Topics


class HeldAcks:
    """In place of the bridge's `_publish_now`: records the payload; its PUBACK is the future the test resolves
    (or fails)."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.acks: list[asyncio.Future[None]] = []

    def publish_now(self, topic: str, payload: bytes, *, retain: bool) -> asyncio.Future[None]:
        self.sent.append(json.loads(payload)["data"]["seq"])
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.acks.append(ack)
        return ack


WINDOW = 20  # what Mosquitto takes unless configured (its Receive Maximum): fewer than the burst below


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
    bridge = _bridge(tmp_path, bus, durable)
    client = HeldAcks()
    bridge._publish_now = client.publish_now  # type: ignore[method-assign]
    for seq in range(1, 31):
        kind = EventType.STATE_CHANGED if seq == 1 else EventType.STEP_PROGRESS
        event = Event(type=kind, seq=seq, data={"seq": seq})
        if kind is EventType.STATE_CHANGED:
            durable.append(event)  # as the engine does: on disk before it may go out
        bus.publish(event)
    drain = asyncio.create_task(bridge._drain_outbox(WINDOW))
    await asyncio.sleep(0.2)  # the state change's fsync (a thread)
    await _settle()
    assert client.sent == list(range(1, WINDOW + 1)), "a window of publishes before any PUBACK, in order"
    client.acks[0].set_result(None)
    await _settle()
    assert client.sent == list(range(1, WINDOW + 2)), "one acknowledged: one more goes out"
    assert (tmp_path / "outbox.acked").read_text().strip().lstrip("0") == "1"
    client.acks[2].set_exception(aiomqtt.MqttError("connection lost"))  # a later one fails first: seq 3
    client.acks[1].set_result(None)
    with pytest.raises(aiomqtt.MqttError):
        await drain
    # Seq 1 and 2 were acknowledged; 3 onwards (in flight or queued) are published again, in order, after a reconnect.
    retry = HeldAcks()
    bridge._publish_now = retry.publish_now  # type: ignore[method-assign]
    drain = asyncio.create_task(bridge._drain_outbox(WINDOW))
    await _settle()
    assert retry.sent == list(range(3, 3 + WINDOW))
    drain.cancel()
    await asyncio.gather(drain, return_exceptions=True)
    durable.close()




async def test_the_window_keeps_within_the_brokers_receive_maximum(tmp_path: Path) -> None:
    """MQTT 5 (4.9): a client never has more QoS 1 publishes unacknowledged than the broker's CONNACK Receive
    Maximum. Mosquitto 2.0 acknowledges QoS 1 at once whatever it said, so this is checked at the CONNACK: paho
    does not apply it itself, the bridge's hook does, for its outbox and for paho's own limit."""
    bridge = _bridge(tmp_path, Bus(), Outbox(tmp_path))
    paho_client = bridge._client._client
    connack = Properties(PacketTypes.CONNACK)  # type: ignore[no-untyped-call]
    connack.ReceiveMaximum = 5
    paho_client.on_connect(paho_client, None, ConnectFlags(session_present=False), ReasonCode(PacketTypes.CONNACK),
                           connack)
    assert bridge._window() == 5 and paho_client._max_inflight_messages == 5
    paho_client.on_connect(paho_client, None, ConnectFlags(session_present=False), ReasonCode(PacketTypes.CONNACK),
                           Properties(PacketTypes.CONNACK))  # type: ignore[no-untyped-call]
    assert bridge._window() == MAX_INFLIGHT, "none said: 65535, so the bridge's own limit"
