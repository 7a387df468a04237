"""`lifecycle` commands: `serve` (wired in `__main__`), the MQTT 5 clients `install`, `status`, `watch`, `reset`,
`cancel`, `kubeconfig`, the host-side `forward`, and `graph`. Clients send a request with a response topic and
correlation data and wait for the reply; `--watch` then follows the events of that request. Nothing is written to
disk but the kubeconfig a user asks for (`kubeconfig -o FILE` or `--merge`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes

from lifecycle.adapters.mqtt import mqtt_properties
from lifecycle.adapters.mqtt_credentials import Credentials, load_credentials
from lifecycle.atomicfile import replace_file
from lifecycle.cli_args import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    MERGE_DEFAULT,
    build_parser,
)
from lifecycle.cli_render import Renderer
from lifecycle.config import Config, ConfigError, MqttConfig, load_client_config
from lifecycle.protocol import STOPPED_MESSAGE, EventType, Topics, dumps

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_UNREACHABLE", "EXIT_USAGE", "build_parser"]


@dataclass(frozen=True)
class Target:
    mqtt: MqttConfig
    topics: Topics
    credentials: Credentials

    def client(self, *, role: str, timeout_s: float) -> aiomqtt.Client:
        """A fresh MQTT 5 client of this broker (clean session, an id of its own: `lifecycle-<role>-...`)."""
        return aiomqtt.Client(
            self.mqtt.host, self.mqtt.port, identifier=f"lifecycle-{role}-{uuid.uuid4().hex[:12]}",
            username=self.credentials.username, password=self.credentials.password,
            protocol=aiomqtt.ProtocolVersion.V5, tls_context=self.credentials.tls, keepalive=self.mqtt.keepalive_s,
            timeout=timeout_s,
        )


def target_from_args(args: argparse.Namespace) -> Target:
    mqtt, node = MqttConfig(), "docker-desktop"
    if args.config is not None:
        mqtt, node = load_client_config(args.config)  # [mqtt] and node.name; a host-side file needs no more
    if args.broker:
        mqtt = Config(mqtt=mqtt).with_overrides(broker=args.broker).mqtt  # validates the URL
    if args.prefix:
        if any(c in args.prefix for c in "#+") or args.prefix.startswith("/") or args.prefix.endswith("/"):
            raise ConfigError(f"--prefix: {args.prefix!r} is not a valid topic prefix")
        mqtt = replace(mqtt, prefix=args.prefix)
    # Loaded before connecting: an unreadable password or CA file is a usage error that names its key.
    return Target(mqtt=mqtt, topics=Topics(mqtt.prefix, args.node or node), credentials=load_credentials(mqtt))


class ServiceClient:
    """One short MQTT 5 session: a private reply topic, optionally the event stream."""

    def __init__(self, client: aiomqtt.Client, target: Target) -> None:
        self._client = client
        self.topics = target.topics
        # Outside <prefix>/#: on an open broker, whoever watches the node's topics does not get the replies (a
        # kubeconfig holds the admin key) unless it subscribes to this tree too.
        self.reply_topic = f"{target.topics.private_replies}/{uuid.uuid4().hex}"
        self.available: str | None = None  # last seen retained availability
        self._held: deque[aiomqtt.Message] = deque()  # seen while waiting for the reply, for the watch after it

    def hold(self, message: aiomqtt.Message) -> None:
        self._held.append(message)

    async def send(self, request: dict[str, Any], *, timeout_s: float) -> bytes:
        correlation = uuid.uuid4().bytes
        props = mqtt_properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = correlation
        props.MessageExpiryInterval = max(1, int(timeout_s))  # a service that is down must not act on it later
        await self._client.publish(self.topics.requests, dumps(request), qos=1, properties=props)
        return correlation

    async def wait_online(self, *, timeout_s: float) -> bool:
        """Wait until the service's availability is `online`; what else arrives meanwhile is held."""
        try:
            async with asyncio.timeout(timeout_s):
                while self.available != "online":
                    message = await self.next_message(fresh=True)
                    if not message.topic.matches(self.topics.availability):
                        self.hold(message)
        except TimeoutError:
            return False
        return True

    async def next_message(self, *, fresh: bool = False) -> aiomqtt.Message:
        """The next message: those held back first, unless `fresh` (only what arrives from now on)."""
        if self._held and not fresh:
            return self._held.popleft()
        message = await self._client.messages.__anext__()
        if message.topic.matches(self.topics.availability):
            self.available = _text(message.payload)
        return message


