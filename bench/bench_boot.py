"""bench_boot: reboot -> `running` through the real service, against the simulated node's own readiness floor.

One node on the simulated node (binaries image at pad scale 1.0 by default, with /pad among the binaries copied:
150 MB, the size of the real ones), installed once through `lifecycle serve` over Mosquitto. Then, per run, two
reboots (SIGKILL of the service and of every process under the node root), interleaved:
- floor: the node's own kubelet started by hand with the service's command line (states.kubelet.kubelet_argv),
  timed until the API server's /readyz answers 200: what the simulated node needs from kubelet start to API ready;
- ours: `lifecycle serve` started, timed until /readyz answers 200 (polled the same way) and until the service
  announces `kubelet` and `running`; split at the kubelet's exec (its kernel start time, /proc/<pid>/stat) into
  what the service spends before the kubelet runs and what the node spends after, beside the floor's own
  kubelet exec -> /readyz. `running` also waits for what the readiness and addons steps wait for (the
  components' pods and the storage addon's pod, restarted by the kubelet, Ready again), which /readyz does not.
Prints them, the differences and ratios (goal: ours within 1 s of the floor), and for reference the full check
the boot moved to the background (states.binaries: sha256 of every binary), timed on the same node.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from benchlib import machine_note, median
from benchnode import BenchNode, ensure_images

from lifecycle.hostprocs import start_ticks
from lifecycle.paths import HostPaths
from states.kubelet import kubelet_argv

INSTALL_TIMEOUT_S = 300.0
BOOT_TIMEOUT_S = 120.0
POLL_S = 0.02
TICK_S = 1 / os.sysconf("SC_CLK_TCK")  # /proc/<pid>/stat start times count these since boot


def cpu_s(pid: int) -> float:
    """CPU time `pid` has used so far (user + system, all its threads), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S


def started_s(pid: int) -> float:
    """When `pid` was exec'd (fork, in fact: ours exec at once), on the time.monotonic() scale."""
    ticks = start_ticks(pid)
    if ticks is None:
        raise SystemExit(f"bench_boot: process {pid} is gone")
    # Start times count from boot (CLOCK_BOOTTIME); the offset to CLOCK_MONOTONIC is what a suspend added.
    offset_s = time.clock_gettime(time.CLOCK_BOOTTIME) - time.monotonic()
    return ticks * TICK_S - offset_s


