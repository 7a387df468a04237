"""faultlib.Driver against a scripted stand-in for the service on the shared broker (about a second): replies and
state changes are on different topics and reach a client in either order (docs/protocol.md: the events of what a
request started "may arrive after the reply", or before it). The driver must send an armed batch whichever comes
first. It used to wait for a later change into the state when the change came before the last reply of the batch
before, and the batch armed for `resetting` (entered by a reset of the `renewing` batch) was never sent."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from faultlib import Driver, Node
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

# Per request id, what the stand-in does, in this order: ("change", to) publishes a state change, ("set", to) moves
# to a state whose change is published later (or never), ("reply",) answers. Default: a reply.
Script = dict[str, list[tuple[str, ...]]]


class ScriptedService:
    """Answers the node's requests from its script; `got` holds every request id it received, in order."""

    def __init__(self, node: Node, host: str, port: int) -> None:
        self.node = node
        self.script: Script = {}
        self.got: list[str] = []
        self.state, self.state_seq = "running", 0
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_request
        self.client.on_subscribe = lambda *_args: subscribed.set()
        self.client.connect(host, port)
        self.client.loop_start()
        self.client.subscribe(node.topic("requests"), qos=1)
        assert subscribed.wait(timeout=10), "the stand-in's subscription was not acknowledged"

    def _on_request(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        request = json.loads(message.payload)
        self.got.append(request["id"])
        for step in self.script.get(request["id"], [("reply",)]):
            if step[0] == "set":
                self.state = step[1]
            elif step[0] == "change":
                self.state_seq += 1
                data = {"from": self.state, "to": step[1], "state_seq": self.state_seq, "request_id": request["id"]}
                self.state = step[1]
                self.client.publish(self.node.topic("events"),
                                    json.dumps({"type": "lifecycle.state.changed", "data": data}), qos=1)
            else:
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.CorrelationData = message.properties.CorrelationData
                self.client.publish(message.properties.ResponseTopic,
                                    json.dumps({"id": request["id"], "ok": True, "state": self.state}), qos=1,
                                    properties=props)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def service_and_driver(tmp_path: Path, mqtt_broker: tuple[str, int]) -> Iterator[tuple[ScriptedService, Driver]]:
    node = Node(name=f"drv-{uuid.uuid4().hex[:8]}", root=tmp_path, config_path=tmp_path / "unused.toml",
                log_path=tmp_path / "unused.log")
    service = ScriptedService(node, *mqtt_broker)
    driver = Driver(node, host=mqtt_broker[0], port=mqtt_broker[1])
    yield service, driver
    driver.close()
    service.close()


def _asks(*ids: str) -> list[dict[str, Any]]:
    return [{"id": request_id, "action": "status"} for request_id in ids]


def test_a_batch_goes_out_when_its_state_is_announced_before_the_last_reply_of_the_batch_before(
    service_and_driver: tuple[ScriptedService, Driver],
) -> None:
    """As the real service at `renewing` + reset: each change is published before the reply of the request that
    made it, and the reset's change before the reply to the second reset."""
    service, d = service_and_driver
    service.script = {"renew": [("change", "renewing"), ("reply",)],
                      "reset1": [("change", "resetting"), ("reply",)]}
    d.arm("renewing", _asks("renewing-status", "reset1", "reset2"))
    d.arm("resetting", _asks("resetting-status"))
    d.send(*_asks("renew"))
    assert d.reply("resetting-status", timeout_s=5)["state"] == "resetting", d.arrivals
    assert service.got == ["renew", "renewing-status", "reset1", "reset2", "resetting-status"]
    assert d.missed == []


def test_a_batch_waits_for_the_next_change_into_its_state_when_the_state_was_left_before_the_last_reply(
    service_and_driver: tuple[ScriptedService, Driver],
) -> None:
    """A cancel + resume in the batch before: the install left the armed state (`failed`) before the last reply.
    The batch goes out at the re-entry, never into `failed`."""
    service, d = service_and_driver
    service.script = {"start": [("change", "binaries"), ("change", "failed"), ("reply",)],
                      "resume": [("change", "binaries"), ("reply",)]}
    d.arm("binaries", _asks("binaries-status"))
    d.send(*_asks("start"))
    d.reply("start", timeout_s=5)
    d.send(*_asks("probe"))  # one connection, requests in order: a batch sent at the reply would come first
    d.reply("probe", timeout_s=5)
    assert service.got == ["start", "probe"], d.arrivals
    d.send(*_asks("resume"))
    assert d.reply("binaries-status", timeout_s=5)["state"] == "binaries", d.arrivals
    assert service.got == ["start", "probe", "resume", "binaries-status"]


def test_a_batch_is_not_sent_at_the_last_reply_when_that_reply_says_the_node_left_the_state(
    service_and_driver: tuple[ScriptedService, Driver],
) -> None:
    """The change into the armed state came before the last reply, but that reply was made in `failed` (the batch
    before cancelled, and its resume is answered before the change back is published, as the real service does
    with replies going out beside its request loop): the batch waits for the change back into the state."""
    service, d = service_and_driver
    service.script = {"start": [("change", "binaries"), ("set", "failed"), ("reply",)],
                      "resume": [("reply",), ("change", "binaries")]}
    d.arm("binaries", _asks("binaries-status"))
    d.send(*_asks("start"))
    assert d.reply("start", timeout_s=5)["state"] == "failed"
    d.send(*_asks("resume"))
    assert d.reply("binaries-status", timeout_s=5)["state"] == "binaries", d.arrivals
    assert service.got == ["start", "resume", "binaries-status"]
