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
from lifecycle.store import Snapshot

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


class Wired:
    """Engine -> Bus -> MqttBridge with the durable outbox, wired as `serve` wires them, on the shared Mosquitto;
    every event heard by a `Subscriber`."""

    def __init__(self, tmp_path: Path, plan: list[HoldsTheLoop], label: str) -> None:
        prefix = unique_prefix(label)
        config = service_config(tmp_path / "root", prefix=prefix)
        self.topics = Topics(prefix, config.node_name)
        self.paths = HostPaths(config.root)
        self.store = state_file(self.paths)
        bus = Bus()
        self.outbox = bus.subscribe("mqtt")
        self.durable = Outbox(self.paths.state_dir)
        self.durable.open()
        unused = cast(Any, None)
        self.engine = Engine(config=config, paths=self.paths, ports=Ports(docker=unused, commands=unused,
                             kubelet=unused, kube=unused), plan=plan, reset=_no_reset, store=self.store, bus=bus,
                             outbox=self.durable)
        self.bridge = MqttBridge(config=config.mqtt, topics=self.topics, outbox=self.outbox,
                                 status=self.engine.status, handle=RequestHandler(self.engine).handle,
                                 client_id=f"lifecycle-{prefix}", durable=self.durable)
        self.subscriber = Subscriber(self.topics.events)

    async def install(self, *, heard: str) -> float:
        """Install to `running`; the arrival time of the first message holding `heard`."""
        try:
            await asyncio.to_thread(self.subscriber.wait_subscribed)
            async with self.bridge:
                await asyncio.wait_for(self.bridge.connected.wait(), 10)
                await self.engine.install(request_id="held", version=None)
                await self.engine.wait_job()
                await self.outbox.drained()
                await self.bridge.close(drain_timeout_s=5.0)
            await eventually(lambda: self.subscriber.arrival_of(heard) is not None, timeout_s=5.0)
        finally:
            self.subscriber.close()
            self.durable.close()
        events = [json.loads(line.partition("|")[2]) for line in self.subscriber.lines if '"specversion"' in line]
        assert [e["data"]["to"] for e in events if e["type"].endswith("state.changed")][-1] == "running"
        arrived_s = self.subscriber.arrival_of(heard)
        assert arrived_s is not None
        return arrived_s


async def test_an_event_reaches_the_subscriber_while_the_step_that_reported_it_still_holds_the_loop(
    tmp_path: Path,
) -> None:
    plan = [HoldsTheLoop(name, blocks=index == 0) for index, name in enumerate(STEP_NAMES)]
    arrived_s = await Wired(tmp_path, plan, "send-on-offer").install(heard=MARK)
    released_s = plan[0].released_at_s
    assert arrived_s < released_s, (
        f"the event arrived {arrived_s - released_s:+.3f} s after the step released the loop: it waited for it")
    assert released_s - arrived_s > BLOCK_S / 2, "it left at once, not at the end of the hold"


async def test_a_state_change_is_heard_before_a_slow_disk_has_replaced_the_state_file(tmp_path: Path) -> None:
    """state.json's replace (a write and a rename on the loop) comes after the publish: a disk that takes 1 s for
    it (held on purpose) does not hold the announcement back. The outbox append still comes first."""
    plan = [HoldsTheLoop(name, blocks=False) for name in STEP_NAMES]
    wired = Wired(tmp_path, plan, "state-before-disk")
    replace = wired.store.replace
    slow: dict[str, float] = {}

    def slow_replace(snapshot: Snapshot, **kwargs: Any) -> None:
        if snapshot.state == "images" and not slow:
            outbox_text = (wired.paths.state_dir / "outbox").read_text()
            assert '"to": "images"' in outbox_text or '"to":"images"' in outbox_text, "appended before"
            time.sleep(BLOCK_S)  # on purpose: the loop is held, as by a slow disk
            slow["released_s"] = time.time()
        replace(snapshot, **kwargs)

    wired.store.replace = slow_replace  # type: ignore[method-assign]
    arrived_s = await wired.install(heard='"to":"images"')
    assert slow, "the replace into `images` was never made"
    assert arrived_s < slow["released_s"] - BLOCK_S / 2, (
        f"`images` was heard {arrived_s - slow['released_s']:+.3f} s after state.json was replaced")
