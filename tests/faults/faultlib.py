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
    "CutProxy",
    "Driver",
    "Node",
    "PortSubscriber",
    "PrivateBroker",
    "Subscriber",
    "_kill_processes_under",
    "_wait_state",
    "admin_key_pem",
    "components_under",
    "engine_leftovers",
    "kube_temp_dirs",
    "kubelets_under",
    "make_node",
    "payload",
    "processes_under",
    "state_changes",
    "state_seqs",
    "temp_files_holding",
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
        # The state last announced while the next batch was armed for it but waited for answers: the batch goes
        # out with the last answer unless another change came first. Replies and events are on different topics
        # and come in either order (docs/protocol.md), so the change into the state a batch's own request made
        # (`renewing` -> `resetting` by a reset) often arrives before that batch's last reply; that reply's own
        # `state` tells whether the node is still there.
        self._entered: str | None = None
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        # What reached the driver, in arrival order (ms since start, what): a timeout quotes the tail, as the order
        # of replies and state changes across topics is what decides when a batch goes out.
        self.arrivals: list[tuple[float, str]] = []
        self._start_s = time.monotonic()
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
        with self._cond:  # the callback thread reads it (the condition's lock is reentrant: `_fire` sends too)
            self._unanswered |= {request["id"] for request in requests}
        for request in requests:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = f"{self.reply_topic}/{request['id']}"
            props.CorrelationData = request["id"].encode()
            self.client.publish(self.node.topic("requests"), json.dumps(request), qos=1, properties=props)

    def arm(self, state: str, requests: list[Request]) -> None:
        """Send `requests` when the service announces `state`, once every request sent before is answered (so that
        two batches never mix): at the change into it, or at the last answer if that comes after the change and
        no other change came between, else at the next change into it (a resumed install re-enters it). Batches
        fire in the order armed; one whose state the walk passed meanwhile is dropped and named in `missed`."""
        with self._cond:
            self._armed.append((state, requests))

    def reply(self, request_id: str, *, timeout_s: float = 20) -> dict[str, Any]:
        with self._cond:
            if not self._cond.wait_for(lambda: request_id in self.replies, timeout=timeout_s):
                raise AssertionError(f"no reply to {request_id} within {timeout_s} s; changes: {self.tos()}; "
                                     f"unanswered: {sorted(self._unanswered)}; last arrivals: {self.arrivals[-16:]}")
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
                self._arrived(f"reply {message.topic.rsplit('/', 1)[1]}")
                self.replies[message.topic.rsplit("/", 1)[1]] = body
                self._unanswered.discard(message.topic.rsplit("/", 1)[1])
                if not self._unanswered and self._entered is not None:
                    # The state was announced before this last answer. Fire only if the answer says the node is
                    # still in it: a batch's own cancel + resume are answered in `failed`, before the change back
                    # into the state arrives (replies go out beside the request loop), and that change fires it.
                    if body.get("state") == self._entered:
                        self._fire(self._entered)
                    else:
                        self._entered = None
            elif body.get("type") == "lifecycle.state.changed" and all(
                    c["state_seq"] != body["data"]["state_seq"] for c in self.changes):  # a restart re-publishes
                self.changes.append(body["data"])
                self._arrived(f"change {body['data']['from']} -> {body['data']['to']}")
                self._fire(body["data"]["to"])
            self._cond.notify_all()

    def _arrived(self, what: str) -> None:
        self.arrivals.append((round((time.monotonic() - self._start_s) * 1000, 1), what))

    def _fire(self, state: str) -> None:
        self._entered = None  # called for every change: the one it waited on, if any, is over
        while self._armed:
            target, requests = self._armed[0]
            if target == state:
                if self._unanswered:
                    self._entered = state  # the last answer fires it if no other change comes first
                    return
                self._armed.pop(0)
                self.send(*requests)
                return
            if target in INSTALL_CHAIN and state in INSTALL_CHAIN and (
                    INSTALL_CHAIN.index(target) < INSTALL_CHAIN.index(state)):
                self.missed.append(target)
                self._armed.pop(0)
                continue
            return
# --- Kills inside steps, broker restarts, registry and engine faults (h8/killsin) ---------------------------------

TEMP_DIRS = (Path("/tmp"), Path("/dev/shm"), Path("/var/tmp"))
ENGINE_DATA = Path("/tmp/lifecycle-services")  # the shared engine's data and sockets: large, and not ours to read