class Events:
    """The node's event stream (paho in a thread): every state change, kept in order."""

    def __init__(self, node: str, host: str, port: int) -> None:
        self.changes: list[dict[str, Any]] = []
        self.timeline: list[tuple[float, str, str]] = []  # (monotonic, state, what) of every event
        self._lock = threading.Condition()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-boot-{uuid.uuid4().hex[:8]}")
        self._client.on_message = self._on_message
        subscribed = threading.Event()
        self._client.on_subscribe = lambda *_: subscribed.set()
        self._client.connect(host, port)
        self._client.subscribe(f"lifecycle/{node}/events", qos=1)
        self._client.loop_start()
        if not subscribed.wait(10):
            raise SystemExit("bench_boot: no SUBACK from the broker")

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        body = json.loads(message.payload)
        data = body.get("data") or {}
        what = f"-> {data.get('to')}" if body.get("type") == "lifecycle.state.changed" else data.get("message", "")
        self.timeline.append((time.monotonic(), str(data.get("state") or data.get("to")), str(what)))
        if body.get("type") == "lifecycle.state.changed":
            with self._lock:
                self.changes.append({**body["data"], "seen_s": time.monotonic()})
                self._lock.notify_all()

    def wait_state(self, state: str, *, after_seq: int, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                for change in self.changes:
                    if change["seq"] > after_seq and change["to"] in (state, "failed"):
                        if change["to"] != state:
                            raise SystemExit(f"bench_boot: the node failed: {change}")
                        return change
                if not self._lock.wait(max(0.0, deadline - time.monotonic())):
                    raise SystemExit(f"bench_boot: no {state} within {timeout_s:g} s")

    @property
    def last_seq(self) -> int:
        with self._lock:
            return max((c["seq"] for c in self.changes), default=0)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


class Node(BenchNode):
    def __init__(self, base: Path, namespace: str, broker: str) -> None:
        super().__init__(base, namespace, label="bench-boot")
        self.broker = broker
        self.kubelet: subprocess.Popen[bytes] | None = None

    def request_install(self, host: str, port: int) -> None:
        self.request(host, port, "bench-1", "install")

    def reboot(self) -> None:
        """Every process of the node gone, as after a power cut."""
        self.kill_all(self.kubelet)
        self.kubelet = None

    def start_kubelet_by_hand(self) -> None:
        with open(self.root.parent / "kubelet-by-hand.log", "ab") as log:
            self.kubelet = subprocess.Popen(kubelet_argv(HostPaths(self.root)), stdout=log, stderr=subprocess.STDOUT)

    def kubelet_pid(self) -> int:
        """The node's kubelet (its command line ends with ours: the static pods run the same program)."""
        argv = kubelet_argv(HostPaths(self.root))
        found = [pid for pid, cmd in self.processes() if [a for a in cmd if a][-len(argv):] == argv]
        if len(found) != 1:
            raise SystemExit(f"bench_boot: {len(found)} kubelets running, expected one")
        return found[0]

    def readyz_url(self) -> str:
        for line in (self.root / "etc/kubernetes/admin.conf").read_text().splitlines():
            if line.strip().startswith("server:"):
                return line.split(":", 1)[1].strip() + "/readyz"
        raise SystemExit("bench_boot: no server in admin.conf")

    def wait_readyz(self, timeout_s: float) -> float:
        """monotonic time at which /readyz first answered 200 (anonymous: a public path, as upstream)."""
        url = self.readyz_url()
        context = ssl.create_default_context(cafile=str(self.root / "etc/kubernetes/pki/ca.crt"))
        context.check_hostname = False
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(urllib.error.URLError, OSError), \
                    urllib.request.urlopen(url, timeout=1, context=context) as resp:
                if resp.status == 200:
                    return time.monotonic()
            time.sleep(POLL_S)
        raise SystemExit(f"bench_boot: {url} not ready within {timeout_s:g} s")


def full_binaries_check_s(node: Node) -> float:
    """What the boot no longer waits for: the binaries step's full `is_done` (sha256 of each file)."""
    from states.binaries import RECORD_NAME, _hash_files, _read_record

    paths = HostPaths(node.root)
    record = _read_record(paths.state_dir / RECORD_NAME)
    assert record is not None
    start_s = time.perf_counter()
    asyncio.run(asyncio.to_thread(_hash_files, paths, list(record["files"])))
    return time.perf_counter() - start_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="reboots measured per variant")
    parser.add_argument("--pad-scale", type=float, default=1.0, help="size of the simulated binaries (1.0: 150 MB)")
    parser.add_argument("--namespace", default=os.environ.get("SIM_NAMESPACE", "bench"),
                        help="registry namespace of the simulated images (this checkout's simnode is built there)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--timeline", action="store_true", help="print the last boot's events, timed")
    parser.add_argument("--workdir", type=Path, help="keep the node (root, service log) here instead of a temp dir")
    args = parser.parse_args(argv)
    print(f"bench_boot: {machine_note()}")
    ensure_images(args.namespace, args.pad_scale, who="bench_boot")
    floors_s: list[float] = []
    floor_exec_s: list[float] = []  # kubelet by hand: its exec -> /readyz 200
    to_exec_s: list[float] = []  # ours: service exec -> kubelet exec
    exec_readyz_s: list[float] = []  # ours: kubelet exec -> /readyz 200
    service_cpu_s: list[float] = []  # ours: CPU the service used from its start to /readyz 200
    ours_readyz_s: list[float] = []
    ours_s: list[float] = []
    to_kubelet_s: list[float] = []
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-boot-")))
        else:
            base = args.workdir
            base.mkdir(parents=True)
        node = Node(base, args.namespace, f"mqtt://{args.host}:{args.port}")
        events = Events(node.name, args.host, args.port)
        try:
            node.start_service()
            time.sleep(2)  # online before the request (the service takes requests once subscribed)
            node.request_install(args.host, args.port)
            events.wait_state("running", after_seq=0, timeout_s=INSTALL_TIMEOUT_S)
            for _ in range(args.runs):
                node.reboot()
                start_s = time.monotonic()
                node.start_kubelet_by_hand()
                ready_s = node.wait_readyz(BOOT_TIMEOUT_S)
                floors_s.append(ready_s - start_s)
                floor_exec_s.append(ready_s - started_s(node.kubelet_pid()))
                node.reboot()
                seq = events.last_seq
                start_s = time.monotonic()
                node.start_service()
                ready_s = node.wait_readyz(BOOT_TIMEOUT_S)
                ours_readyz_s.append(ready_s - start_s)
                assert node.service is not None
                service_cpu_s.append(cpu_s(node.service.pid))
                service_exec_s, kubelet_exec_s = started_s(node.service.pid), started_s(node.kubelet_pid())
                to_exec_s.append(kubelet_exec_s - service_exec_s)
                exec_readyz_s.append(ready_s - kubelet_exec_s)
                # `running` after this boot's `kubelet`: the last life's `running`, re-published by the outbox when
                # the kill came before the broker's PUBACK, may arrive first with a number not seen yet.
                kubelet = events.wait_state("kubelet", after_seq=seq, timeout_s=BOOT_TIMEOUT_S)
                running = events.wait_state("running", after_seq=kubelet["seq"], timeout_s=BOOT_TIMEOUT_S)
                ours_s.append(running["seen_s"] - start_s)
                timeline = [(t - start_s, state, what) for t, state, what in events.timeline if t >= start_s]
                to_kubelet_s.append(kubelet["seen_s"] - start_s)
            hash_s = full_binaries_check_s(node)
        finally:
            node.reboot()
            events.close()
            for leaf in ("status", "availability", "exposures"):
                subprocess.run(["mosquitto_pub", "-h", args.host, "-p", str(args.port), "-t",
                                f"lifecycle/{node.name}/{leaf}", "-r", "-n"], check=False)
    floor, ours_readyz, ours = median(floors_s), median(ours_readyz_s), median(ours_s)
    if args.timeline:
        print("the last boot, seconds after the service was started:")
        for at_s, state, what in timeline:
            print(f"  {at_s:6.2f}  {state:10} {what[:100]}")
    print(f"runs: {args.runs} reboots per variant, binaries image at pad scale {args.pad_scale:g}")
    print(f"{'':56}{'median':>10}{'min':>10}{'max':>10}")
    rows = [("floor: kubelet by hand -> /readyz 200", floors_s),
            ("floor:   kubelet exec -> /readyz 200", floor_exec_s),
            ("ours: service start -> kubelet state", to_kubelet_s),
            ("ours: service exec -> kubelet exec", to_exec_s),
            ("ours: kubelet exec -> /readyz 200", exec_readyz_s),
            ("ours: service CPU time, start -> /readyz 200", service_cpu_s),
            ("ours: service start -> /readyz 200", ours_readyz_s),
            ("ours: service start -> running", ours_s)]
    for label, values in rows:
        if values:
            print(f"{label:56}{median(values):>9.2f}s{min(values):>9.2f}s{max(values):>9.2f}s")
    print(f"full binaries check moved to the background: {hash_s:.2f} s (sha256 of every binary, in the same process)")
    print(f"to /readyz: ours - floor {ours_readyz - floor:+.2f} s (goal: under 1 s), ours / floor "
          f"{ours_readyz / floor:.2f}x")
    print(f"of which: the service before the kubelet's exec {median(to_exec_s):.2f} s, the node after it "
          f"{median(exec_readyz_s) - median(floor_exec_s):+.2f} s against the floor's kubelet exec -> /readyz")
    print(f"to running: ours - floor {ours - floor:+.2f} s, ours / floor {ours / floor:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
