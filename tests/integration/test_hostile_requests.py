"""Hostile requests to the service as a process of its own over the real broker (issue 8, defects 10-12, 14, 15):
each input that used to kill the request loop is refused with a code, a `status` is answered after it, nothing of
a refused request reaches disk; a state file already holding a lone surrogate no longer stops the start; a batch
of fuzzed requests leaves the service answering."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from lifecycle_fakes import fake_plan, fake_reset, journal, null_ports, write_config
from lifecycle_mqtt import (
    Probe,
    ServiceProcess,
    probe,
    retained,
    service_config,
    start_service_process,
    unique_prefix,
)
from paho.mqtt.packettypes import PacketTypes

from lifecycle import service
from lifecycle.__main__ import run_service
from lifecycle.adapters.mqtt import MqttBridge, mqtt_properties
from lifecycle.pki_bundle import KNOWN_FILES
from lifecycle.protocol import Topics

NODE = "hostile"
ARABIC_INDIC_VERSION = "v\u0661.\u0663\u0661.\u0664"  # "v1.31.4" in Arabic-Indic digits: \\d takes them
STATE_FILE = "var/lib/lifecycle/state.json"


@pytest.fixture(autouse=True)
def _broker(mqtt_broker: tuple[str, int]) -> None:
    """Every test here needs the shared broker; fail with the command that starts it."""


def node_config(tmp_path: Path, root: Path) -> tuple[Path, str]:
    prefix = unique_prefix("hostile")
    config = write_config(tmp_path / "lifecycle.toml", root=tmp_path / "unused-root", node="unused", prefix=prefix,
                          broker="mqtt://127.0.0.1:1883")
    # A node address of its own: a `pki` request is checked against it (without one it is refused earlier).
    config.write_text(config.read_text().replace("kubelet_healthz_port = 0\n",
                                                 'kubelet_healthz_port = 0\nnode_ip = "10.0.0.5"\n', 1))
    root.mkdir(parents=True, exist_ok=True)
    return config, prefix


@asynccontextmanager
async def running_service(tmp_path: Path, root: Path) -> AsyncIterator[tuple[ServiceProcess, Probe]]:
    config, prefix = node_config(tmp_path, root)
    svc = start_service_process(config, root=root, node=NODE, log_path=tmp_path / "service.log")
    try:
        async with probe(Topics(prefix, NODE)) as p:
            await p.ready(timeout_s=10)
            yield svc, p
    finally:
        svc.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(svc.wait, 10)
        assert code == 0, svc.log()[-3000:]


async def assert_answers_status(p: Probe, svc: ServiceProcess, after: str) -> dict[str, Any]:
    try:
        reply = await p.ask({"id": "s-after", "action": "status"}, timeout_s=5)
    except TimeoutError:
        raise AssertionError(f"no status reply after {after}; service log:\n{svc.log()[-3000:]}") from None
    assert reply["ok"] and reply["status"]["node"] == NODE
    return reply


def garbage_pki(file_bytes: int) -> dict[str, str]:
    line = "-----BEGIN A-----\n"
    return {name: (line * (file_bytes // len(line) + 1))[:file_bytes] for name in KNOWN_FILES[:15]}


CRASHERS: list[tuple[str, bytes, str, str | None]] = [  # (defect, payload, code, id in the reply)
    ("10 deep nesting", b"[" * 10000, "malformed_json", None),
    ("10 deep nesting in a field", b'{"id": "d-1", "action": "status", "x": ' + b"[" * 5000 + b"}",
     "malformed_json", None),
    ("11 huge integer", b'{"id": "h-1", "action": "status", "n": ' + b"7" * 5000 + b"}", "invalid_request", None),
    ("12 surrogate id", b'{"id": "\\ud800", "action": "reset"}', "invalid_request", None),
    ("12 surrogate field", b'{"id": "u-1", "action": "reset", "note": "\\udfff"}', "invalid_request", "u-1"),
    ("15 Arabic-Indic digits",
     json.dumps({"id": "v-1", "action": "install", "kubernetes_version": ARABIC_INDIC_VERSION}, ensure_ascii=False)
     .encode(), "invalid_request", "v-1"),
    ("15 trailing newline", b'{"id": "v-2", "action": "install", "kubernetes_version": "v1.31.4\\n"}',
     "invalid_request", "v-2"),
    ("14 garbage pki", json.dumps({"id": "p-1", "action": "install", "pki": garbage_pki(16 * 1024)}).encode(),
     "invalid_pki", "p-1"),
]


async def test_crashers_are_refused_with_a_code_and_the_service_keeps_answering(tmp_path: Path) -> None:
    root = tmp_path / "root"
    async with running_service(tmp_path, root) as (svc, p):
        for defect, payload, code, request_id in CRASHERS:
            try:
                reply = await p.ask_raw(payload, timeout_s=5)
            except TimeoutError:
                raise AssertionError(f"{defect}: no reply; service log:\n{svc.log()[-3000:]}") from None
            assert (reply["ok"], reply["error"]["code"], reply["id"]) == (False, code, request_id), defect
            status = await assert_answers_status(p, svc, defect)
            assert status["state"] == "idle" and status["status"]["request_id"] is None, defect
        # 12 with no response topic: the refusal would go to a `reply_to` that cannot be encoded as a topic; it is
        # dropped with a log line, and the loop goes on.
        await p.send(b'{"id": "r-1", "action": "status", "reply_to": "r/\\ud800"}', response_topic=False)
        await assert_answers_status(p, svc, "a reply_to holding a surrogate")
        assert not (root / STATE_FILE).exists() and journal(root) == []
        assert svc.proc.poll() is None


async def test_empty_correlation_data_comes_back_as_sent(tmp_path: Path) -> None:
    async with running_service(tmp_path, tmp_path / "root") as (_svc, p):
        props = mqtt_properties(PacketTypes.PUBLISH)
        props.ResponseTopic = p.reply_topic
        props.CorrelationData = b""
        await p.client.publish(p.topics.requests, b'{"id": "c-0", "action": "status"}', qos=1, properties=props)
        reply = await p.wait_for(lambda m: m.topic == p.reply_topic, timeout_s=5)
        assert reply.json()["id"] == "c-0" and reply.correlation == b""


async def test_a_state_file_holding_a_lone_surrogate_no_longer_stops_the_start(tmp_path: Path) -> None:
    root = tmp_path / "root"
    state = root / STATE_FILE
    state.parent.mkdir(parents=True)
    # As the service used to save it after `{"id": "\ud800", "action": "reset"}` (json.dumps escapes it).
    state.write_text(json.dumps({"format": 1, "state": "idle", "since": time.time(), "seq": 4,
                                 "request_id": "\ud800", "kubernetes_version": None, "cluster": None,
                                 "step": None, "error": None}))
    async with running_service(tmp_path, root) as (svc, p):
        reply = await assert_answers_status(p, svc, "a start on a state file with a surrogate")
        assert reply["status"]["request_id"] == "\ufffd"


def fuzzed_requests(rng: random.Random, count: int) -> Iterator[bytes]:
    """Requests none of which may change anything: refused ones, or `status`/`kubeconfig` (read-only)."""
    atoms: list[Any] = [None, True, 0, -1, 1.5e308, "", "x" * 200, "\u0000", "\ud800", "\udc00x", "v1.31.4",
                        "v1.31.4\n", ARABIC_INDIC_VERSION, "x/#", "+", [], {}, "\u202e", "é" * 50]
    actions: list[Any] = ["status", "kubeconfig", "explode", "", 7, None, ["install"], "INSTALL"]

    def value(depth: int) -> Any:
        pick = rng.random()
        if depth > 3 or pick < 0.6:
            return rng.choice(atoms)
        if pick < 0.8:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {rng.choice(["id", "action", "pki", "k", "\ud800"]): value(depth + 1) for _ in range(rng.randrange(4))}

    for i in range(count):
        body: dict[str, Any] = {"id": f"f-{i}" if rng.random() < 0.8 else value(0)}
        for _ in range(rng.randrange(3)):
            body[rng.choice(["x", "kubernetes_version", "pki", "n"])] = value(0)
        if rng.random() < 0.5:
            body["action"] = rng.choice(actions)
        else:  # a mutating action, always with a broken field
            body["action"] = rng.choice(["install", "reset", "cancel", "renew-certs"])
            broken = rng.choice(["v1.31.4\n", ARABIC_INDIC_VERSION, 5, "x", [1]])
            body[rng.choice(["kubernetes_version", "pki"])] = broken
        text = json.dumps(body)
        cut = rng.random()
        if cut < 0.1:
            text = text[: rng.randrange(len(text))]
        elif cut < 0.15:
            text = "[" * rng.randrange(900, 3000) + text
        elif cut < 0.2:
            text = text.replace("}", f', "big": {"9" * rng.randrange(4300, 6000)}}}', 1)
        yield text.encode("utf-8", "surrogatepass") if rng.random() < 0.05 else text.encode("utf-8")


async def test_a_batch_of_fuzzed_requests_is_all_answered_and_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    payloads = list(fuzzed_requests(random.Random(8), 300))
    async with running_service(tmp_path, root) as (svc, p):
        sent = [await p.send(payload) for payload in payloads]
        await assert_answers_status(p, svc, "the fuzzed batch")
        replies = {m.correlation: m.json() for m in p.seen if m.topic == p.reply_topic}
        unanswered = [payloads[i][:80] for i, c in enumerate(sent) if c not in replies]
        assert unanswered == [], f"{len(unanswered)} unanswered, e.g. {unanswered[:3]}"
        assert all(r["ok"] is False or r.get("status") is not None for r in replies.values() if r["id"] != "s-after")
        assert not (root / STATE_FILE).exists() and journal(root) == []
        assert svc.proc.poll() is None


class _BuggyBridge(MqttBridge):
    """A bridge whose outbox loop has a bug: what any unexpected exception in the request loop amounts to."""

    async def _drain_outbox(self, client: aiomqtt.Client) -> None:
        raise RuntimeError("a bug in the bridge")


def test_a_request_loop_killed_by_a_bug_ends_the_process_non_zero_after_saying_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lifecycle.__main__ import EXIT_BRIDGE_FAILED  # here: the other tests still run on code without it

    monkeypatch.setattr(service, "MqttBridge", _BuggyBridge)
    config = service_config(tmp_path, prefix=unique_prefix("buggy"))
    started = time.monotonic()
    code = run_service(config, plan=fake_plan(), reset=fake_reset, ports_factory=null_ports)
    assert code == EXIT_BRIDGE_FAILED and time.monotonic() - started < 10  # not alive and deaf: restartable
    # Its pidfd child watcher is process-wide: left set, it would warn of the children of every later loop.
    assert not isinstance(asyncio.get_child_watcher(), asyncio.PidfdChildWatcher), "the service's watcher stayed"
    topics = Topics(config.mqtt.prefix, config.node_name)
    assert asyncio.run(retained(topics.availability)) == b"offline"
