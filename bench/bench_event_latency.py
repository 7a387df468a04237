"""bench_event_latency: from an event's creation in the engine to its arrival at an external MQTT subscriber.

An install-shaped run on the real Mosquitto (127.0.0.1:1883): Engine -> Bus -> MqttBridge with the durable outbox
(fsync in a thread before a state change goes out), wired as `lifecycle.service.serve` wires them. Each of the 9
steps reports a burst of progress events back to back (the first `--burst` events, as the certs step does for
its 27 files; the others 5), then waits 20 ms; every state change and event is timed. The subscriber is a
`mosquitto_sub` process (its own CPU time, no GIL shared with the service), stamping each arrival (`-F %U`).
Latency = that arrival time - the event's `time_s` (time.time() when the engine made it).

Ours: the bridge with up to `MAX_INFLIGHT` QoS 1 publishes in flight. Baseline, same process, runs interleaved:
the same bridge with one publish at a time (`max_inflight=1`), i.e. one broker round trip per event, as before.
Run: `.venv/bin/python bench/bench_event_latency.py [--runs N] [--burst N] [--host H] [--port P]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, cast

from benchlib import Row, machine_note, print_table, ratio_line

from lifecycle.adapters.mqtt import MAX_INFLIGHT, MqttBridge
from lifecycle.bus import Bus
from lifecycle.config import STEP_NAMES, Config, KubernetesConfig, MqttConfig
from lifecycle.engine import Engine
from lifecycle.logging import configure_logging
from lifecycle.outbox import Outbox
from lifecycle.paths import HostPaths
from lifecycle.ports import Ports
from lifecycle.protocol import Event, Topics
from lifecycle.service import RequestHandler, state_file
from lifecycle.step import StepContext

CONNECT_TIMEOUT_S = 10.0
OTHER_BURST = 5
PAUSE_S = 0.02


class BurstStep:
    """Reports `events` progress events back to back, then waits a little, as a real step between bursts."""

    timeout_s = 60.0
    retries = 0

    def __init__(self, name: str, events: int) -> None:
        self.name = name
        self.events = events
        self.ran = False

    async def is_done(self, ctx: StepContext) -> bool:
        return self.ran  # checked again after `run` (the engine's outcome check)

    async def run(self, ctx: StepContext) -> None:
        for i in range(self.events):
            ctx.progress(f"{self.name} item {i}", current=i + 1, total=self.events)
        await asyncio.sleep(PAUSE_S)
        self.ran = True

    async def before_retry(self, ctx: StepContext) -> None:
        return None


async def no_reset(ctx: StepContext) -> None:
    return None


class Subscriber:
    """`mosquitto_sub` on the events topic, a process of its own (no GIL or loop shared with the service): it
    stamps each message on arrival (%U, time.time()'s clock); seq -> arrival time once it has stopped."""

    def __init__(self, *, host: str, port: int, topic: str) -> None:
        self._argv = ["mosquitto_sub", "-h", host, "-p", str(port), "-q", "1", "-t", topic, "-F", "%U|%p"]
        self._host, self._port, self._topic = host, port, topic
        self._lines: list[str] = []
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self.arrivals: dict[int, float] = {}

    def __enter__(self) -> Subscriber:
        self._proc = subprocess.Popen(self._argv, stdout=subprocess.PIPE, text=True)
        stdout = self._proc.stdout
        assert stdout is not None
        self._reader = threading.Thread(target=lambda: self._lines.extend(stdout), daemon=True)
        self._reader.start()
        deadline_s = time.monotonic() + CONNECT_TIMEOUT_S
        while not any("ready" in line for line in self._lines):  # subscribed: it hears a marker
            if time.monotonic() > deadline_s:
                raise SystemExit(f"bench_event_latency: no broker at {self._host}:{self._port}")
            subprocess.run(["mosquitto_pub", "-h", self._host, "-p", str(self._port), "-t", self._topic,
                            "-m", '{"ready": true}'], check=True)
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None and self._reader is not None
        self._proc.terminate()
        self._proc.wait(timeout=10)
        self._reader.join(timeout=10)
        for line in self._lines:
            stamp, _, payload = line.partition("|")
            seq = json.loads(payload).get("data", {}).get("seq")
            if isinstance(seq, int):
                self.arrivals.setdefault(seq, float(stamp))


async def one_install(*, host: str, port: int, burst: int, max_inflight: int) -> list[float]:
    """Latencies (s) of every event of one install-shaped run."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        mqtt = MqttConfig(broker=f"mqtt://{host}:{port}", prefix=prefix, client_id=f"lifecycle-{prefix}",
                          session_expiry_s=5)
        config = Config(node_name="bench", root=Path(tmp), mqtt=mqtt,
                        kubernetes=KubernetesConfig(api_port=0, kubelet_healthz_port=0, etcd_metrics_port=0))
        topics = Topics(prefix, config.node_name)
        paths = HostPaths(config.root)
        bus = Bus()
        outbox = bus.subscribe("mqtt")
        capture = bus.subscribe("capture")
        durable = Outbox(paths.state_dir)
        durable.open()
        plan = [BurstStep(name, burst if index == 0 else OTHER_BURST) for index, name in enumerate(STEP_NAMES)]
        unused = cast(Any, None)
        engine = Engine(config=config, paths=paths, ports=Ports(docker=unused, commands=unused, kubelet=unused,
                        kube=unused), plan=plan, reset=no_reset, store=state_file(paths), bus=bus, outbox=durable)
        bridge = MqttBridge(config=config.mqtt, topics=topics, outbox=outbox, status=engine.status,
                            handle=RequestHandler(engine).handle, client_id=f"lifecycle-{prefix}", durable=durable,
                            max_inflight=max_inflight)
        syncer = asyncio.create_task(durable.run())
        with Subscriber(host=host, port=port, topic=topics.events) as subscriber:
            async with bridge:
                await asyncio.wait_for(bridge.connected.wait(), CONNECT_TIMEOUT_S)
                await engine.install(request_id="bench", version=None)
                await engine.wait_job()
                await outbox.drained()
                await bridge.close(drain_timeout_s=5.0)
            await asyncio.sleep(0.2)  # the last arrivals reach mosquitto_sub
        syncer.cancel()
        durable.close()
        events = [item for item in (capture.pop() for _ in range(len(capture))) if isinstance(item, Event)]
        missing = [e.seq for e in events if e.seq not in subscriber.arrivals]
        if missing:
            raise SystemExit(f"bench_event_latency: events never arrived: {missing[:10]}")
        return [subscriber.arrivals[e.seq] - e.time_s for e in events]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--burst", type=int, default=30)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    args = parser.parse_args(argv)
    configure_logging("error")
    variants = {f"bridge, {MAX_INFLIGHT} in flight (ours)": MAX_INFLIGHT, "bridge, 1 at a time (before)": 1}
    latencies: dict[str, list[float]] = {name: [] for name in variants}

    async def measure() -> None:
        for _ in range(args.runs):  # interleaved: the machine's load falls on both alike
            for name, window in variants.items():
                latencies[name] += await one_install(host=args.host, port=args.port, burst=args.burst,
                                                     max_inflight=window)

    asyncio.run(measure())
    rows: list[Row] = []
    for name, values in latencies.items():
        rows.append(Row(name, (str(len(values)), *(f"{quantile(values, q) * 1000:.1f}" for q in (0.5, 0.99, 1.0)))))
    print(f"# Event latency, engine -> Mosquitto -> subscriber ({args.runs} installs of {len(STEP_NAMES)} steps,"
          f" first burst {args.burst}, {machine_note()})")
    print_table("latency", ["variant", "events", "p50 ms", "p99 ms", "max ms"], rows)
    ours, before = (latencies[name] for name in variants)
    print(ratio_line("p99 latency", baseline=quantile(before, 0.99), ours=quantile(ours, 0.99)))
    print(ratio_line("p50 latency", baseline=quantile(before, 0.5), ours=quantile(ours, 0.5)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
