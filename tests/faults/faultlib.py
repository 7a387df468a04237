"""Helpers of the fault suite: the e2e helpers (a real `lifecycle serve` on the simulated node, driven over MQTT)
and what the fault tests count from outside (/proc, the Docker Engine)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from test_install_over_mqtt import (
    INSTALL_CHAIN,
    Node,
    Subscriber,
    _kill_processes_under,
    _wait_state,
    make_node,
    payload,
)

__all__ = [
    "INSTALL_CHAIN",
    "Driver",
    "Node",
    "Subscriber",
    "_kill_processes_under",
    "_wait_state",
    "components_under",
    "engine_leftovers",
    "kubelets_under",
    "make_node",
    "payload",
    "processes_under",
    "state_seqs",
    "wait_until",
]


def _live(entry: Path) -> bool:
    """Not a zombie: a SIGKILLed process keeps its /proc entry until it is reaped."""
    with contextlib.suppress(OSError):
        return (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def kubelets_under(root: Path) -> list[int]:
    """Pids of the kubelets started from the node's own binary (not the static pods the simulated kubelet runs
    from the same zipapp, simnode/launch.py: their parent is a kubelet); as tests/e2e/test_engine_faults_over_mqtt.py.
    """
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _live(entry):
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if str(root / "usr/bin/kubelet").encode() in argv[:2]:  # [0] or, run by its shebang's python, [1]
                    parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return [pid for pid, parent in parents.items() if parent not in parents]


def components_under(root: Path) -> dict[str, list[int]]:
    """Live static pod processes of the node, by container name (simnode/kubelet/runtime.py marks each one with
    SIMNODE_POD=<ns>/<pod>/<container> and runs it with SIMNODE_ROOT=<root>)."""
    found: dict[str, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not _live(entry):
            continue
        with contextlib.suppress(OSError):
            env = dict(v.split(b"=", 1) for v in (entry / "environ").read_bytes().split(b"\0") if b"=" in v)
            mark = env.get(b"SIMNODE_POD")
            if mark and env.get(b"SIMNODE_ROOT") == str(root).encode():
                found.setdefault(mark.decode().rsplit("/", 1)[-1], []).append(int(entry.name))
    return found


def processes_under(root: Path) -> list[str]:
    """Live processes whose command line or working directory lies under the node root."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not _live(entry):
            continue
        with contextlib.suppress(OSError):
            cwd = str((entry / "cwd").readlink())
            args = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
            if cwd == str(root) or cwd.startswith(f"{root}/") or any(f"{root}/" in a for a in args):
                found.append(f"{entry.name}: {' '.join(args)}")
    return found


def engine_leftovers(node_name: str) -> list[str]:
    """Containers of any state the service left in the Docker Engine for this node."""
    out = subprocess.run(["docker", "ps", "-a", "--filter", f"label=lifecycle.node={node_name}", "-q"],
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def state_seqs(sub: Subscriber) -> list[int]:
    """The `state_seq` of every state change the subscriber saw, in arrival order, repeats dropped (the outbox may
    re-publish the last change after a restart: the same event again)."""
    seqs = [payload(m)["data"]["state_seq"] for m in sub.messages
            if payload(m).get("type") == "lifecycle.state.changed"]
    return list(dict.fromkeys(seqs))


def wait_until(predicate: Callable[[], Any], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s} s")
        time.sleep(0.1)


# ---- conflicting requests (issue 8, part "conflicts"): one MQTT 5 client that answers state changes at once ----

import json  # noqa: E402 (this part's block, kept together)
import threading  # noqa: E402

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

Request = dict[str, Any]


class Driver:
    """A paho MQTT 5 client (its own network thread) on the node's events and a replies tree of its own. `arm`
    queues batches of requests, each sent from the callback that receives the change into its state, so they
    reach the service a few milliseconds after it announced the state (a mosquitto_pub per request takes ~50 ms,
    longer than some steps). Replies are kept by correlation data, which is each request's id."""

    def __init__(self, node: Node, *, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.node = node
        self.reply_topic = f"lifecycle-replies/{node.name}/driver"
        self.changes: list[dict[str, Any]] = []
        self.replies: dict[str, dict[str, Any]] = {}
        self.missed: list[str] = []  # armed states the install passed before the batch could be sent
        self._armed: list[tuple[str, list[Request]]] = []
        self._unanswered: set[str] = set()  # sent and not yet answered: a batch waits for the one before
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_args: self._subscribed.set()
        self.client.connect(host, port)
        self.client.loop_start()
        self.client.subscribe([(node.topic("events"), 1), (f"{self.reply_topic}/#", 1),
                               (node.topic("availability"), 1)])
        if not self._subscribed.wait(timeout=10):
            raise AssertionError("the driver's subscription was not acknowledged")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def send(self, *requests: Request) -> None:
        self._unanswered |= {request["id"] for request in requests}
        for request in requests:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = f"{self.reply_topic}/{request['id']}"
            props.CorrelationData = request["id"].encode()
            self.client.publish(self.node.topic("requests"), json.dumps(request), qos=1, properties=props)

    def arm(self, state: str, requests: list[Request]) -> None:
        """Send `requests` when the service announces `state` (the next change into it once every request sent
        before is answered, so that two batches never mix). Batches fire in the order armed; one whose state the
        walk passed meanwhile is dropped and named in `missed`."""
        with self._cond:
            self._armed.append((state, requests))

    def reply(self, request_id: str, *, timeout_s: float = 20) -> dict[str, Any]:
        with self._cond:
            if not self._cond.wait_for(lambda: request_id in self.replies, timeout=timeout_s):
                raise AssertionError(f"no reply to {request_id} within {timeout_s} s; changes: {self.tos()}")
            return self.replies[request_id]

    def tos(self) -> list[str]:
        return [c["to"] for c in self.changes]

    def wait_state(self, state: str, *, after: int = 0, request_id: str | None = None, timeout_s: float = 180) -> int:
        """The index in `changes` of the first change into `state` at or after `after` (made by `request_id`)."""
        def found() -> int | None:
            return next((i for i, c in enumerate(self.changes) if i >= after and c["to"] == state
                         and request_id in (None, c["request_id"])), None)

        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None, timeout=timeout_s):
                raise AssertionError(f"no change into {state} within {timeout_s} s; changes: {self.tos()}")
            index = found()
            assert index is not None
            return index

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self.node.topic("availability"):  # plain text; a batch armed for "online" fires
            if message.payload == b"online" and not message.retain:  # a service (re)connected, not the old news
                with self._cond:
                    self._fire("online")
            return
        body = json.loads(message.payload)
        with self._cond:
            if message.topic.startswith(self.reply_topic):
                self.replies[message.topic.rsplit("/", 1)[1]] = body
                self._unanswered.discard(message.topic.rsplit("/", 1)[1])
            elif body.get("type") == "lifecycle.state.changed" and all(
                    c["state_seq"] != body["data"]["state_seq"] for c in self.changes):  # a restart re-publishes
                self.changes.append(body["data"])
                self._fire(body["data"]["to"])
            self._cond.notify_all()

    def _fire(self, state: str) -> None:
        while self._armed:
            target, requests = self._armed[0]
            if target == state:
                if self._unanswered:
                    return  # a later change into it (a resumed install re-enters it) may fire it
                self._armed.pop(0)
                self.send(*requests)
                return
            if target in INSTALL_CHAIN and state in INSTALL_CHAIN and (
                    INSTALL_CHAIN.index(target) < INSTALL_CHAIN.index(state)):
                self.missed.append(target)
                self._armed.pop(0)
                continue
            return
