"""bench_exposures: time from `kubectl create service loadbalancer` to the retained exposures message listing it.

Ours: the service's exposure watch (lifecycle.exposewatch, with the real Engine, Bus and MqttBridge as `serve()`
wires them, the real KubernetesApiFactory) following the simulated kube-apiserver (`python -m simnode
kube-apiserver`, a PKI and admin.conf made by lifecycle.pki) and publishing to the real Mosquitto
(127.0.0.1:1883, a `bench-<random>` prefix); an aiomqtt subscriber notes when the message naming the Service
arrives. Baseline, in the same runs: a bare watch on the same API server (the same adapter, no service) noting
when the ADDED event arrives: the API server's own notification time, which ours cannot beat. Both clocks start
when kubectl is started. Run: `.venv/bin/python bench/bench_exposures.py [--runs N]`. Clears its retained topic;
writes only to a temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aiomqtt
from benchlib import REPO_ROOT, Row, machine_note, median, print_table, ratio_line

from lifecycle.adapters.kube import KubernetesApiFactory
from lifecycle.adapters.mqtt import MqttBridge
from lifecycle.bus import Bus
from lifecycle.config import Config, KubernetesConfig, MqttConfig
from lifecycle.engine import Engine
from lifecycle.exposewatch import ExposureWatch
from lifecycle.logging import configure_logging
from lifecycle.machine import INSTALL_STATES
from lifecycle.paths import HostPaths
from lifecycle.pki import plan_pki, write_files
from lifecycle.pki_specs import PkiParams
from lifecycle.ports import Ports
from lifecycle.protocol import Topics
from lifecycle.service import RequestHandler, state_file
from lifecycle.step import StepContext


class NoopStep:
    """A step that is done at once: the bench needs the engine in `running`, not a cluster."""

    timeout_s = 5.0
    retries = 0

    def __init__(self, name: str) -> None:
        self.name = name

    async def is_done(self, ctx: StepContext) -> bool:
        return True

    async def run(self, ctx: StepContext) -> None:
        return None

    async def before_retry(self, ctx: StepContext) -> None:
        return None


async def no_reset(ctx: StepContext) -> None:
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_apiserver(root: Path) -> tuple[subprocess.Popen[bytes], Path]:
    port = free_port()
    params = PkiParams(node_name="bench", node_ip="127.0.0.1", endpoint_name="localhost", api_port=port)
    files, _ = plan_pki({}, params, now=datetime.now(UTC))
    kube_dir = root / "etc" / "kubernetes"
    write_files(files, pki_dir=kube_dir / "pki", kubeconfig_dir=kube_dir)
    log = open(root / "apiserver.log", "wb")  # noqa: SIM115 - handed to the child, closed with the run
    proc = subprocess.Popen(
        [sys.executable, "-m", "simnode", "kube-apiserver", "--advertise-address=127.0.0.1",
         f"--secure-port={port}", "--bind-address=127.0.0.1", "--tls-cert-file=/etc/kubernetes/pki/apiserver.crt",
         "--tls-private-key-file=/etc/kubernetes/pki/apiserver.key", "--client-ca-file=/etc/kubernetes/pki/ca.crt",
         "--service-cluster-ip-range=10.96.0.0/12"],
        env={**os.environ, "SIMNODE_ROOT": str(root), "PYTHONPATH": str(REPO_ROOT)}, stdout=log,
        stderr=subprocess.STDOUT, cwd=REPO_ROOT,
    )
    log.close()
    kubeconfig = kube_dir / "admin.conf"
    deadline = time.monotonic() + 30
    while subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", "get", "--raw", "/readyz"],
                         capture_output=True, check=False).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"bench_exposures: the simulated API server did not start:\n"
                             f"{(root / 'apiserver.log').read_text()[-2000:]}")
        time.sleep(0.2)
    return proc, kubeconfig


async def measure(runs: int, *, root: Path, kubeconfig: Path, prefix: str) -> list[tuple[float, float]]:
    """(seconds to the bare watch's ADDED, seconds to the retained message) per Service, from kubectl's start."""
    k8s = KubernetesConfig(api_port=0, kubelet_healthz_port=0, etcd_metrics_port=0, node_ip="127.0.0.1")
    config = Config(node_name="bench", root=root, kubernetes=k8s,
                    mqtt=MqttConfig(prefix=prefix, client_id=f"lifecycle-{prefix}", session_expiry_s=5))
    factory = KubernetesApiFactory()
    unused = cast(Any, None)
    ports = Ports(docker=unused, commands=unused, kubelet=unused, kube=factory, services=factory)
    bus = Bus()
    paths = HostPaths(root)
    engine = Engine(config=config, paths=paths, ports=ports, plan=[NoopStep(s.value) for s in INSTALL_STATES],
                    reset=no_reset, store=state_file(paths), bus=bus)
    topics = Topics(prefix, config.node_name)
    bridge = MqttBridge(config=config.mqtt, topics=topics, outbox=bus.subscribe("mqtt"), status=engine.status,
                        handle=RequestHandler(engine).handle, client_id=f"lifecycle-{prefix}")
    watch = ExposureWatch(engine=engine, bus=bus, services=factory, kubeconfig=kubeconfig, host="localhost")
    seen_watch: dict[str, float] = {}
    seen_mqtt: dict[str, float] = {}
    changed = asyncio.Event()

    async def bare_watch(listed: asyncio.Event) -> None:
        async with factory.connect_services(kubeconfig) as api:
            _, version = await api.list_services()
            listed.set()
            async with contextlib.aclosing(api.watch_services(resource_version=version, timeout_s=600)) as events:
                async for event in events:
                    name = event["object"]["metadata"].get("name", "")
                    if event["type"] == "ADDED" and name not in seen_watch:
                        seen_watch[name] = time.perf_counter()
                        changed.set()

    async def subscriber(ready: asyncio.Event) -> None:
        async with aiomqtt.Client("127.0.0.1", 1883, identifier=f"{prefix}-sub") as client:
            await client.subscribe(topics.exposures, qos=1)
            ready.set()
            async for message in client.messages:
                body = json.loads(bytes(cast(bytes, message.payload)) or b'{"exposures": []}')
                for entry in body["exposures"]:
                    seen_mqtt.setdefault(entry["service"], time.perf_counter())
                changed.set()

    results: list[tuple[float, float]] = []
    async with bridge:
        await asyncio.wait_for(bridge.connected.wait(), 10)
        ready, listed = asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(watch.run(), name="bench-exposure-watch"),
                 asyncio.create_task(bare_watch(listed), name="bench-bare-watch"),
                 asyncio.create_task(subscriber(ready), name="bench-subscriber")]
        try:
            await asyncio.wait_for(asyncio.gather(ready.wait(), listed.wait()), 30)
            await engine.install(request_id="bench", version=None)
            await engine.wait_job()
            # Ours is up once its first (empty) message arrived: wait for it through the subscriber.
            await asyncio.wait_for(changed.wait(), 30)
            for i in range(runs + 1):  # the first is a warm-up
                name = f"bench-{i}"
                start_s = time.perf_counter()
                kubectl = await asyncio.create_subprocess_exec(
                    "kubectl", f"--kubeconfig={kubeconfig}", "create", "service", "loadbalancer", name,
                    f"--tcp={20000 + i}:80", stdout=asyncio.subprocess.DEVNULL)
                await kubectl.wait()
                try:
                    async with asyncio.timeout(10):
                        while name not in seen_watch or name not in seen_mqtt:
                            changed.clear()
                            await changed.wait()
                except TimeoutError:
                    raise SystemExit(f"bench_exposures: {name} not seen within 10 s (bare watch: "
                                     f"{name in seen_watch}, retained message: {name in seen_mqtt}); "
                                     f"{[t for t in tasks if t.done()]}") from None
                if i:
                    results.append((seen_watch[name] - start_s, seen_mqtt[name] - start_s))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await engine.shutdown()
            await bridge.close(drain_timeout_s=2.0)
    async with aiomqtt.Client("127.0.0.1", 1883, identifier=f"{prefix}-clear") as client:
        await client.publish(topics.exposures, b"", qos=1, retain=True)
        await client.publish(topics.status, b"", qos=1, retain=True)
        await client.publish(topics.availability, b"", qos=1, retain=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    configure_logging("warning")  # the engine logs each state change at info: not part of what is measured
    print(machine_note())
    with tempfile.TemporaryDirectory(prefix="bench-exposures-") as tmp:
        root = Path(tmp)
        proc, kubeconfig = start_apiserver(root)
        try:
            results = asyncio.run(measure(args.runs, root=root, kubeconfig=kubeconfig,
                                          prefix=f"bench-{uuid.uuid4().hex[:8]}"))
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    watch_ms = [w * 1000 for w, _ in results]
    mqtt_ms = [m * 1000 for _, m in results]
    rows = [Row(label, (f"{median(ms):.0f}", f"{min(ms):.0f}", f"{max(ms):.0f}"))
            for label, ms in (("bare watch: ADDED event (baseline)", watch_ms),
                              ("retained exposures message (ours)", mqtt_ms))]
    print_table(f"kubectl create service loadbalancer -> seen, ms ({len(results)} Services)",
                ["seen by", "median", "min", "max"], rows)
    print(ratio_line("time to the retained exposure vs the API server's own watch event",
                     baseline=median(watch_ms), ours=median(mqtt_ms)))
    over_ms = [(m - w) * 1000 for w, m in results]
    print("the service's own part (the watch event to the message at a subscriber, through the broker): "
          f"median {median(over_ms):.1f} ms, "
          f"max {max(over_ms):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
