"""Issue 11: an event leaves for the broker when the engine puts it on the bus, not when the bridge's task next
gets the loop. A step that reports progress and then keeps the loop busy (here 1 s of blocking work, on purpose)
must not hold the event back: an external subscriber (`mosquitto_sub`, a process of its own, on the real
Mosquitto) hears it while the loop is still held. Before, it arrived only once the step let go of the loop."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, cast

from lifecycle_fakes import eventually
from lifecycle_mqtt import service_config, unique_prefix

from lifecycle.adapters.mqtt import MqttBridge
from lifecycle.bus import Bus
from lifecycle.config import STEP_NAMES
from lifecycle.engine import Engine
from lifecycle.outbox import Outbox
from lifecycle.paths import HostPaths
from lifecycle.ports import Ports
from lifecycle.protocol import Topics
from lifecycle.service import RequestHandler, state_file
from lifecycle.step import StepContext

BLOCK_S = 1.0
MARK = "before the loop is held"


class HoldsTheLoop:
    """Reports progress, then blocks the loop for BLOCK_S (the first step); the others do nothing."""

    timeout_s = 30.0
    retries = 0

    def __init__(self, name: str, *, blocks: bool) -> None:
        self.name = name
        self.blocks = blocks
        self.ran = False
        self.released_at_s = 0.0

    async def is_done(self, ctx: StepContext) -> bool:
        return self.ran

    async def run(self, ctx: StepContext) -> None:
        if self.blocks:
            ctx.progress(MARK)
            time.sleep(BLOCK_S)  # noqa: ASYNC251  # on purpose: the loop is held, as by CPU work on it
            self.released_at_s = time.time()
        self.ran = True

    async def before_retry(self, ctx: StepContext) -> None:
        return None


async def _no_reset(ctx: StepContext) -> None:
    return None


class Subscriber:
    """`mosquitto_sub` stamping each message on arrival (%U), subscribed before anything is published."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.lines: list[str] = []
        self.proc = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", "1883", "-q", "1", "-t", topic,
                                      "-F", "%U|%p"], stdout=subprocess.PIPE, text=True)
        stdout = self.proc.stdout
        assert stdout is not None
        threading.Thread(target=lambda: self.lines.extend(stdout), daemon=True).start()

    def wait_subscribed(self) -> None:
        deadline_s = time.monotonic() + 10
        while not any("subscribed-marker" in line for line in self.lines):
            assert time.monotonic() < deadline_s, "mosquitto_sub never heard its marker"
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", "1883", "-t", self.topic, "-m",
                            "subscribed-marker"], check=True)
            time.sleep(0.05)

    def arrival_of(self, needle: str) -> float | None:
        for line in list(self.lines):
            stamp, _, payload = line.partition("|")
            if needle in payload:
                return float(stamp)
        return None

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


async def test_an_event_reaches_the_subscriber_while_the_step_that_reported_it_still_holds_the_loop(
    tmp_path: Path,
) -> None:
    prefix = unique_prefix("send-on-offer")
    config = service_config(tmp_path / "root", prefix=prefix)
    topics = Topics(prefix, config.node_name)
    paths = HostPaths(config.root)
    bus = Bus()
    outbox = bus.subscribe("mqtt")
    durable = Outbox(paths.state_dir)
    durable.open()
    plan = [HoldsTheLoop(name, blocks=index == 0) for index, name in enumerate(STEP_NAMES)]
    unused = cast(Any, None)
    engine = Engine(config=config, paths=paths, ports=Ports(docker=unused, commands=unused, kubelet=unused,
                    kube=unused), plan=plan, reset=_no_reset, store=state_file(paths), bus=bus, outbox=durable)
    bridge = MqttBridge(config=config.mqtt, topics=topics, outbox=outbox, status=engine.status,
                        handle=RequestHandler(engine).handle, client_id=f"lifecycle-{prefix}", durable=durable)
    subscriber = Subscriber(topics.events)
    try:
        await asyncio.to_thread(subscriber.wait_subscribed)
        async with bridge:
            await asyncio.wait_for(bridge.connected.wait(), 10)
            await engine.install(request_id="held", version=None)
            await engine.wait_job()
            await outbox.drained()
            await bridge.close(drain_timeout_s=5.0)
        await eventually(lambda: subscriber.arrival_of(MARK) is not None, timeout_s=5.0)
        arrived_s = subscriber.arrival_of(MARK)
    finally:
        subscriber.close()
        durable.close()
    assert arrived_s is not None, "the progress event never arrived"
    released_s = plan[0].released_at_s
    assert arrived_s < released_s, (
        f"the event arrived {arrived_s - released_s:+.3f} s after the step released the loop: it waited for it")
    assert released_s - arrived_s > BLOCK_S / 2, "it left at once, not at the end of the hold"
    events = [json.loads(line.partition("|")[2]) for line in subscriber.lines if '"specversion"' in line]
    assert [e["data"]["to"] for e in events if e["type"].endswith("state.changed")][-1] == "running"
