"""MQTT helpers for the service core's integration tests: the service run in-process with test steps, and a
probe client (aiomqtt, MQTT 5 or 3.1.1) that records everything under the node's topics."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiomqtt
from conftest import free_port
from lifecycle_fakes import fake_plan, fake_reset, make_config, null_ports
from paho.mqtt.packettypes import PacketTypes

from lifecycle.adapters.mqtt import mqtt_properties
from lifecycle.config import Config, MqttConfig
from lifecycle.ports import Ports
from lifecycle.protocol import Topics
from lifecycle.service import serve


def unique_prefix(label: str) -> str:
    return f"test-{label}-{uuid.uuid4().hex[:8]}"


def service_config(root: Path, *, prefix: str, node: str = "n1", port: int = 1883, keepalive_s: int = 2) -> Config:
    # A client id of its own per test: a persistent session must never be shared between tests.
    mqtt = MqttConfig(broker=f"mqtt://127.0.0.1:{port}", prefix=prefix, keepalive_s=keepalive_s,
                      reconnect_min_s=0.1, reconnect_max_s=0.5, client_id=f"lifecycle-{prefix}", session_expiry_s=60)
    return replace(make_config(root, node=node), mqtt=mqtt)


@dataclass
class RunningService:
    config: Config
    topics: Topics
    task: asyncio.Task[None]
    stop: asyncio.Event


@asynccontextmanager
async def service_in_process(config: Config, *, ports: Ports | None = None) -> AsyncIterator[RunningService]:
    stop = asyncio.Event()
    task = asyncio.create_task(
        serve(config, plan=fake_plan(), reset=fake_reset, ports=ports if ports is not None else null_ports(),
              stop=stop, drain_timeout_s=2.0),
        name=f"service-{config.node_name}",
    )
    try:
        yield RunningService(config, Topics(config.mqtt.prefix, config.node_name), task, stop)
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await task


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    correlation: bytes | None

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Probe:
    client: aiomqtt.Client
    topics: Topics
    reply_topic: str
    seen: list[Received] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def _record(self) -> None:
        async for message in self.client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            correlation = getattr(message.properties, "CorrelationData", None)
            self.seen.append(Received(str(message.topic), payload, bool(message.retain), correlation))
            self.changed.set()

    async def wait_for(self, predicate: Callable[[Received], bool], *, timeout_s: float = 5.0) -> Received:
        async with asyncio.timeout(timeout_s):
            while True:
                for item in self.seen:
                    if predicate(item):
                        return item
                self.changed.clear()
                await self.changed.wait()

    async def send(self, payload: bytes, *, response_topic: bool = True, retain: bool = False) -> bytes:
        correlation = uuid.uuid4().bytes
        props = None
        if response_topic:
            props = mqtt_properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = correlation
        await self.client.publish(self.topics.requests, payload, qos=1, retain=retain, properties=props)
        return correlation

    async def ask(self, body: dict[str, Any], *, timeout_s: float = 5.0) -> dict[str, Any]:
        """Send a request with a response topic and return the reply with the same correlation data."""
        return await self.ask_raw(json.dumps(body).encode(), timeout_s=timeout_s)

    async def ask_raw(self, payload: bytes, *, timeout_s: float = 5.0) -> dict[str, Any]:
        correlation = await self.send(payload)
        reply = await self.wait_for(lambda m: m.topic == self.reply_topic and m.correlation == correlation,
                                    timeout_s=timeout_s)
        result: dict[str, Any] = reply.json()
        return result

    async def ready(self, *, timeout_s: float = 5.0) -> None:
        """Wait for the service's status: it is published once the service has subscribed to requests."""
        await self.wait_for(lambda m: m.topic == self.topics.status, timeout_s=timeout_s)

    def events(self) -> list[dict[str, Any]]:
        return [m.json() for m in self.seen if m.topic == self.topics.events]

    async def wait_state_of(self, request_id: str, state: str, *, timeout_s: float = 20.0) -> dict[str, Any]:
        """The state.changed event of `request_id`'s job entering `state`."""
        found = await self.wait_for(
            lambda m: m.topic == self.topics.events and m.json()["type"] == "lifecycle.state.changed"
            and m.json()["data"]["to"] == state and m.json()["data"]["request_id"] == request_id,
            timeout_s=timeout_s,
        )
        event: dict[str, Any] = found.json()
        return event

    async def wait_state(self, state: str, *, timeout_s: float = 5.0) -> dict[str, Any]:
        """The state.changed event entering `state` (seen at any time since the probe connected)."""
        found = await self.wait_for(
            lambda m: m.topic == self.topics.events and m.json()["type"] == "lifecycle.state.changed"
            and m.json()["data"]["to"] == state,
            timeout_s=timeout_s,
        )
        event: dict[str, Any] = found.json()
        return event


