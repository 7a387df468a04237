"""bench_events: events from the engine to the real Mosquitto (127.0.0.1:1883), and what persisting them costs.

Delivery: an install whose first step reports N progress events at once (as a pull does); timed from the install
request until the MQTT bridge's outbox is empty, i.e. the broker acknowledged (QoS 1) every event and status.
Ours: Engine -> Bus -> MqttBridge (built as `lifecycle.service.serve` builds them). Baseline: the same payloads
on the same topics published with raw aiomqtt in the same process, one awaited at a time as the bridge does;
for reference, the same with every publish in flight at once. Persistence: `Store.save_seq` (per event),
`Store.save` (per state change), and the engine's cost per progress event with and without the sequence save.
Run: `.venv/bin/python bench/bench_events.py [--events N] [--runs N]`. Clears its retained topics; temp dirs only.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, cast

import aiomqtt
from benchlib import Row, machine_note, median, print_table, ratio_line

from lifecycle.adapters.mqtt import MqttBridge
from lifecycle.bus import Bus, BusItem
from lifecycle.config import STEP_NAMES, Config, KubernetesConfig, MqttConfig
from lifecycle.engine import Engine
from lifecycle.logging import configure_logging
from lifecycle.machine import State
from lifecycle.paths import HostPaths
from lifecycle.ports import Ports
from lifecycle.protocol import Event, Topics, dumps
from lifecycle.service import RequestHandler, state_file
from lifecycle.step import StepContext
from lifecycle.store import Snapshot, Store

CONNECT_TIMEOUT_S = 10.0
EMIT_RUNS = 15  # cheap (~0.2 s each) and noisy: more runs than the delivery
IN_FLIGHT = 20  # paho's default limit of unacknowledged QoS 1 messages
Publish = tuple[str, bytes, bool]  # topic, payload, retain


class BurstStep:
    """A step that reports `events` progress events back to back and times them (the engine's cost per event)."""

    timeout_s = 60.0
    retries = 0

    def __init__(self, name: str, events: int) -> None:
        self.name = name
        self.events = events
        self.emit_s = 0.0

    async def is_done(self, ctx: StepContext) -> bool:
        return False

    async def run(self, ctx: StepContext) -> None:
        total_bytes = self.events * 65_536
        start_s = time.perf_counter()
        for i in range(self.events):
            ctx.progress(f"pulling layer {i % 7}", current=(i + 1) * 65_536, total=total_bytes, unit="bytes")
        self.emit_s = time.perf_counter() - start_s

    async def before_retry(self, ctx: StepContext) -> None:
        return None


class NoSeqStore(Store):
    """The real store without the per-event sequence write: isolates what that write costs."""

    def save_seq(self, seq: int) -> None:
        return None


async def no_reset(ctx: StepContext) -> None:
    return None


def make_config(root: Path, *, broker: str, prefix: str) -> Config:
    mqtt = MqttConfig(broker=broker, prefix=prefix, client_id=f"lifecycle-{prefix}", session_expiry_s=5)
    k8s = KubernetesConfig(api_port=0, kubelet_healthz_port=0, etcd_metrics_port=0)
    return Config(node_name="bench", root=root, mqtt=mqtt, kubernetes=k8s)


def make_engine(config: Config, bus: Bus, events: int, *, store: Store | None = None) -> tuple[Engine, BurstStep]:
    plan = [BurstStep(name, events if index == 0 else 0) for index, name in enumerate(STEP_NAMES)]
    paths = HostPaths(config.root)
    unused = cast(Any, None)
    engine = Engine(config=config, paths=paths, ports=Ports(docker=unused, commands=unused, kubelet=unused,
                    kube=unused), plan=plan, reset=no_reset, store=store or state_file(paths), bus=bus)
    return engine, plan[0]


def encode(item: BusItem, topics: Topics) -> Publish:
    """What the bridge publishes for a bus item (same topics, payloads and retain flags)."""
    if isinstance(item, Event):
        return topics.events, dumps(item.to_cloudevent(topics.source)), False
    return topics.status, dumps(item.to_json()), True


# ---- delivery -----------------------------------------------------------------------------------------------


async def through_bridge(events: int, *, broker: str, prefix: str) -> tuple[float, float, list[Publish]]:
    """Seconds from the install request to the last acknowledged publish, seconds to encode one item as the
    bridge does, and the publishes (for the baseline)."""
    with tempfile.TemporaryDirectory(prefix="bench-events-") as tmp:
        config = make_config(Path(tmp), broker=broker, prefix=prefix)
        topics = Topics(prefix, config.node_name)
        bus = Bus()
        outbox = bus.subscribe("mqtt", max_items=events * 2)
        capture = bus.subscribe("capture", max_items=events * 2)
        engine, _ = make_engine(config, bus, events)
        bridge = MqttBridge(config=config.mqtt, topics=topics, outbox=outbox, status=engine.status,
                            handle=RequestHandler(engine).handle, client_id=config.mqtt.client_id or prefix)
        async with bridge:
            try:
                await asyncio.wait_for(bridge.connected.wait(), CONNECT_TIMEOUT_S)
            except TimeoutError:
                raise SystemExit(f"bench_events: no MQTT broker answered at {broker} "
                                 f"within {CONNECT_TIMEOUT_S:g} s") from None
            gc.collect()
            start_s = time.perf_counter()
            await engine.install(request_id="bench", version=None)
            await engine.wait_job()
            await outbox.drained()
            elapsed_s = time.perf_counter() - start_s
            await bridge.close(drain_timeout_s=5.0)
        if outbox.dropped or capture.dropped:
            raise SystemExit("bench_events: the bus dropped items; raise max_items")
        items = [capture.pop() for _ in range(len(capture))]
        start_s = time.perf_counter()
        publishes = [encode(item, topics) for item in items]
        encode_s = (time.perf_counter() - start_s) / len(items)
    return elapsed_s, encode_s, publishes


async def raw_publishes(publishes: list[Publish], *, host: str, port: int, in_flight: int) -> float:
    """Seconds to publish everything with at most `in_flight` publishes awaiting their acknowledgement."""
    async with aiomqtt.Client(host, port, identifier=f"bench-raw-{uuid.uuid4().hex[:8]}",
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        client.pending_calls_threshold = in_flight + 1  # else aiomqtt warns about every windowed publish
        gc.collect()
        start_s = time.perf_counter()
        if in_flight == 1:
            for topic, payload, retain in publishes:
                await client.publish(topic, payload, qos=1, retain=retain)
        else:
            gate = asyncio.Semaphore(in_flight)

            async def one(topic: str, payload: bytes, retain: bool) -> None:
                async with gate:
                    await client.publish(topic, payload, qos=1, retain=retain)

            await asyncio.gather(*(one(*p) for p in publishes))
        return time.perf_counter() - start_s


async def clear_retained(topics: Topics, *, host: str, port: int) -> None:
    try:
        async with aiomqtt.Client(host, port, identifier=f"bench-clean-{uuid.uuid4().hex[:8]}") as client:
            for topic in (topics.status, topics.availability):
                await client.publish(topic, b"", qos=1, retain=True)  # an empty retained message deletes it
    except aiomqtt.MqttError:
        return  # no broker: nothing was retained either; the error that matters was raised already


async def delivery(events: int, runs: int, *, host: str, port: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"bridge": [], "raw": [], "raw_window": [], "items": [], "encode": []}
    for _ in range(runs):
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        try:
            elapsed_s, encode_s, publishes = await through_bridge(
                events, broker=f"mqtt://{host}:{port}", prefix=prefix
            )
            out["bridge"].append(elapsed_s)
            out["encode"].append(encode_s)
            out["items"].append(float(len(publishes)))
            out["raw"].append(await raw_publishes(publishes, host=host, port=port, in_flight=1))
            out["raw_window"].append(await raw_publishes(publishes, host=host, port=port, in_flight=IN_FLIGHT))
        finally:
            await clear_retained(Topics(prefix, "bench"), host=host, port=port)
    return out


# ---- persistence --------------------------------------------------------------------------------------------


def store_costs(calls: int) -> tuple[list[float], list[float]]:
    """Seconds per `save_seq` (median of blocks of 1000) and per `save` (each timed)."""
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        store = Store(Path(tmp) / "state.json", known_states={"idle", "certs"})
        seq_s: list[float] = []
        for block in range(calls // 1000):
            start_s = time.perf_counter()
            for i in range(1000):
                store.save_seq(block * 1000 + i)
            seq_s.append((time.perf_counter() - start_s) / 1000)
        save_s: list[float] = []
        for i in range(50):
            start_s = time.perf_counter()
            store.save(Snapshot(state="certs", since=time.time(), seq=i, request_id="bench"))
            save_s.append(time.perf_counter() - start_s)
        store.unlock()  # closes the sequence file
    return seq_s, save_s


async def engine_emit_s(events: int, *, persist: bool) -> float:
    """Seconds per progress event inside the engine (sequence, save, event, bus), no MQTT attached."""
    with tempfile.TemporaryDirectory(prefix="bench-emit-") as tmp:
        config = make_config(Path(tmp), broker="mqtt://127.0.0.1:1", prefix="unused")
        bus = Bus()
        sink = bus.subscribe("sink", max_items=events * 2)
        state_path = HostPaths(config.root).state_dir / "state.json"
        store = None if persist else NoSeqStore(state_path, known_states={s.value for s in State})
        engine, step = make_engine(config, bus, events, store=store)
        gc.collect()
        await engine.install(request_id="bench", version=None)
        await engine.wait_job()
        if sink.dropped:
            raise SystemExit("bench_events: the bus dropped items")
        return step.emit_s / events


# ---- report -------------------------------------------------------------------------------------------------


def rate_row(label: str, seconds: list[float], items: float) -> Row:
    s = median(seconds)
    return Row(label, (f"{s:.3f}", f"{items / s:,.0f}", f"{s / items * 1e6:.0f}"))


async def run(events: int, runs: int, host: str, port: int) -> None:
    d = await delivery(events, runs, host=host, port=port)
    items = median(d["items"])
    print_table(
        f"events: {items:.0f} items (events + statuses) to Mosquitto {host}:{port}, QoS 1; median of {runs} runs",
        ("path", "seconds", "items/s", "us/item"),
        [rate_row("baseline: raw aiomqtt, one publish awaited at a time", d["raw"], items),
         rate_row("ours: engine -> bus -> MqttBridge", d["bridge"], items),
         rate_row(f"reference: raw aiomqtt, up to {IN_FLIGHT} publishes in flight", d["raw_window"], items)],
    )
    print(ratio_line("throughput, ours/baseline (1: the bridge adds nothing)", baseline=items / median(d["raw"]),
                     ours=items / median(d["bridge"]), higher_is_better=True))
    seq_s, save_s = store_costs(20_000)
    with_seq: list[float] = []
    without_seq: list[float] = []
    for _ in range(EMIT_RUNS):  # interleaved: the load of the machine drifts, both sides see the same drift
        with_seq.append(await engine_emit_s(events, persist=True))
        without_seq.append(await engine_emit_s(events, persist=False))
    us = 1e6
    print_table(
        f"persistence: per call, median ({len(seq_s)} blocks of 1000 save_seq, {len(save_s)} save, {EMIT_RUNS} runs of "
        f"{events} progress events)",
        ("what", "us"),
        [Row("Store.save_seq: pwrite of the sequence number (every event)", (f"{median(seq_s) * us:.1f}",)),
         Row("Store.save: state.json, fsync + rename + dir fsync (state changes)", (f"{median(save_s) * us:.0f}",)),
         Row("engine, one progress event, sequence saved (ours)", (f"{median(with_seq) * us:.1f}",)),
         Row("engine, one progress event, sequence save disabled (baseline)", (f"{median(without_seq) * us:.1f}",)),
         Row("bridge, encoding one item (CloudEvent JSON), not in the raw baseline",
             (f"{median(d['encode']) * us:.1f}",))],
    )
    print(ratio_line("engine cost per event, with/without the sequence save", baseline=median(without_seq),
                     ours=median(with_seq), higher_is_better=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=5000, help="progress events per install")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    args = parser.parse_args(argv)
    if args.events < 1 or args.runs < 1:
        parser.error("--events and --runs must be at least 1")
    configure_logging("warning")  # the engine logs each state change at info: not part of what is measured
    print(f"bench_events on {machine_note()}")
    asyncio.run(run(args.events, args.runs, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
