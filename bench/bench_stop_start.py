"""bench_stop_start: stop -> start through the real service, against a fresh install of the same node (issue 10).

Per run, a new node on the simulated node (binaries image at pad scale 1.0 by default, with /pad among the binaries
copied: 150 MB, the size of the real ones), driven through `lifecycle serve` over Mosquitto:
- baseline: `install` from `idle` -> `running` (request published -> `running` announced), and within it the kubelet
  and readiness steps (the `duration_s` of the state changes that leave them): the part of an install a start repeats;
- ours: `stop` -> the stop's last event (`stopped: no process of the node runs`), then `start` -> `running`.
Checked before the figures count: after the stop no kubelet of the node runs; the start announces exactly
kubelet, readiness, addons, running and says nothing from preflight, certs, images, binaries, network or kubeadm.
Prints the medians and how many times faster the start is than the install and than the install's kubelet +
readiness (the issue's goal: over 1), run by run too, and the like-for-like ratios the e2e test relies on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from benchlib import Row, machine_note, median, print_table, ratio_line
from benchnode import BenchNode, ensure_images

from lifecycle.protocol import STOPPED_MESSAGE

INSTALL_TIMEOUT_S = 300.0
STOP_START_TIMEOUT_S = 120.0
START_CHAIN = ["kubelet", "readiness", "addons", "running"]
SKIPPED_BY_START = {"preflight", "certs", "images", "binaries", "network", "kubeadm"}


class Events:
    """The node's event stream (paho in a thread), every event kept in order with the time it was seen.
    As bench_boot.py's (branch s14/boot), plus progress events: the stop ends with one."""

    def __init__(self, node: str, host: str, port: int) -> None:
        self.events: list[dict[str, Any]] = []  # {"type", "data", "seen_s"}
        self._cond = threading.Condition()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-stop-{uuid.uuid4().hex[:8]}")
        self._client.on_message = self._on_message
        subscribed = threading.Event()
        self._client.on_subscribe = lambda *_: subscribed.set()
        self._client.connect(host, port)
        self._client.subscribe(f"lifecycle/{node}/events", qos=1)
        self._client.loop_start()
        if not subscribed.wait(10):
            raise SystemExit("bench_stop_start: no SUBACK from the broker")

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        body = json.loads(message.payload)
        with self._cond:
            self.events.append({"type": body.get("type"), "data": body.get("data") or {}, "seen_s": time.monotonic()})
            self._cond.notify_all()

    def of(self, request_id: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e["data"].get("request_id") == request_id]

    def changes(self, request_id: str) -> list[dict[str, Any]]:
        return [e for e in self.of(request_id) if e["type"] == "lifecycle.state.changed"]

    def wait(self, request_id: str, *, state: str | None = None, message: str | None = None,
             timeout_s: float) -> dict[str, Any]:
        """The first event of the request that enters `state` (or says `message`); a `failed` ends the bench."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for event in self.events:
                    data = event["data"]
                    if data.get("request_id") != request_id:
                        continue
                    if event["type"] == "lifecycle.state.changed" and data.get("to") == "failed":
                        raise SystemExit(f"bench_stop_start: {request_id} failed: {data}")
                    entered = event["type"] == "lifecycle.state.changed" and data.get("to") == state
                    if (state is not None and entered) or (message is not None and data.get("message") == message):
                        return event
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    raise SystemExit(f"bench_stop_start: {request_id}: no {state or message!r} within {timeout_s:g} s")

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


class Node(BenchNode):
    def __init__(self, base: Path, namespace: str) -> None:
        super().__init__(base, namespace, label="bench-stop")

    def kubelets(self) -> list[int]:
        """Live kubelets of the node (its own binary at argv[0], or argv[1] when run by its shebang's python)."""
        return [pid for pid, argv in self.processes() if str(self.root / "usr/bin/kubelet") in argv[:2]]


def _took_s(changes: list[dict[str, Any]], *states: str) -> float:
    """Time the request spent in `states`: each change's duration_s is that of the state it leaves."""
    return sum(c["data"]["duration_s"] for c in changes if c["data"]["from"] in states)


def _trace(events: Events, request_id: str, sent_s: float) -> None:
    """Every event of the request, with its time after the request was sent (--trace: where a start's time goes)."""
    for event in events.of(request_id):
        data = event["data"]
        what = f"-> {data.get('to')}" if event["type"] == "lifecycle.state.changed" else data.get("message", "")
        print(f"  {event['seen_s'] - sent_s:6.2f} s  {data.get('state') or data.get('from') or '':<10} {what}")


def one_run(base: Path, namespace: str, host: str, port: int, *, trace: bool = False) -> dict[str, float]:
    node = Node(base, namespace)
    events = Events(node.name, host, port)
    try:
        node.start_service()
        time.sleep(2)  # online before the request (the service takes requests once subscribed)
        sent_s = node.request(host, port, "install-1", "install")
        install_s = events.wait("install-1", state="running", timeout_s=INSTALL_TIMEOUT_S)["seen_s"] - sent_s
        sent_s = node.request(host, port, "stop-1", "stop")
        stop_s = events.wait("stop-1", message=STOPPED_MESSAGE, timeout_s=STOP_START_TIMEOUT_S)["seen_s"] - sent_s
        if node.kubelets():
            raise SystemExit(f"bench_stop_start: a kubelet runs after the stop: {node.kubelets()}")
        sent_s = node.request(host, port, "start-1", "start")
        start_s = events.wait("start-1", state="running", timeout_s=STOP_START_TIMEOUT_S)["seen_s"] - sent_s
        if trace:
            print(f"{node.name}: the start's events")
            _trace(events, "start-1", sent_s)
        started = [c["data"]["to"] for c in events.changes("start-1")]
        touched = {e["data"].get("state") for e in events.of("start-1")} & SKIPPED_BY_START
        if started != START_CHAIN or touched:
            raise SystemExit(f"bench_stop_start: the start went through {started}, events of {touched}")
        return {"install_s": install_s,
                "kubelet_readiness_s": _took_s(events.changes("install-1"), "kubelet", "readiness"),
                "kubelet_readiness_addons_s": _took_s(events.changes("install-1"), "kubelet", "readiness", "addons"),
                "stop_s": stop_s, "start_s": start_s,
                "start_kubelet_readiness_s": _took_s(events.changes("start-1"), "kubelet", "readiness")}
    finally:
        node.kill_all()
        events.close()
        for leaf in ("status", "availability", "exposures"):
            subprocess.run(["mosquitto_pub", "-h", host, "-p", str(port), "-t", f"lifecycle/{node.name}/{leaf}",
                            "-r", "-n"], check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="fresh installs, each stopped and started once")
    parser.add_argument("--pad-scale", type=float, default=1.0, help="size of the simulated binaries (1.0: 150 MB)")
    parser.add_argument("--namespace", default="bench",
                        help="registry namespace of the simulated images (this checkout's simnode is built there)")
    parser.add_argument("--trace", action="store_true", help="print each start's events with their times")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    args = parser.parse_args(argv)
    print(f"bench_stop_start: {machine_note()}")
    ensure_images(args.namespace, args.pad_scale, who="bench_stop_start")
    runs: list[dict[str, float]] = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="bench-stop-start-") as base:
            runs.append(one_run(Path(base), args.namespace, args.host, args.port, trace=args.trace))

    def cells(key: str) -> tuple[str, ...]:
        values = [r[key] for r in runs]
        return f"{median(values):.2f}", f"{min(values):.2f}", f"{max(values):.2f}"

    print_table(f"stop and start against a fresh install, seconds, {args.runs} runs, pad scale {args.pad_scale:g}",
                ["", "median", "min", "max"],
                [Row("baseline: install, idle -> running", cells("install_s")),
                 Row("baseline: the install's kubelet + readiness", cells("kubelet_readiness_s")),
                 Row("ours: stop -> no process of the node runs", cells("stop_s")),
                 Row("ours: start -> running", cells("start_s")),
                 Row("ours: the start's kubelet + readiness", cells("start_kubelet_readiness_s")),
                 Row("the install's kubelet + readiness + addons", cells("kubelet_readiness_addons_s"))])
    start = median([r["start_s"] for r in runs])
    # ratio_line divides the baseline by ours: how many times faster the start is.
    print(ratio_line("fresh install / start", baseline=median([r["install_s"] for r in runs]), ours=start))
    print(ratio_line("the install's kubelet + readiness / start (goal: over 1)",
                     baseline=median([r["kubelet_readiness_s"] for r in runs]), ours=start))
    per_run = [r["kubelet_readiness_s"] / r["start_s"] for r in runs]  # each start against its own install
    print(f"the install's kubelet + readiness / start, run by run: {', '.join(f'{x:.2f}x' for x in per_run)}")
    # What tests/e2e/test_stop_start_over_mqtt.py asserts, like for like (the same steps on both sides), run by run.
    for what, key, start_key in (("kubelet + readiness", "kubelet_readiness_s", "start_kubelet_readiness_s"),
                                 ("kubelet + readiness + addons", "kubelet_readiness_addons_s", "start_s")):
        like = [r[key] / r[start_key] for r in runs]
        print(f"like for like, the install's / the start's {what}: {', '.join(f'{x:.2f}x' for x in like)}")
    print(f"bench_stop_start: load at the end: {machine_note()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