def _text(payload: Any) -> str:
    return payload.decode("utf-8", errors="replace") if isinstance(payload, bytes | bytearray) else str(payload)


@asynccontextmanager
async def connect(target: Target, *, events: bool, timeout_s: float) -> AsyncIterator[ServiceClient]:
    async with target.client(role="cli", timeout_s=timeout_s) as raw:
        client = ServiceClient(raw, target)
        await raw.subscribe(client.reply_topic, qos=1)
        await raw.subscribe(target.topics.availability, qos=1)
        if events:  # before the request, so no event of it is missed
            await raw.subscribe(target.topics.events, qos=1)
            await raw.subscribe(target.topics.status, qos=1)
        yield client


async def request(args: argparse.Namespace, target: Target, out: Renderer) -> int:
    body: dict[str, Any] = {"id": f"cli-{uuid.uuid4().hex[:12]}", "action": args.command}
    if getattr(args, "kubernetes_version", None):
        body["kubernetes_version"] = args.kubernetes_version
    if getattr(args, "pki_dir", None):
        try:
            body["pki"] = read_pki_dir(args.pki_dir)
        except (OSError, ValueError) as exc:
            out.error(f"--pki {args.pki_dir}: {exc}")
            return EXIT_USAGE
    watch = bool(getattr(args, "watch", False))
    async with connect(target, events=watch, timeout_s=args.timeout) as client:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.timeout
        # A service that is starting has not subscribed yet and would never see the request: wait for its
        # retained `online` (published once it has subscribed), within the same --timeout.
        await client.wait_online(timeout_s=args.timeout)
        correlation = await client.send(body, timeout_s=args.timeout)
        if args.command == "diagnose":
            return await receive_bundle(client, correlation, args.bundle_file, timeout_s=args.timeout, out=out)
        reply = await _await_reply(client, correlation, timeout_s=max(0.5, deadline - loop.time()))
        if reply is None:
            why = _why_silent(client.available)
            out.error(f"no reply from node {target.topics.node} within {args.timeout:g} s{why}")
            return EXIT_UNREACHABLE
        if args.command == "kubeconfig" and reply.get("ok") and args.merge is not None:
            return merge_kubeconfig(str(reply.get("kubeconfig") or ""), args.merge, use=args.use, out=out)
        if args.command == "kubeconfig" and reply.get("ok"):
            return save_kubeconfig(str(reply.get("kubeconfig") or ""), args.kubeconfig_file, out)
        out.reply(reply)
        if not reply.get("ok"):
            return EXIT_FAILED
        if not watch:
            return EXIT_OK
        goal = {"reset": "idle", "stop": "stopped"}.get(args.command, "running")
        if reply.get("note") in ("already stopped", "already running") and args.command in ("stop", "start"):
            return EXIT_OK  # nothing to follow
        if reply.get("state") == goal and args.command == "install":
            return EXIT_OK  # nothing to follow: already running
        return await _follow(client, reply.get("request_id"), goal=goal, timeout_s=args.timeout, out=out)


def read_pki_dir(directory: Path) -> dict[str, str]:
    """The kubeadm-named PKI files in `directory` as a request's `pki` (other files are left out)."""
    from lifecycle.pki_bundle import KNOWN_FILES  # only here: it loads the crypto library

    found = {name: (directory / name).read_text(encoding="ascii") for name in KNOWN_FILES
             if (directory / name).is_file()}
    if not found:
        raise ValueError("no PKI file in it (expected kubeadm's names: ca.crt, ca.key, ..., sa.pub)")
    return found