@asynccontextmanager
async def probe(
    topics: Topics, *, port: int = 1883, v5: bool = True, session: str | None = None,
    username: str | None = None, password: str | None = None, tls: ssl.SSLContext | None = None,
) -> AsyncIterator[Probe]:
    """A recording client; with `session`, a persistent MQTT 5 session that the broker queues messages for;
    with `tls`, over TLS (the broker's certificate must name 127.0.0.1)."""
    properties = None
    if session is not None:
        properties = mqtt_properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 300
    if v5:
        client = aiomqtt.Client("127.0.0.1", port, identifier=session or f"probe-{uuid.uuid4().hex[:10]}",
                                protocol=aiomqtt.ProtocolVersion.V5, clean_start=session is None,
                                properties=properties, username=username, password=password, tls_context=tls)
    else:
        client = aiomqtt.Client("127.0.0.1", port, identifier=f"probe-{uuid.uuid4().hex[:10]}",
                                protocol=aiomqtt.ProtocolVersion.V311)
    async with client:
        p = Probe(client, topics, reply_topic=f"{topics.base}/replies/test-{uuid.uuid4().hex[:8]}")
        await client.subscribe(f"{topics.base}/#", qos=1)
        recorder = asyncio.create_task(p._record(), name="probe-recorder")
        try:
            yield p
        finally:
            # paho acknowledged what sits in aiomqtt's queue: the broker will not send it again to this session,
            # so record it before leaving (a burst of events published in flight lands there at once).
            queued: asyncio.Queue[aiomqtt.Message] = client._queue  # aiomqtt exposes no size
            for _ in range(100):
                if queued.empty():
                    break
                await asyncio.sleep(0.01)
            recorder.cancel()
            await asyncio.gather(recorder, return_exceptions=True)


async def retained(topic: str, *, port: int = 1883, timeout_s: float = 3.0) -> bytes:
    """What the broker holds retained on `topic`, read by a fresh client."""
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"retained-{uuid.uuid4().hex[:10]}") as client:
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(timeout_s):
            async for message in client.messages:
                if message.retain:
                    return message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
    raise AssertionError(f"nothing retained on {topic}")


REPO = Path(__file__).resolve().parent.parent
FAKE_SERVICE = REPO / "tests" / "lifecycle_fakes.py"


@dataclass
class ServiceProcess:
    """The service with test steps in a process of its own (to SIGKILL it, to send it real signals)."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout_s: float = 10.0) -> int:
        return self.proc.wait(timeout=timeout_s)


def start_service_process(config_path: Path, *, root: Path, node: str, log_path: Path,
                          env_extra: dict[str, str] | None = None) -> ServiceProcess:
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'tests'}{os.pathsep}{REPO}", **(env_extra or {}))
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, str(FAKE_SERVICE), "--config", str(config_path), "--root", str(root), "--node", node],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
        )
    return ServiceProcess(proc, log_path)


class PrivateBroker:
    """A Mosquitto of the test's own on a free port, to stop and restart or to configure (auth, TLS).

    `conf(port, workdir)` returns the config text; runs as root (`user root`) so it can write in the tmp dir.
    """

    def __init__(self, workdir: Path, conf: Callable[[int, Path], str]) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.conf_path = workdir / "mosquitto.conf"
        self.conf_path.write_text(conf(self.port, workdir) + f"\nuser root\nlog_dest file {workdir / 'broker.log'}\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def anonymous(port: int, workdir: Path) -> str:
        """Anonymous, with persistence: sessions and what is queued for them survive a restart."""
        (workdir / "data").mkdir(exist_ok=True)
        return (f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                f"persistence_location {workdir / 'data'}/")

    def start(self) -> None:
        self.proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(self.conf_path)])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                time.sleep(0.05)
            else:
                return
        raise AssertionError(f"private mosquitto did not listen on {self.port}: {self.log()}")

    def log(self) -> str:
        path = self.workdir / "broker.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its persistence file on the way out
            self.proc.wait(timeout=5)
            self.proc = None
