"""Where replies may go, over the shared broker (Mosquitto at 127.0.0.1:1883) to the service running test steps:
only below `<prefix>/<node>/replies/` or `<prefix>-replies/<node>/`. A request naming any other topic, or one the
broker would refuse (and disconnect the service for), is refused, nothing is published there, and the service
keeps answering."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from lifecycle_fakes import journal
from lifecycle_mqtt import REPO, Probe, probe, service_config, service_in_process, unique_prefix
from paho.mqtt.packettypes import PacketTypes

from lifecycle.adapters.mqtt import mqtt_properties
from lifecycle.protocol import Topics


@pytest.fixture(autouse=True)
def _broker(mqtt_broker: tuple[str, int]) -> None:
    """Every test here needs the shared broker; fail with the command that starts it."""


# What Mosquitto refuses in a PUBLISH topic (lib/util_topic.c, lib/utf8_mosq.c), each inside the allowed tree.
MALFORMED = ["a\nb", "a\tb", "a\x7fb", "a\x85b", "a\ufffeb", "a\uffffb", "a\U0010ffffb", "a\x00b", "a+b", "a/#",
             "a" * 1100, "a/" * 201 + "b"]


def replies(topics: Topics) -> str:
    return f"{topics.base}/replies"


def private_replies(topics: Topics) -> str:
    return f"{topics.prefix}-replies/{topics.node}"


async def ask_with(p: Probe, body: dict[str, Any], *, response_topic: str | None,
                   timeout_s: float = 5.0) -> dict[str, Any]:
    """Send `body` with this MQTT 5 response topic (or none), wait for the reply on the probe's reply topic."""
    correlation = uuid.uuid4().bytes
    props = mqtt_properties(PacketTypes.PUBLISH)
    if response_topic is not None:
        props.ResponseTopic = response_topic
    props.CorrelationData = correlation
    await p.client.publish(p.topics.requests, json.dumps(body).encode(), qos=1, properties=props)
    reply = await p.wait_for(lambda m: m.topic == p.reply_topic and m.correlation == correlation,
                             timeout_s=timeout_s)
    result: dict[str, Any] = reply.json()
    return result


def assert_nothing_but_requests_and_replies(p: Probe, *, requests: int) -> None:
    """What the probe saw under the node's topics: its own requests, the replies on its reply topic, the service's
    retained status and `online`; nothing else (no reply steered onto a node topic)."""
    on_requests = [m for m in p.seen if m.topic == p.topics.requests]
    assert len(on_requests) == requests, [m.payload[:80] for m in on_requests]
    others = [m for m in p.seen if m.topic not in (p.topics.requests, p.reply_topic)]
    assert {m.payload for m in others if m.topic == p.topics.availability} == {b"online"}, others
    statuses = [m.json() for m in others if m.topic == p.topics.status]
    assert statuses and all("ok" not in s and s["state"] == "idle" for s in statuses), statuses  # no reply there
    assert {m.topic for m in others} == {p.topics.availability, p.topics.status}, others


async def test_a_reply_to_the_broker_refuses_is_refused_and_the_service_keeps_answering(tmp_path: Path) -> None:
    prefix = unique_prefix("malformed")
    async with service_in_process(service_config(tmp_path, prefix=prefix)) as svc, probe(svc.topics) as p:
        await p.ready()
        for suffix in MALFORMED:
            bad = f"{replies(svc.topics)}/{suffix}"
            # No other address: refused without a reply (the broker would disconnect the service for it).
            await p.send(json.dumps({"id": "bad", "action": "install", "reply_to": bad}).encode(),
                         response_topic=False)
            status = await p.ask({"id": "after", "action": "status"})
            assert status["ok"] and status["state"] == "idle", repr(suffix)
            # With a response topic as well: the refusal goes there.
            reply = await p.ask({"id": "bad-2", "action": "install", "reply_to": bad})
            assert (reply["ok"], reply["error"]["code"]) == (False, "invalid_reply_to"), (repr(suffix), reply)
        assert_nothing_but_requests_and_replies(p, requests=3 * len(MALFORMED))
        assert journal(tmp_path) == []  # no refused install ran


async def test_replies_never_go_onto_status_events_availability_or_requests(tmp_path: Path) -> None:
    prefix = unique_prefix("steer")
    config = service_config(tmp_path, prefix=prefix)
    other = Topics(prefix, "other")
    async with service_in_process(config) as svc, probe(svc.topics) as p, probe(other) as o:
        await p.ready()
        own = svc.topics
        steered = [own.status, own.events, own.availability, own.requests, other.status, other.events,
                   other.availability, other.requests, f"{replies(other)}/x", f"{private_replies(other)}/x",
                   replies(own), f"{replies(own)}/", f"{prefix}/x", "elsewhere/x", f"$SYS/{prefix}"]
        for topic in steered:
            # The kubeconfig reply carries the admin key: refused before the request is handled, on either field.
            reply = await ask_with(p, {"id": "kc", "action": "kubeconfig", "reply_to": p.reply_topic},
                                   response_topic=topic)
            assert (reply["ok"], reply["error"]["code"]) == (False, "invalid_reply_topic"), (topic, reply)
            assert topic in reply["error"]["message"], reply
            reply = await ask_with(p, {"id": "kc", "action": "kubeconfig", "reply_to": topic},
                                   response_topic=p.reply_topic)
            assert (reply["ok"], reply["error"]["code"]) == (False, "invalid_reply_to"), (topic, reply)
        assert_nothing_but_requests_and_replies(p, requests=2 * len(steered))
        assert o.seen == []  # nothing on the other node's topics

        for allowed in (f"{replies(own)}/a/b", f"{private_replies(own)}/c"):
            async with aiomqtt.Client("127.0.0.1", 1883, identifier=f"r-{uuid.uuid4().hex[:8]}") as client:
                await client.subscribe(allowed, qos=1)
                await p.client.publish(own.requests, json.dumps({"id": "s", "action": "status",
                                                                 "reply_to": allowed}).encode(), qos=1)
                async with asyncio.timeout(5):
                    message = await anext(aiter(client.messages))
                assert isinstance(message.payload, bytes) and json.loads(message.payload)["ok"], allowed


async def test_the_cli_reply_is_not_seen_by_a_subscriber_of_the_prefix(tmp_path: Path) -> None:
    prefix = unique_prefix("cli-reply")
    config = service_config(tmp_path, prefix=prefix)
    async with service_in_process(config) as svc, aiomqtt.Client("127.0.0.1", 1883) as observer:
        await observer.subscribe(f"{prefix}/#", qos=1)
        await asyncio.sleep(0.5)  # the service is up (its retained status) before the CLI asks
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lifecycle", "status", "-o", "json", "--broker", config.mqtt.broker,
            "--prefix", prefix, "--node", config.node_name, cwd=REPO, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
        assert proc.returncode == 0 and json.loads(out)["ok"], err.decode()
        seen: list[str] = []
        try:
            async with asyncio.timeout(0.5):
                async for message in observer.messages:
                    seen.append(str(message.topic))
        except TimeoutError:
            pass
        # The CLI's request (the observer may read requests on an open broker) and the status, never the reply.
        assert not [t for t in seen if t not in (svc.topics.status, svc.topics.availability, svc.topics.requests)]
