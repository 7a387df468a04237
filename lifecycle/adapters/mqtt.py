"""The MQTT bridge: one aiomqtt client (MQTT 5, persistent session, `offline` will) reconnected forever. After
each connect: `online`, subscribe to requests, re-publish the status, flush the outbox of events kept while the
broker was away. A durable event (lifecycle.outbox) is in the outbox file before it is published and marked
acknowledged there once the broker's PUBACK arrived. Replies go to the MQTT 5 response topic (with correlation
data), else to `reply_to`, and only below the node's reply subtrees (`Topics.reply_topic_problem`)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from lifecycle.adapters.mqtt_credentials import load_credentials
from lifecycle.bus import BusItem, Subscription
from lifecycle.config import MqttConfig
from lifecycle.exposures import ExposureSet
from lifecycle.logging import get_logger
from lifecycle.outbox import Outbox, is_durable
from lifecycle.protocol import (
    Action,
    BadRequestError,
    Event,
    Reply,
    Request,
    Status,
    Topics,
    dumps,
    parse_request,
)

RequestHandler = Callable[[Request], Awaitable[Reply]]
# QoS 1 publishes of the outbox awaiting their PUBACK at once, at most: the broker's Receive Maximum (CONNACK)
# lowers it (Mosquitto's is its `max_inflight_messages`, 20 unless set; deploy/mosquitto sets 100). A burst of
# events longer than the window waits for PUBACKs: the certs step reports 27 files back to back.
MAX_INFLIGHT = 100
# Replies awaiting their PUBACK at once (each through aiomqtt's publish, beside the request loop).
REPLIES_IN_FLIGHT = 20
# MQTT 5 (3.2.2.3.3): a CONNACK without Receive Maximum means 65535.
DEFAULT_RECEIVE_MAXIMUM = 65535
# Told of every request answered: its action ("invalid" when it could not be parsed) and the reply (metrics).
ReplyObserver = Callable[[str, Reply], None]


def _shown_topic(topic: str | None) -> str:
    """A refused topic as quoted back: escaped (it may hold control characters) and cut short."""
    text = repr(topic)
    return text if len(text) <= 80 else f"{text[:77]}..."


def mqtt_properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho's constructor is unannotated


class MqttBridge:
    """Use as `async with bridge:` (starts the connection loop), then `await bridge.close(...)`."""

    def __init__(
        self, *, config: MqttConfig, topics: Topics, outbox: Subscription, status: Callable[[], Status],
        handle: RequestHandler, client_id: str, durable: Outbox | None = None,
        on_reply: ReplyObserver | None = None, max_inflight: int = MAX_INFLIGHT,
    ) -> None:
        self._config = config
        self._durable = durable
        self._topics = topics
        self._outbox = outbox
        self._status = status
        self._handle = handle
        self._log = get_logger("lifecycle.mqtt", broker=config.broker, client_id=client_id)
        self._on_reply = on_reply
        self._max_inflight = max_inflight
        # Taken from the outbox and published, PUBACK not yet seen (oldest first); `_idle` when there are none.
        self._inflight: deque[tuple[BusItem, asyncio.Future[None]]] = deque()
        self._idle = asyncio.Event()
        self._idle.set()
        # The sending state while `_drain_outbox` runs (a window of 0: no session, nothing is sent on offer).
        self._send_window = 0
        self._oldest_sent_s = 0.0  # when the oldest publish in flight was sent (its PUBACK deadline runs from it)
        self._send_failure: Exception | None = None  # raised in a send on offer, for the drain to end the session on
        # Something was put on the outbox, and maybe sent at once: the drain wakes on it to take the PUBACK (the
        # outbox's own `wait` looks for buffered items, and an item sent on offer is no longer buffered).
        self._offered = asyncio.Event()
        self.connected = asyncio.Event()
        self.connects = 0  # sessions established since start: every one after the first is a reconnect
        self._run_task: asyncio.Task[None] | None = None
        self._client = self._make_client(client_id)
        # Outbox publishes handed to paho directly (`_publish_now`), by message id, resolved on their PUBACK.
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._receive_maximum = DEFAULT_RECEIVE_MAXIMUM  # the broker's, from the last CONNACK
        self._hook_paho()
        # aiomqtt warns past this many of its publishes awaiting their PUBACK: the replies', plus status.
        self._client.pending_calls_threshold = REPLIES_IN_FLIGHT + 10

    def _make_client(self, client_id: str) -> aiomqtt.Client:
        connect_properties = mqtt_properties(PacketTypes.CONNECT)
        connect_properties.SessionExpiryInterval = self._config.session_expiry_s
        credentials = load_credentials(self._config)  # read once, at start: `serve` checked them already
        return aiomqtt.Client(
            self._config.host,
            self._config.port,
            identifier=client_id,
            username=credentials.username,
            password=credentials.password,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,  # keep the session (and its subscription) across reconnects
            properties=connect_properties,
            keepalive=self._config.keepalive_s,
            will=aiomqtt.Will(self._topics.availability, b"offline", qos=1, retain=True),
            tls_context=credentials.tls,
            # How long a connect (or an acknowledgement) may take: a broker that accepts TCP but never answers
            # (a TLS refusal arrives as a closed socket) must not hold the reconnect loop for aiomqtt's 10 s.
            timeout=float(max(self._config.keepalive_s, 5)),
        )

    def _hook_paho(self) -> None:
        """Chained after aiomqtt's own callbacks on its paho client (`_client`, the same across reconnects;
        aiomqtt 2.x has no public way to it), called on the loop (aiomqtt reads the socket from a reader
        callback): on_publish tells `_publish_now`'s futures of their PUBACK, on_connect keeps the broker's
        Receive Maximum (aiomqtt does not keep the CONNACK's properties), on_socket_open turns Nagle off."""
        inner = self._client._client
        # aiomqtt's own: called with what paho passes (its callback types are a union of API versions)
        aiomqtt_on_publish: Any = inner.on_publish
        aiomqtt_on_connect: Any = inner.on_connect
        aiomqtt_on_socket_open: Any = inner.on_socket_open

        def on_socket_open(client: paho.Client, userdata: object, sock: Any) -> None:
            # Each event is a small packet: without this, one written while the previous packet (a reply, say)
            # awaits its TCP acknowledgement waits for it, up to a delayed ACK: the install's first events
            # arrived ~40 ms late (bench/bench_event_latency.py). paho does not set it.
            with contextlib.suppress(OSError, AttributeError):  # a TLS socket passes it on; other kinds may not
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            aiomqtt_on_socket_open(client, userdata, sock)

        def on_connect(client: paho.Client, userdata: object, flags: object, reason_code: object,
                       properties: object) -> None:
            self._receive_maximum = int(getattr(properties, "ReceiveMaximum", DEFAULT_RECEIVE_MAXIMUM))
            # paho ignores the broker's Receive Maximum and its setter refuses a change once connected; its
            # attribute is read at each send, and this callback runs before paho re-sends the session's messages.
            client._max_inflight_messages = self._window()
            if aiomqtt_on_connect is not None:
                aiomqtt_on_connect(client, userdata, flags, reason_code, properties)

        def on_publish(client: paho.Client, userdata: object, mid: int, reason_code: object,
                       properties: object) -> None:
            if aiomqtt_on_publish is not None:
                aiomqtt_on_publish(client, userdata, mid, reason_code, properties)
            acked = self._acks.pop(mid, None)
            if acked is not None and not acked.done():
                acked.set_result(None)

        aiomqtt_on_socket_unregister_write: Any = inner.on_socket_unregister_write

        def on_socket_unregister_write(client: paho.Client, userdata: object, sock: Any) -> None:
            # aiomqtt adds its write callback later (call_soon_threadsafe) but removes it at once. When paho wrote
            # everything itself (`_publish_now`) after aiomqtt had asked for the callback, the removal came first
            # and the late add left a callback on an always-writable socket, with paho believing none registered:
            # the loop ran it ~9000 times a second, a whole CPU for as long as the service ran (strace: epoll_wait
            # returning EPOLLOUT at once). Removing it again after whatever add is queued before this call ends it.
            aiomqtt_on_socket_unregister_write(client, userdata, sock)
            with contextlib.suppress(RuntimeError):  # not on the loop's thread: paho writes only on the loop
                asyncio.get_running_loop().call_soon(self._remove_idle_writer, client, sock)

        inner.on_publish = on_publish
        inner.on_connect = on_connect
        inner.on_socket_open = on_socket_open
        inner.on_socket_unregister_write = on_socket_unregister_write

    @staticmethod
    def _remove_idle_writer(client: paho.Client, sock: Any) -> None:
        """The write callback off the socket unless paho wants it again (a later register) or the socket is no
        longer the client's (its descriptor number may belong to another connection by now)."""
        current: Any = client._sock
        if current is not None and current is sock and not client._registered_write and not client.want_write():
            with contextlib.suppress(ValueError, OSError):  # closed meanwhile
                asyncio.get_running_loop().remove_writer(current.fileno())

    def _window(self) -> int:
        """QoS 1 publishes in flight at once: never more than the broker takes (more is a protocol error, MQTT 5
        4.9); paho holds back what is over it (replies and status share it), the outbox keeps within it."""
        return max(1, min(self._max_inflight, self._receive_maximum))

    def _publish_now(self, topic: str, payload: bytes, *, retain: bool,
                     properties: Properties | None = None) -> asyncio.Future[None]:
        """Hand a QoS 1 publish to paho at once; the future resolves on its PUBACK. aiomqtt's `publish` costs a
        task, a timeout and, through its write callback, three system calls per message (~120 us here): a burst
        of 30 events waited 2-3 ms in the service before its first byte left, and the last one ~5 ms
        (bench/bench_event_latency.py). Same order as before: paho sends in the order of `publish` calls,
        aiomqtt's included."""
        inner = self._client._client
        # Onto the socket now: a state change must not wait for the loop's next turn while the progress events
        # behind it are encoded (~40 us each). Without a write callback paho writes in `publish` itself; what the
        # socket did not take then goes to aiomqtt's write callback, as always. (Writing through `loop_write`
        # after paho had asked aiomqtt for the callback left a deferred add_writer that could land on a closed
        # socket.)
        register_write = inner.on_socket_register_write
        inner.on_socket_register_write = None
        try:
            info = inner.publish(topic, payload, qos=1, retain=retain, properties=properties)
        except OSError as exc:
            raise aiomqtt.MqttError(f"could not write to the broker: {exc}") from exc
        finally:
            inner.on_socket_register_write = register_write
        if inner.want_write():  # paho marked the write callback registered while it was None: register it now
            inner._registered_write = False
            inner._call_socket_register_write()
        if info.rc != paho.MQTT_ERR_SUCCESS:  # not connected (any more), or paho's queue is full
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if info.is_published():  # acknowledged before `publish` returned (paho allows it)
            acked.set_result(None)
        else:
            self._acks[info.mid] = acked
        return acked

    async def __aenter__(self) -> MqttBridge:
        self._run_task = asyncio.create_task(self.run(), name="mqtt-bridge")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stop_run_task()

    async def _stop_run_task(self) -> None:
        task, self._run_task = self._run_task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def close(self, *, drain_timeout_s: float) -> None:
        """Deliver what is queued (while connected, up to `drain_timeout_s`), publish `offline`, disconnect."""
        if self.connected.is_set():
            try:
                async with asyncio.timeout(drain_timeout_s):
                    await self._outbox.drained()
                    await self._idle.wait()  # and acknowledged
                    await self._client.publish(self._topics.availability, b"offline", qos=1, retain=True)
            except (TimeoutError, aiomqtt.MqttError) as exc:
                self._log.warning("could not deliver everything before disconnecting", error=str(exc),
                                  undelivered=len(self._outbox) + len(self._inflight))
        await self._stop_run_task()  # leaving the client's context sends DISCONNECT: the broker drops the will

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The connection loop: it ends only when cancelled, or when a bug killed it (its exception says which);
        `serve` watches it so that a deaf service exits (and is restarted) instead of living on."""
        return self._run_task

    async def run(self) -> None:
        """Connect, serve, and on any connection loss reconnect with exponential backoff; until cancelled."""
        delay_s = self._config.reconnect_min_s
        while True:
            try:
                await self._session()
            except* aiomqtt.MqttError as group:
                self._log.warning("broker connection lost or refused", error="; ".join(map(str, group.exceptions)))
            if self.connected.is_set():
                delay_s = self._config.reconnect_min_s  # it was up: come back fast, then back off
            self.connected.clear()
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, self._config.reconnect_max_s)

    async def _session(self) -> None:
        async with self._client as client:
            # Retain-as-published: a request published with the retain flag keeps it even while we are subscribed,
            # so it is recognised and ignored then too, not only when the broker replays it at subscribe time.
            await client.subscribe(self._topics.requests, options=SubscribeOptions(qos=1, retainAsPublished=True))
            # `online` only once subscribed: a client that saw it may send a request and be heard.
            await client.publish(self._topics.availability, b"online", qos=1, retain=True)
            await client.publish(self._topics.status, dumps(self._status().to_json()), qos=1, retain=True)
            window = self._window()
            self.connected.set()
            self.connects += 1
            self._log.info("connected", undelivered=len(self._outbox))
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._read_requests(client), name="mqtt-requests")
                    group.create_task(self._drain_outbox(window), name="mqtt-outbox")
            except* aiomqtt.MqttError:
                raise
            except* Exception:
                # A bug, not the broker: leaving the client sends a clean DISCONNECT, which drops the will, so
                # say `offline` ourselves before the exception ends the loop (and `serve` ends the process).
                self.connected.clear()
                self._log.exception("the MQTT bridge failed")
                with contextlib.suppress(aiomqtt.MqttError):
                    await client.publish(self._topics.availability, b"offline", qos=1, retain=True)
                raise

    async def _drain_outbox(self, window: int) -> None:
        """Publish the outbox with up to `window` QoS 1 publishes awaiting their PUBACK: one broker round
        trip per event would make a burst of events wait in line (issue 11). Order holds: paho sends in the order
        of `publish` calls and the broker acknowledges QoS 1 in order (MQTT 5, 4.6); acknowledgements are taken
        oldest first, so `Outbox.acknowledged` still sees increasing seqs. What is in flight when the connection
        drops goes back to the front of the outbox and is published again after the reconnect (as before: QoS 1,
        a repeat is possible, a loss is not).

        While this runs, an item is handed to paho the moment the engine puts it on the bus (`_send_on_offer`),
        not when this task next gets the loop: the engine goes on with its step after a state change, and the
        callbacks already queued on the loop (a TLS handshake, a pod list) ran before this task did; events
        waited 2-15 ms for that at the readiness step (bench_event_latency's tail). This task takes the
        acknowledgements, enforces their deadline, and sends what the window could not take then."""
        inflight = self._inflight
        # aiomqtt gives up on a publish not acknowledged within its timeout (and ends the session): so do we.
        ack_timeout_s = self._client.timeout
        self._oldest_sent_s = time.monotonic()
        self._send_window = window
        self._send_failure = None
        self._outbox.on_offer = self._send_on_offer
        try:
            while True:
                if self._send_failure is not None:
                    raise self._send_failure
                # A durable event is in the outbox file (written, not yet fsynced) before it is here: a crash of
                # the service loses none. Waiting for its fsync as well cost 1-40 ms per state change on this
                # machine while image layers were written (bench/bench_event_latency.py) and only guarded the
                # announcement against a power loss, which the broker's own persistence (periodic) does not
                # survive either; the fsync still guards what is queued while the broker is away.
                self._send_queued()
                if not inflight:
                    self._offered.clear()
                    if self._outbox.peek() is None:
                        await self._offered.wait()
                    continue
                oldest = inflight[0][1]
                if not oldest.done():
                    waiting: list[asyncio.Future[Any]] = [oldest]
                    more: asyncio.Future[Any] | None = None
                    if len(inflight) < window:  # room: wake for what is offered (sent, or a send that failed)
                        self._offered.clear()
                        more = asyncio.ensure_future(self._offered.wait())
                        waiting.append(more)
                    left_s = self._oldest_sent_s + ack_timeout_s - time.monotonic()
                    await asyncio.wait(waiting, timeout=max(0.0, left_s), return_when=asyncio.FIRST_COMPLETED)
                    if more is not None:
                        more.cancel()
                    if not oldest.done() and time.monotonic() >= self._oldest_sent_s + ack_timeout_s:
                        raise aiomqtt.MqttError(f"no acknowledgement of a publish within {ack_timeout_s:g} s")
                while inflight and inflight[0][1].done():
                    item, published = inflight[0]
                    published.result()
                    inflight.popleft()
                    self._oldest_sent_s = time.monotonic()  # the next one's wait starts now at the latest
                    if isinstance(item, Event) and self._durable is not None and is_durable(item):
                        self._durable.acknowledged(item.seq)
                if not inflight:
                    self._idle.set()
        finally:
            self._outbox.on_offer = None
            self._send_window = 0
            for _, publishing in inflight:
                publishing.cancel()
            for acked in self._acks.values():  # the session ended: these PUBACKs will not come on it
                acked.cancel()
            self._acks.clear()
            self._outbox.requeue([item for item, _ in inflight])
            inflight.clear()
            self._idle.set()

    def _send_queued(self) -> None:
        """Hand the outbox's items to paho, oldest first, while fewer than the window await their PUBACK."""
        inflight = self._inflight
        while len(inflight) < self._send_window and (item := self._outbox.peek()) is not None:
            self._outbox.pop()
            topic, payload, retain = self._encode(item)  # a bug here ends the bridge, and the service with it
            if not inflight:
                self._oldest_sent_s = time.monotonic()
            try:
                sent = self._publish_now(topic, payload, retain=retain)
            except aiomqtt.MqttError:
                self._outbox.requeue([item])
                raise
            inflight.append((item, sent))
            self._idle.clear()

    def _send_on_offer(self) -> None:
        """The outbox's `on_offer`, called in the engine's `bus.publish` on the loop: send at once. Nothing is
        raised into the engine: a failure is kept for `_drain_outbox`, which ends the session with it (a broker
        error: reconnect, the item back in the outbox; a bug: the bridge fails, as it would in the drain)."""
        self._offered.set()
        if self._send_failure is not None:
            return  # the session ends with it: the drain requeues and sends again after the reconnect
        try:
            self._send_queued()
        except Exception as exc:
            self._send_failure = exc

    def _encode(self, item: BusItem) -> tuple[str, bytes, bool]:
        if isinstance(item, Event):
            return self._topics.events, dumps(item.to_cloudevent(self._topics.source)), False
        if isinstance(item, ExposureSet):  # an empty retained payload deletes the message (reset)
            return self._topics.exposures, dumps(item.to_json()) if item.seq is not None else b"", True
        return self._topics.status, dumps(item.to_json()), True

    async def _read_requests(self, client: aiomqtt.Client) -> None:
        """Requests are handled one at a time, in order (an install then a cancel mean that order); their replies
        go out beside the reading, up to `REPLIES_IN_FLIGHT` awaiting their PUBACK: waiting for each reply's PUBACK
        before reading the next request held the service to one broker round trip per request (~50 requests a
        second on a busy 2-core machine, measured by tests/faults/test_fuzz_requests.py), and a `diagnose`,
        collecting for seconds, kept every request behind it waiting; it is answered beside them too."""
        room = asyncio.Semaphore(REPLIES_IN_FLIGHT)
        answering: set[asyncio.Task[None]] = set()

        def answered(done: asyncio.Future[None]) -> None:
            answering.discard(done)
            room.release()
            if not done.cancelled() and done.exception() is not None:
                self._log.error("a reply failed", exc_info=done.exception())

        async def beside(work: Awaitable[None]) -> None:
            try:
                await room.acquire()
            except BaseException:  # the session ends meanwhile: `work` is never run (and must not warn of it)
                if isinstance(work, Coroutine):
                    work.close()
                raise
            task = asyncio.ensure_future(work)
            answering.add(task)
            task.add_done_callback(answered)

        try:
            async for message in client.messages:
                if message.retain:
                    # A retained request is stale by definition (an old install must never reinstall a cluster).
                    if message.payload:  # an empty one is the clearing of a retained message
                        self._log.warning("ignoring a retained request", topic=str(message.topic))
                        await self._clear_if_secret(client, message)
                    continue
                await self._on_request(client, message, beside)
        finally:
            for task in answering:  # the session ends: a requester not answered times out and asks again
                task.cancel()

    async def _clear_if_secret(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        """A retained request carrying private keys (a `pki` bundle) is cleared from the broker, so that the keys
        are not handed to whoever subscribes later. Needs write access to the requests topic; without it the
        broker drops the clearing and the keys stay until the sender clears them."""
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload or "").encode()
        if b"PRIVATE KEY" not in payload and b'"pki"' not in payload:
            return
        try:
            await client.publish(str(message.topic), b"", qos=1, retain=True)
        except aiomqtt.MqttError as exc:
            self._log.warning("could not clear a retained request carrying keys", error=str(exc))
            return
        self._log.warning("cleared a retained request carrying private keys", topic=str(message.topic))

    async def _on_request(self, client: aiomqtt.Client, message: aiomqtt.Message,
                          beside: Callable[[Awaitable[None]], Awaitable[None]]) -> None:
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload or "").encode()
        props = message.properties
        response_topic: str | None = getattr(props, "ResponseTopic", None)
        correlation: bytes | None = getattr(props, "CorrelationData", None)
        action = "invalid"
        try:
            request = parse_request(payload)  # checks the size limit before anything else
            action = request.action.value
            self._check_reply_topics(response_topic, request)
        except BadRequestError as exc:
            reply_to = exc.reply_to
            reply = self._rejected(exc.request_id, exc.code, exc.message)
        except Exception as exc:  # a bug in parsing: the sender is told, the request loop goes on
            self._log.exception("request could not be parsed", size_bytes=len(payload))
            reply_to = None
            reply = self._rejected(None, "internal", f"{type(exc).__name__} while reading the request")
        else:
            if request.action == Action.DIAGNOSE:  # read-only, takes seconds: the requests after it go on
                await beside(self._handle_and_answer(client, request, action, response_topic, correlation))
                return
            reply_to = request.reply_to
            reply = await self._handle(request)
        # Sent here, before this coroutine lets the loop run the job the request may have started: the job's
        # first state change goes to the broker's socket when it is made (`_send_on_offer`), and a reply sent from
        # a task of its own came after it (a requester heard `idle -> preflight` before "install started").
        pending = self._answer(client, action, reply, response_topic, reply_to, correlation)
        if pending is not None:
            await beside(pending)

    async def _handle_and_answer(self, client: aiomqtt.Client, request: Request, action: str,
                                 response_topic: str | None, correlation: bytes | None) -> None:
        reply = await self._handle(request)
        pending = self._answer(client, action, reply, response_topic, request.reply_to, correlation)
        if pending is not None:
            await pending

    def _answer(self, client: aiomqtt.Client, action: str, reply: Reply, response_topic: str | None,
                reply_to: str | None, correlation: bytes | None) -> Awaitable[None] | None:
        """Count and log the reply and send it: a one-message reply is handed to paho now (it goes out before
        anything the loop runs after this), a chunked one (`diagnose`) by the awaitable returned, which also waits
        for the PUBACKs. None when there is nothing to wait for."""
        if self._on_reply is not None:
            self._on_reply(action, reply)
        # Replies go only where `reply_topic_problem` allows: never onto status/events/availability/requests (a
        # kubeconfig carries the admin key), never to a topic the broker would disconnect the service for.
        target = next((t for t in (response_topic, reply_to)
                       if t is not None and self._topics.reply_topic_problem(t) is None), None)
        if reply.error is not None:
            self._log.info("request rejected", request_id=reply.id, code=reply.error[0], error=reply.error[1],
                           replied=target is not None)
        if target is None:
            return None  # acted on (or refused) without a reply: none was asked for, or none is possible
        return self._reply(client, target, reply, correlation)

    def _check_reply_topics(self, response_topic: str | None, request: Request) -> None:
        """Refuse a request whose reply could not go where it asks: its requester would never hear of it."""
        problems = (("invalid_reply_topic", "the response topic", response_topic),
                    ("invalid_reply_to", "'reply_to'", request.reply_to))
        for code, what, topic in problems:
            problem = self._topics.reply_topic_problem(topic) if topic is not None else None
            if problem is not None:
                raise BadRequestError(code, f"{what} {problem}: {_shown_topic(topic)}", request_id=request.id,
                                      reply_to=request.reply_to)

    def _rejected(self, request_id: str | None, code: str, message: str) -> Reply:
        return Reply(id=request_id, ok=False, state=self._status().state, error=(code, message))

    def _reply(self, client: aiomqtt.Client, topic: str, reply: Reply,
               correlation: bytes | None) -> Awaitable[None] | None:
        props = mqtt_properties(PacketTypes.PUBLISH)
        props.ContentType = "application/json"
        if correlation is not None:
            props.CorrelationData = correlation
        if reply.message_expiry_s is not None:  # a reply carrying credentials must not wait long for its reader
            props.MessageExpiryInterval = reply.message_expiry_s
        body = reply.to_json()
        if reply.chunks:  # one message per chunk (`diagnose`), each a whole reply, one at a time: they may be MBs
            return self._send_chunks(client, topic, [dumps({**body, "chunk": part}) for part in reply.chunks],
                                     props, request_id=reply.id)
        try:
            acked = self._publish_now(topic, dumps(body), retain=False, properties=props)
        except aiomqtt.MqttError as exc:  # the requester will time out and ask again; the action stands
            self._log.warning("could not send a reply", topic=topic, error=str(exc))
            return None
        except (ValueError, TypeError) as exc:  # a topic or property paho cannot encode: no reply is possible
            self._reply_dropped(topic, reply.id, exc)
            return None
        return self._reply_acknowledged(acked, topic)

    async def _reply_acknowledged(self, acked: asyncio.Future[None], topic: str) -> None:
        """The PUBACK of a reply, within aiomqtt's publish timeout (a session that ends cancels it)."""
        done, _ = await asyncio.wait({acked}, timeout=self._client.timeout)
        if not done or acked.cancelled() or acked.exception() is not None:  # the requester times out, asks again
            self._log.warning("a reply was not acknowledged", topic=topic,
                              why="timeout" if not done else "the session ended")

    async def _send_chunks(self, client: aiomqtt.Client, topic: str, payloads: list[bytes], props: Properties, *,
                           request_id: str | None) -> None:
        try:
            for payload in payloads:  # QoS 1 keeps their order
                await client.publish(topic, payload, qos=1, properties=props)
        except aiomqtt.MqttError as exc:  # the requester will time out and ask again
            self._log.warning("could not send a reply", topic=topic, error=str(exc))
        except (ValueError, TypeError) as exc:
            self._reply_dropped(topic, request_id, exc)

    def _reply_dropped(self, topic: str, request_id: str | None, exc: Exception) -> None:
        """A topic or property paho cannot encode: no reply is possible."""
        self._log.warning("reply dropped: cannot be sent to this topic", topic=repr(topic), request_id=request_id,
                          error=f"{type(exc).__name__}: {exc}")