def save_kubeconfig(text: str, path: Path | None, out: Renderer) -> int:
    """Print the kubeconfig, or write it to `path` (mode 0600 from the start, replaced atomically)."""
    if path is None:
        sys.stdout.write(text)
        return EXIT_OK
    try:
        replace_file(path, text.encode())
    except OSError as exc:
        out.error(f"cannot write {path}: {exc.strerror or exc}")
        return EXIT_FAILED
    out.error(f"wrote the admin kubeconfig to {path} (mode 0600)")  # stderr: stdout stays clean for scripts
    return EXIT_OK


async def receive_bundle(client: ServiceClient, correlation: bytes, path: Path, *, timeout_s: float,
                         out: Renderer) -> int:
    """Gather the chunks of a `diagnose` reply, check them against their sha256, write the `.tar.gz` (0600).

    Collecting takes the service a while (the API is asked with its own deadlines): wait at least 60 s."""
    from lifecycle.diagnose import missing_chunks, reassemble

    chunks: dict[int, dict[str, Any]] = {}
    wait_s = max(timeout_s, 60.0)
    while missing_chunks(chunks) != 0:
        reply = await _await_reply(client, correlation, timeout_s=wait_s)
        if reply is None:
            got = f" (got {len(chunks)} chunk(s))" if chunks else _why_silent(client.available)
            out.error(f"no complete diagnostics from node {client.topics.node} within {wait_s:g} s{got}")
            return EXIT_UNREACHABLE
        part = reply.get("chunk")
        if not reply.get("ok") or not isinstance(part, dict):
            out.reply(reply)
            return EXIT_FAILED
        chunks[int(part.get("index", -1))] = part
    try:
        bundle = reassemble(chunks.values())
    except ValueError as exc:
        out.error(f"the diagnostics bundle is damaged: {exc}")
        return EXIT_FAILED
    try:
        replace_file(path, bundle)
    except OSError as exc:
        out.error(f"cannot write {path}: {exc.strerror or exc}")
        return EXIT_FAILED
    out.error(f"wrote the diagnostics of node {client.topics.node} to {path} ({len(bundle)} bytes, "
              f"{len(chunks)} chunk(s), sha256 checked, mode 0600)")
    return EXIT_OK


def merge_kubeconfig(text: str, path: Path, *, use: bool, out: Renderer) -> int:
    """Merge the fetched kubeconfig into `path` (MERGE_DEFAULT: kubectl's default file); exit 1 if refused."""
    from lifecycle.kubemerge import KubeconfigMergeError, default_target, merge_into_file

    if path == MERGE_DEFAULT:
        path = default_target(os.environ, home=Path.home())
    try:
        result = merge_into_file(path, text, use=use)
    except KubeconfigMergeError as exc:
        out.error(f"{path}: {exc}; nothing was changed")
        return EXIT_FAILED
    except OSError as exc:
        out.error(f"cannot merge into {path}: {exc.strerror or exc}")
        return EXIT_FAILED
    what = "replaced " + ", ".join(result.replaced) if result.replaced else "added"
    current = f"current-context is now {result.context}" if result.switched else "current-context unchanged"
    backup = f"; the previous file is {result.backup}" if result.backup else ""
    out.error(f"merged context {result.context} into {path} (mode 0600; {what}; {current}{backup})")
    return EXIT_OK


def _why_silent(available: str | None) -> str:
    if available == "offline":
        return " (the service's availability is 'offline')"
    if available is None:
        # A broker ACL (deploy/mosquitto) lets only the host backend's user read availability and replies.
        return " (no availability seen: the service never connected, or this broker user may not send requests)"
    return ""


