"""Requests over a real broker (Mosquitto at 127.0.0.1:1883) to the service running test steps: replies to the
MQTT 5 response topic with the correlation data or to `reply_to`, refusals with codes, retained requests ignored."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from lifecycle_fakes import journal, steer
from lifecycle_mqtt import probe, retained, service_config, service_in_process, unique_prefix

from lifecycle.adapters.mqtt import MqttBridge
from lifecycle.bus import Bus
from lifecycle.config import MqttConfig
from lifecycle.protocol import Action, Reply, Request, Status, Topics


@pytest.fixture(autouse=True)
def _broker(mqtt_broker: tuple[str, int]) -> None:
    """Every test here needs the shared broker; fail with the command that starts it."""


BAD_REQUESTS = [
    (b"{not json", "malformed_json", None),
    (b"\xff\xfe", "malformed_json", None),
    (b"[1, 2]", "invalid_request", None),
    (b'{"id": "a1", "action": "explode"}', "unknown_action", "a1"),
    (b'{"id": 5, "action": "install"}', "invalid_request", None),
    (b'{"action": "install"}', "invalid_request", None),
    (b'{"id": "a2", "action": 7}', "invalid_request", "a2"),
    (b'{"id": "a3", "action": "install", "kubernetes_version": 131}', "invalid_request", "a3"),
    (b'{"id": "a4", "action": "status", "reply_to": "x/#"}', "invalid_reply_to", "a4"),
    (b'{"id": "a5", "action": "install", "kubernetes_version": "v1.99.0"}', "unsupported_version", "a5"),
    (b'{"id": "' + b"x" * (1024 * 1024) + b'", "action": "install"}', "payload_too_large", None),
]


async def test_bad_requests_get_ok_false_with_a_code_and_change_nothing(tmp_path: Path) -> None:
    prefix = unique_prefix("bad")
    async with service_in_process(service_config(tmp_path, prefix=prefix)) as svc, probe(svc.topics) as p:
        await p.ready()
        before = await retained(svc.topics.status)
        for payload, code, request_id in BAD_REQUESTS:
            reply = await p.ask_raw(payload)
            assert (reply["ok"], reply["error"]["code"], reply["id"]) == (False, code, request_id), payload[:60]
            assert reply["state"] == "idle" and reply["error"]["message"]
        assert await retained(svc.topics.status) == before
        assert p.events() == []
        assert journal(tmp_path) == []


async def test_install_over_mqtt5_replies_with_the_correlation_data_and_reaches_running(tmp_path: Path) -> None:
    prefix = unique_prefix("install")
    async with service_in_process(service_config(tmp_path, prefix=prefix)) as svc, probe(svc.topics) as p:
        await p.ready()
        reply = await p.ask({"id": "i-1", "action": "install", "kubernetes_version": "v1.32.1"})
        assert reply["ok"] and reply["id"] == "i-1" and reply["request_id"] == "i-1" and reply["error"] is None
        await p.wait_state("running")
        events = p.events()
        assert [e["data"]["seq"] for e in events] == list(range(1, len(events) + 1))
        assert {(e["specversion"], e["source"]) for e in events} == {("1.0", f"/{svc.topics.base}")}
        status = json.loads(await retained(svc.topics.status))
        assert (status["state"], status["kubernetes_version"], status["request_id"]) == ("running", "v1.32.1", "i-1")
        assert status["seq"] == events[-1]["data"]["seq"]
        # Which state change the status reflects, for a host that subscribed late (issue 8, leftover b).
        changes = [e["data"] for e in events if e["type"] == "lifecycle.state.changed"]
        assert changes[-1]["to"] == "running" and status["state_seq"] == changes[-1]["state_seq"] == len(changes)

        again = await p.ask({"id": "i-2", "action": "install"})
        assert again["ok"] and again["request_id"] == "i-1" and again["state"] == "running"
        other = await p.ask({"id": "i-3", "action": "install", "kubernetes_version": "v1.31.4"})
        assert not other["ok"] and other["error"]["code"] == "upgrade_unsupported"
        status_reply = await p.ask({"id": "s-1", "action": "status"})
        assert status_reply["ok"] and status_reply["status"]["state"] == "running"
        assert await retained(svc.topics.availability) == b"online"
    assert await retained(svc.topics.availability) == b"offline"  # clean shutdown


async def test_mqtt311_client_gets_the_reply_on_reply_to(tmp_path: Path) -> None:
    prefix = unique_prefix("v311")
    async with service_in_process(service_config(tmp_path, prefix=prefix)) as svc, \
            probe(svc.topics, v5=False) as p:
        await p.ready()
        reply_to = f"{svc.topics.replies}/legacy-1"
        await p.send(json.dumps({"id": "old-1", "action": "status", "reply_to": reply_to}).encode(),
                     response_topic=False)
        reply = (await p.wait_for(lambda m: m.topic == reply_to)).json()
        assert reply["id"] == "old-1" and reply["ok"] and reply["status"]["node"] == "n1"


async def test_retained_requests_are_ignored(tmp_path: Path) -> None:
    prefix = unique_prefix("retained")
    config = service_config(tmp_path, prefix=prefix)
    async with probe(Topics(config.mqtt.prefix, config.node_name)) as p:
        await p.send(json.dumps({"id": "stale", "action": "install"}).encode(), retain=True)
        try:
            async with service_in_process(config):
                await p.ready()
                reply = await p.ask({"id": "s", "action": "status"})  # handled after the retained one would be
                assert reply["state"] == "idle"
                assert journal(tmp_path) == [] and p.events() == []
        finally:
            await p.client.publish(p.topics.requests, b"", qos=1, retain=True)  # clear the retained message


async def test_cancel_then_install_resumes_and_reset_preempts(tmp_path: Path) -> None:
    prefix = unique_prefix("cancel")
    async with service_in_process(service_config(tmp_path, prefix=prefix)) as svc, probe(svc.topics) as p:
        await p.ready()
        steer(tmp_path, "images", block=True)
        assert (await p.ask({"id": "i-1", "action": "install"}))["ok"]
        await p.wait_state("images")
        cancelled = await p.ask({"id": "c-1", "action": "cancel"})
        assert cancelled["ok"] and cancelled["state"] == "failed" and cancelled["request_id"] == "i-1"
        failed = (await p.wait_for(lambda m: m.topic == svc.topics.events
                                   and m.json()["type"] == "lifecycle.step.failed")).json()
        assert failed["data"]["error"]["code"] == "cancelled" and failed["data"]["state"] == "images"

        resumed = await p.ask({"id": "i-2", "action": "install"})
        assert resumed["ok"] and resumed["request_id"] == "i-2"
        entered = await p.wait_for(lambda m: m.topic == svc.topics.events and m.json()["data"].get("from") == "failed")
        assert entered.json()["data"]["to"] == "images"

        reset = await p.ask({"id": "z-1", "action": "reset"})
        assert reset["ok"] and reset["state"] == "resetting"
        await p.wait_state("idle")
        assert journal(tmp_path)[-2:] == ["cleanup images", "reset"]
        status = json.loads(await retained(svc.topics.status))
        assert status["state"] == "idle" and status["request_id"] == "z-1"



async def test_a_slow_diagnose_and_unacknowledged_replies_leave_the_next_requests_answered(tmp_path: Path) -> None:
    """Requests are handled in order, but a `diagnose` (seconds of collection) is answered beside the requests
    after it: a `status` sent behind it gets its reply first. Before, the request loop awaited each handler and
    each reply's PUBACK in turn, and nothing was answered until the diagnose was done."""
    prefix = unique_prefix("beside")
    topics = Topics(prefix, "n1")
    collecting = asyncio.Event()
    finish = asyncio.Event()

    async def handle(request: Request) -> Reply:
        if request.action == Action.DIAGNOSE:
            collecting.set()
            await finish.wait()
        return Reply(id=request.id, ok=True, state="idle")

    bridge = MqttBridge(config=MqttConfig(), topics=topics, outbox=Bus().subscribe("mqtt"),
                        status=lambda: Status(node="n1", state="idle", since=0.0, seq=0, request_id=None,
                                             kubernetes_version=None, step=None, steps=0, error=None),
                        handle=handle,
                        client_id=f"beside-{prefix}")
    async with bridge, probe(topics) as p:
        await p.ready()
        diagnose = await p.send(json.dumps({"id": "d-1", "action": "diagnose"}).encode())
        await asyncio.wait_for(collecting.wait(), 5)
        reply = await p.ask({"id": "s-1", "action": "status"}, timeout_s=5)
        assert reply["id"] == "s-1"
        assert not any(m.topic == p.reply_topic and m.correlation == diagnose for m in p.seen)  # collecting
        finish.set()
        done = await p.wait_for(lambda m: m.topic == p.reply_topic and m.correlation == diagnose, timeout_s=5)
        assert done.json()["id"] == "d-1"
        await bridge.close(drain_timeout_s=2)