def admin_key_pem(root: Path) -> bytes:
    """The cluster-admin private key, as the node's admin.conf holds it (base64 in `client-key-data`)."""
    import base64

    import yaml

    conf = yaml.safe_load((root / "etc/kubernetes/admin.conf").read_text())
    return base64.b64decode(conf["users"][0]["user"]["client-key-data"])


def temp_files_holding(secret: bytes, *, newer_than_s: float, outside: Path) -> list[Path]:
    """Files in /tmp, /dev/shm and /var/tmp changed since `newer_than_s` (a time.time()), not under `outside` (the
    node root), of at most 1 MiB, that hold `secret` as PEM or base64-encoded: a private key left outside the root.
    Only files changed during the test are read: /tmp holds gigabytes of other people's files."""
    import base64
    import os

    forms = (secret.strip(), base64.b64encode(secret))
    found = []
    for top in TEMP_DIRS:
        for dirpath, dirnames, filenames in os.walk(top):
            here = Path(dirpath)
            dirnames[:] = [d for d in dirnames if here / d not in (ENGINE_DATA, outside)]
            for name in filenames:
                path = here / name
                with contextlib.suppress(OSError):
                    st = path.lstat()
                    if (st.st_mtime >= newer_than_s and st.st_size <= 1 << 20 and (st.st_mode & 0o170000) == 0o100000
                            and any(form in path.read_bytes() for form in forms)):
                        found.append(path)
    return found


def kube_temp_dirs() -> set[Path]:
    """/tmp/lifecycle-kube-*: where an older service put the admin key for its API client (issue 8, defect 7)."""
    return set(Path("/tmp").glob("lifecycle-kube-*"))


def state_changes(sub: Subscriber) -> list[dict[str, Any]]:
    """The `data` of every state change the subscriber saw, each seq once (an outbox re-publish is the same event)."""
    seen: dict[int, dict[str, Any]] = {}
    for m in sub.messages:
        body = payload(m)
        if body.get("type") == "lifecycle.state.changed":
            seen.setdefault(body["data"]["state_seq"], body["data"])
    return [seen[seq] for seq in sorted(seen)]


class PrivateBroker:
    """A Mosquitto of the test's own on a free port, persistence on (saved at every change), so a test can kill -9
    and restart it without disturbing the shared broker on 1883. Runs as root (mosquitto would drop to its own
    user, which cannot reach a pytest temp dir)."""

    def __init__(self, workdir: Path) -> None:
        from conftest import free_port

        self.port = free_port()
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nuser root\npersistence true\n"
            f"persistence_location {self.dir}/\nautosave_interval 1\nautosave_on_changes true\n"
            f"log_dest file {self.dir}/mosquitto.log\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_until(self._answers, timeout_s=10, what=f"private mosquitto not answering on {self.port}")

    def _answers(self) -> bool:
        return subprocess.run(["mosquitto_pub", "-p", str(self.port), "-t", "probe", "-n"], capture_output=True,
                              check=False, timeout=10).returncode == 0

    def kill(self) -> None:
        """kill -9: no will published, no database saved beyond the last autosave."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM: the broker saves its database and exits."""
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def use_in(self, config_text: str) -> str:
        """A service config (simnode/lifecycle.toml) naming this broker."""
        changed = config_text.replace('broker = "mqtt://127.0.0.1:1883"', f'broker = "{self.url}"')
        assert self.url in changed
        return changed

    def subscribe(self, node: Node, *leaves: str, client_id: str | None = None) -> Subscriber:
        """A subscriber on this broker, closed with the node. With `client_id`, a persistent session (clean start
        off, an hour of session expiry): mosquitto_sub reconnects after a broker restart and the broker delivers
        what it queued for it meanwhile."""
        sub = PortSubscriber(self.port, *(node.topic(leaf) for leaf in leaves), client_id=client_id)
        node.subscribers.append(sub)
        return sub

    def retained(self, node: Node, leaf: str, *, timeout_s: float) -> str:
        """The retained payload of one of the node's topics, as text ("" when none within 2 s)."""
        out = subprocess.run(["mosquitto_sub", "-V", "mqttv5", "-p", str(self.port), "-t", node.topic(leaf),
                              "-C", "1", "-W", str(max(1, int(timeout_s))), "-F", "%p"],
                             capture_output=True, text=True, check=False)
        return out.stdout.strip()

    def request(self, node: Node, body: dict[str, Any], *, correlation: str, timeout_s: float = 20) -> Any:
        """Publish a request with a response topic; return the reply's payload."""
        import json

        reply_topic = f"lifecycle-replies/{node.name}/{correlation}"
        replies = PortSubscriber(self.port, reply_topic)
        try:
            subprocess.run(["mosquitto_pub", "-V", "mqttv5", "-p", str(self.port), "-q", "1", "-t",
                            node.topic("requests"), "-s", "-D", "publish", "response-topic", reply_topic,
                            "-D", "publish", "correlation-data", correlation],
                           input=json.dumps(body).encode(), check=True)
            return payload(replies.wait_for(lambda m: True, timeout_s=timeout_s))
        finally:
            replies.close()

    def start_service(self, node: Node) -> None:
        """Node.start_service, waiting for `online` on this broker instead of the shared one."""
        from test_install_over_mqtt import LIFECYCLE

        with open(node.log_path, "ab") as log:
            node.service = subprocess.Popen(
                [str(LIFECYCLE), "serve", "--config", str(node.config_path), "--root", str(node.root),
                 "--node", node.name], stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self.retained(node, "availability", timeout_s=2) == "online", timeout_s=30,
                   what="service online on the private broker")