async def _await_reply(client: ServiceClient, correlation: bytes, *, timeout_s: float) -> dict[str, Any] | None:
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await client.next_message(fresh=True)
                if not message.topic.matches(client.reply_topic):
                    client.hold(message)  # an event of the request may overtake its reply
                    continue
                if getattr(message.properties, "CorrelationData", None) != correlation:
                    continue  # a late reply to an earlier request
                reply: dict[str, Any] = json.loads(_text(message.payload))
                return reply
    except TimeoutError:
        return None


# Where a watched job ends when it does not reach its goal: an install that failed or was reset away, a failed reset.
_END_STATES = {"running": ("failed", "resetting", "idle"), "idle": ("failed",), "stopped": ("failed", "resetting")}


async def _follow(client: ServiceClient, request_id: str | None, *, goal: str, timeout_s: float, out: Renderer) -> int:
    """Print the events of `request_id` until the state reaches `goal` (0) or failed / another job (1)."""
    inactivity_s = max(timeout_s, 60.0)  # steps report at least this often; silence means the service is gone
    failed_on_the_way = False  # a renewal that failed before changing anything goes back to running
    while True:
        try:
            async with asyncio.timeout(inactivity_s):
                message = await client.next_message()
        except TimeoutError:
            out.error(f"no event for {inactivity_s:g} s; the service may be down (check `lifecycle status`)")
            return EXIT_UNREACHABLE
        if not message.topic.matches(client.topics.events):
            continue
        event = json.loads(_text(message.payload))
        data = event.get("data") or {}
        if data.get("request_id") != request_id:
            continue
        out.event(event)
        failed_on_the_way |= event.get("type") == EventType.STEP_FAILED
        if (goal == "stopped" and event.get("type") == EventType.STEP_PROGRESS
                and data.get("message") == STOPPED_MESSAGE):  # the state changed first; this ends the stop
            out.done(goal)
            return EXIT_OK
        if event.get("type") == EventType.STATE_CHANGED:
            if data.get("to") == goal and not failed_on_the_way:
                out.done(goal)
                return EXIT_OK
            if data.get("to") == goal:
                out.failure(data)
                return EXIT_FAILED
            if data.get("to") in _END_STATES[goal]:
                out.failure(data)
                return EXIT_FAILED


async def watch(target: Target, out: Renderer, *, timeout_s: float) -> int:
    async with connect(target, events=True, timeout_s=timeout_s) as client:
        while True:
            message = await client.next_message()
            if message.topic.matches(client.topics.events):
                out.event(json.loads(_text(message.payload)))
            elif message.topic.matches(client.topics.status) and message.retain:
                out.status(json.loads(_text(message.payload)))


def _say(line: str) -> None:
    print(line, flush=True)  # one line per change, seen at once when piped to a log


def run(args: argparse.Namespace) -> int:
    """Run a client command (everything except `serve`)."""
    if args.command == "graph":
        from lifecycle.machine import mermaid

        print(mermaid())
        return EXIT_OK
    if args.command == "kubeconfig" and args.use and args.merge is None:
        print("lifecycle: kubeconfig --use goes with --merge", file=sys.stderr)
        return EXIT_USAGE
    try:
        target = target_from_args(args)
    except ConfigError as exc:
        print(f"lifecycle: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out = Renderer(json_output=args.output == "json", stream=sys.stdout)
    try:
        if args.command == "watch":
            return asyncio.run(watch(target, out, timeout_s=args.timeout))
        if args.command == "forward":
            from lifecycle.forward import run_forward

            return asyncio.run(run_forward(target, bind=args.bind, timeout_s=args.timeout, say=_say))
        return asyncio.run(request(args, target, out))
    except KeyboardInterrupt:
        return EXIT_OK if args.command in ("watch", "forward") else EXIT_INTERRUPTED
    except aiomqtt.MqttError as exc:
        out.error(f"broker {target.mqtt.broker}: {exc}")
        return EXIT_UNREACHABLE
