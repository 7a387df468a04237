"""bench_event_latency: from an event's creation in the service to its arrival at an external MQTT subscriber.

Part 1, a full install (what issue 11 asks for): `lifecycle serve` on the simulated node (bench/benchnode.py,
binaries at `--pad-scale`), installed over Mosquitto; every event of the install timed by a `mosquitto_sub`
process: arrival (`%U`) - the CloudEvent's `time`. Beside it, from the service's start to `running`, a probe
process publishes a timestamped message every 10 ms to the same broker and subscriber: its latency is the floor
that the broker and the subscriber set on this machine under the same load. Interleaved with the same install
by the service of `--baseline-ref` (a084ce3: before the latency work of issue 11), exported with `git archive`
and run from its own source tree by the same Python. That code stamped `time` to the millisecond only: its
latencies are taken from the middle of that millisecond (+0.5 ms), as the best estimate.

Part 2, an install-shaped run on the real Mosquitto: Engine -> Bus -> MqttBridge with the durable outbox, wired
as `lifecycle.service.serve` wires them. Each of the 9 steps reports a burst of progress events back to back
(the first `--burst` events, as the certs step did for its 27 files before it told each as written; the others
5), then waits 20 ms; every state change and event is timed by a `mosquitto_sub` process. Latency = arrival -
the event's `time_s`. Ours: the bridge with up to `MAX_INFLIGHT` QoS 1 publishes in flight (the broker's
Receive Maximum lowers it). Compared with, same process, runs interleaved: the same bridge with one publish at a
time (`max_inflight=1`), one broker round trip per event.

Run: `.venv/bin/python bench/bench_event_latency.py [--full-runs N] [--runs N] [--port P]` (`--help`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from benchlib import REPO_ROOT, Row, machine_note, print_table, ratio_line
from benchnode import BenchNode, ensure_images

from lifecycle.adapters.mqtt import MAX_INFLIGHT, MqttBridge
from lifecycle.bus import Bus
from lifecycle.config import STEP_NAMES, Config, KubernetesConfig, MqttConfig
from lifecycle.engine import Engine
from lifecycle.logging import configure_logging
from lifecycle.outbox import Outbox
from lifecycle.paths import HostPaths
from lifecycle.ports import Ports
from lifecycle.protocol import Event, EventType, Topics
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


FULL_INSTALL_TIMEOUT_S = 300.0


class Subscriber:
    """`mosquitto_sub` on the events topic, a process of its own (no GIL or loop shared with the service): it
    stamps each message on arrival (%U, time.time()'s clock); seq -> arrival time once it has stopped."""

    def __init__(self, *, host: str, port: int, topic: str, also: tuple[str, ...] = ()) -> None:
        self._argv = ["mosquitto_sub", "-h", host, "-p", str(port), "-q", "1", "-t", topic,
                      *(arg for extra in also for arg in ("-t", extra)), "-F", "%U|%p"]
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

    def wait_for(self, needle: str, *, timeout_s: float, unless: str) -> bool:
        """Until a message holding `needle` (True) or `unless` (False) has arrived."""
        deadline_s = time.monotonic() + timeout_s
        while True:
            lines = list(self._lines)
            if any(needle in line for line in lines):
                return True
            if any(unless in line for line in lines):
                return False
            if time.monotonic() > deadline_s:
                raise SystemExit(f"bench_event_latency: no {needle!r} within {timeout_s:g} s")
            time.sleep(0.05)

    def stamped_bodies(self) -> list[tuple[float, dict[str, Any]]]:
        """(arrival, JSON body) of every message but the marker."""
        found: list[tuple[float, dict[str, Any]]] = []
        for line in list(self._lines):
            stamp, _, payload = line.partition("|")
            with contextlib.suppress(ValueError):
                body = json.loads(payload)
                if isinstance(body, dict) and "specversion" in body:
                    found.append((float(stamp), body))
        return found

    def probe_latencies(self) -> list[float]:
        """Arrival - publication of every message of a `Probe` (seconds)."""
        found: list[float] = []
        for line in list(self._lines):
            stamp, _, payload = line.partition("|")
            with contextlib.suppress(ValueError):
                body = json.loads(payload)
                if isinstance(body, dict) and isinstance(body.get("probe_s"), float):
                    found.append(float(stamp) - body["probe_s"])
        return found

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


PROBE_INTERVAL_S = 0.01
PROBE_SCRIPT = """
import json, socket, sys, time
import paho.mqtt.client as mqtt
host, port, topic, interval_s = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
client.connect(host, port)
client.loop(timeout=1.0)  # the CONNACK
sock = client.socket()
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the service sets it
print("connected", flush=True)
next_s = time.monotonic()
while True:  # until killed
    client.publish(topic, json.dumps({"probe_s": time.time()}), qos=1)  # no network thread: written here, now
    next_s += interval_s
    while (left_s := next_s - time.monotonic()) > 0:
        client.loop(timeout=left_s)  # PUBACKs and keepalive until the next one is due
"""


class Probe:
    """The floor under the service's figures: a process of its own that publishes a timestamped QoS 1 message
    every `PROBE_INTERVAL_S` to the same broker, heard by the same `mosquitto_sub`, during the same install. Its
    latency (arrival - publication) is what the broker and the subscriber add on this machine under that load;
    the service's event latency also holds the service's own delay before its write."""

    def __init__(self, *, host: str, port: int, topic: str) -> None:
        self._argv = [sys.executable, "-c", PROBE_SCRIPT, host, str(port), topic, str(PROBE_INTERVAL_S)]
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Probe:
        self._proc = subprocess.Popen(self._argv, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        if self._proc.stdout.readline().strip() != "connected":
            raise SystemExit("bench_event_latency: the probe could not connect")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        self._proc.kill()
        self._proc.wait(timeout=10)


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
        with Subscriber(host=host, port=port, topic=topics.events) as subscriber:
            async with bridge:
                await asyncio.wait_for(bridge.connected.wait(), CONNECT_TIMEOUT_S)
                await engine.install(request_id="bench", version=None)
                await engine.wait_job()
                await outbox.drained()
                await bridge.close(drain_timeout_s=5.0)
            await asyncio.sleep(0.2)  # the last arrivals reach mosquitto_sub
        durable.close()
        events = [item for item in (capture.pop() for _ in range(len(capture))) if isinstance(item, Event)]
        missing = [e.seq for e in events if e.seq not in subscriber.arrivals]
        if missing:
            raise SystemExit(f"bench_event_latency: events never arrived: {missing[:10]}")
        return [subscriber.arrivals[e.seq] - e.time_s for e in events]


def _made_at_s(rfc3339: str) -> float:
    """A CloudEvent's `time` as epoch seconds; one with milliseconds only from the middle of its millisecond."""
    made = datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
    fraction = rfc3339.rstrip("Z").rpartition(".")[2]
    return made + 0.0005 if len(fraction) == 3 else made


def export_tree(ref: str, into: Path) -> Path:
    """The source tree of `ref` (lifecycle/ and states/ are what `lifecycle serve` runs), by `git archive`."""
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", ref, "lifecycle", "states"],
                             capture_output=True, check=True, timeout=60).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def full_install(namespace: str, *, host: str, port: int, code: Path | None
                 ) -> tuple[list[tuple[str, float]], list[float]]:
    """(event type, latency s) of every event of one install through `lifecycle serve` (`code`: another tree),
    and the latencies of the probe's messages during it."""
    with tempfile.TemporaryDirectory(prefix="bench-latency-node-") as base:
        node = BenchNode(Path(base), namespace, label="bench-latency", broker=f"mqtt://{host}:{port}")
        probe_topic = f"bench-probe/{node.name}"
        try:
            with Subscriber(host=host, port=port, topic=f"lifecycle/{node.name}/events",
                            also=(probe_topic,)) as subscriber, Probe(host=host, port=port, topic=probe_topic):
                node.start_service(code=code)
                time.sleep(2)  # online before the request (the service takes requests once subscribed)
                node.request(host, port, "latency-install", "install")
                if not subscriber.wait_for('"to":"running"', timeout_s=FULL_INSTALL_TIMEOUT_S,
                                           unless='"to":"failed"'):
                    tail = node.log.read_text(errors="replace").splitlines()[-15:]
                    raise SystemExit("bench_event_latency: the install failed:\n" + "\n".join(tail))
                time.sleep(0.3)  # the last progress after `running`, if any
            bodies = subscriber.stamped_bodies()
            probes = subscriber.probe_latencies()
        finally:
            node.kill_all()
            for leaf in ("status", "availability", "exposures"):
                subprocess.run(["mosquitto_pub", "-h", host, "-p", str(port), "-t", f"lifecycle/{node.name}/{leaf}",
                                "-r", "-n"], check=False)
        return [(str(body["type"]), arrival - _made_at_s(str(body["time"]))) for arrival, body in bodies], probes


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _latency_row(label: str, values: list[float]) -> Row:
    return Row(label, (str(len(values)), *(f"{quantile(values, q) * 1000:.1f}" for q in (0.5, 0.99, 1.0))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-runs", type=int, default=3, help="full installs per variant (0: part 1 skipped)")
    parser.add_argument("--baseline-ref", default="a084ce3", help="the service compared with ('': none)")
    parser.add_argument("--pad-scale", type=float, default=1.0, help="size of the simulated binaries (1.0: 150 MB)")
    parser.add_argument("--namespace", default=os.environ.get("SIM_NAMESPACE", "bench"),
                        help="registry namespace of the simulated images (this checkout's simnode is built there)")
    parser.add_argument("--runs", type=int, default=5, help="install-shaped runs per variant in part 2 (0: skip)")
    parser.add_argument("--burst", type=int, default=30)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    args = parser.parse_args(argv)
    configure_logging("error")
    print(f"bench_event_latency: {machine_note()}")

    if args.full_runs > 0:
        ensure_images(args.namespace, args.pad_scale, who="bench_event_latency")
        full: dict[str, list[tuple[str, float]]] = {"ours": []}
        floor: dict[str, list[float]] = {"ours": []}
        with tempfile.TemporaryDirectory(prefix="bench-latency-baseline-") as tree:
            baseline = export_tree(args.baseline_ref, Path(tree)) if args.baseline_ref else None
            if baseline is not None:
                full[f"baseline {args.baseline_ref}"] = []
                floor[f"baseline {args.baseline_ref}"] = []
            for _ in range(args.full_runs):  # interleaved: the machine's load falls on both alike
                for name, code in (("ours", None), (f"baseline {args.baseline_ref}", baseline)):
                    if name == "ours" or code is not None:
                        timed, probed = full_install(args.namespace, host=args.host, port=args.port, code=code)
                        full[name] += timed
                        floor[name] += probed
        rows: list[Row] = []
        for name, timed_events in full.items():
            rows.append(_latency_row(f"{name}: every event", [latency for _, latency in timed_events]))
            rows.append(_latency_row(f"{name}: state changes",
                                     [latency for kind, latency in timed_events if kind == EventType.STATE_CHANGED]))
            rows.append(_latency_row(f"{name}: floor (probe, same installs)", floor[name]))
        print(f"# Part 1: full installs through `lifecycle serve` on the simulated node ({args.full_runs} per variant,"
              f" pad scale {args.pad_scale:g}; {machine_note()})")
        print_table("latency, service -> Mosquitto -> mosquitto_sub", ["", "events", "p50 ms", "p99 ms", "max ms"],
                    rows)
        if baseline is not None:
            ours_all = [latency for _, latency in full["ours"]]
            before_all = [latency for _, latency in full[f"baseline {args.baseline_ref}"]]
            print(ratio_line("full install, p99 latency", baseline=quantile(before_all, 0.99),
                             ours=quantile(ours_all, 0.99)))
            print(ratio_line("full install, p50 latency", baseline=quantile(before_all, 0.5),
                             ours=quantile(ours_all, 0.5)))

    if args.runs > 0:
        variants = {f"bridge, {MAX_INFLIGHT} in flight (ours)": MAX_INFLIGHT, "bridge, 1 at a time": 1}
        latencies: dict[str, list[float]] = {name: [] for name in variants}

        async def measure() -> None:
            for _ in range(args.runs):  # interleaved: the machine's load falls on both alike
                for name, window in variants.items():
                    latencies[name] += await one_install(host=args.host, port=args.port, burst=args.burst,
                                                         max_inflight=window)

        asyncio.run(measure())
        print(f"# Part 2: install-shaped runs, engine -> Mosquitto -> subscriber ({args.runs} of {len(STEP_NAMES)}"
              f" steps, first burst {args.burst} events back to back; {machine_note()})")
        print_table("latency", ["variant", "events", "p50 ms", "p99 ms", "max ms"],
                    [_latency_row(name, values) for name, values in latencies.items()])
        ours, before = (latencies[name] for name in variants)
        print(ratio_line("p99 latency", baseline=quantile(before, 0.99), ours=quantile(ours, 0.99)))
        print(ratio_line("p50 latency", baseline=quantile(before, 0.5), ours=quantile(ours, 0.5)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