class PortSubscriber(Subscriber):
    """Subscriber on another port, optionally with a persistent session (see PrivateBroker.subscribe)."""

    def __init__(self, port: int, *topics: str, client_id: str | None = None, ready_timeout_s: float = 20.0) -> None:
        super().__init__(*topics, ready_timeout_s=ready_timeout_s, port=port, client_id=client_id)


class CutProxy:
    """A proxy the test can cut, in front of a TCP server (the registry) or a unix socket (the Docker Engine).
    `down()` drops every connection and stops listening (connection refused; the unix socket file is removed),
    `stall()` accepts and never answers, `up()` forwards again on the same address. Runs its own loop in a thread.
    (tests/e2e/test_engine_faults_over_mqtt.py's RegistryProxy stalls only.)"""

    def __init__(self, *, upstream_tcp: tuple[str, int] | None = None, upstream_unix: str | None = None,
                 listen_unix: Path | None = None, rate_bytes_s: float | None = None) -> None:
        import asyncio
        import threading

        self._upstream_tcp = upstream_tcp
        self._upstream_unix = upstream_unix
        self._listen_unix = listen_unix
        self._rate_bytes_s = rate_bytes_s  # downstream only: a slow registry, so a pull can be caught midway
        self._mode = "forward"
        self.connections = 0  # accepted since it was made, in every mode: who came asking
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.AbstractServer | None = None
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cut-proxy", daemon=True)
        self._thread.start()
        self.up()

    def _call(self, work: Any) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout=10)

    async def _serve(self, reader: Any, writer: Any) -> None:
        import asyncio

        self._writers.add(writer)
        self.connections += 1
        try:
            if self._mode != "forward":
                while await reader.read(65536):
                    pass  # stalled: swallow the request, never answer
                return
            if self._upstream_unix is not None:
                up_reader, up_writer = await asyncio.open_unix_connection(self._upstream_unix)
            else:
                assert self._upstream_tcp is not None
                up_reader, up_writer = await asyncio.open_connection(*self._upstream_tcp)
            self._writers.add(up_writer)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer, self._rate_bytes_s),
                                 return_exceptions=True)
        except OSError:
            pass
        finally:
            writer.close()

    async def _drop_all(self) -> None:
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _listen(self) -> None:
        import asyncio

        if self._listen_unix is not None:
            self._listen_unix.unlink(missing_ok=True)
            self._server = await asyncio.start_unix_server(self._serve, str(self._listen_unix))
        else:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
            self.port = self._server.sockets[0].getsockname()[1]

    async def _set(self, mode: str) -> None:
        self._mode = mode
        await self._drop_all()
        if mode == "down":
            if self._server is not None:
                self._server.close()
                self._server = None
            if self._listen_unix is not None:
                self._listen_unix.unlink(missing_ok=True)
        elif self._server is None:
            await self._listen()

    @property
    def listen_path(self) -> str:
        assert self._listen_unix is not None
        return str(self._listen_unix)

    def up(self) -> None:
        self._call(self._set("forward"))

    def stall(self) -> None:
        self._call(self._set("stall"))

    def down(self) -> None:
        self._call(self._set("down"))

    def close(self) -> None:
        self._call(self._set("down"))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


async def _pipe(reader: Any, writer: Any, rate_bytes_s: float | None = None) -> None:
    import asyncio

    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
            if rate_bytes_s:
                await asyncio.sleep(len(data) / rate_bytes_s)
    except OSError:
        pass
    finally:
        writer.close()
