"""Request parsing and the shapes of replies, status and CloudEvents on the wire."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from lifecycle_fakes import fake_plan, fake_reset, make_config, null_ports, steer
from referencing import Registry, Resource

from lifecycle.bus import Bus
from lifecycle.config import StepPolicy
from lifecycle.durations import StepDurations
from lifecycle.engine import Engine
from lifecycle.exposures import ExposureSet
from lifecycle.exposurestate import exposures_from_services, skipped_ports
from lifecycle.paths import HostPaths
from lifecycle.protocol import (
    MAX_PAYLOAD_BYTES,
    REDACTED_KEY,
    Action,
    BadRequestError,
    CertsStatus,
    ErrorInfo,
    Event,
    EventType,
    Reply,
    Request,
    Status,
    Topics,
    iso_time,
    parse_request,
    scrub,
)
from lifecycle.service import RequestHandler, state_file
from lifecycle.step import StepContext


def test_a_full_install_request_parses() -> None:
    req = parse_request(b'{"id": "r1", "action": "install", "kubernetes_version": "v1.32.1", "reply_to": "a/b"}')
    assert (req.id, req.action, req.kubernetes_version, req.reply_to) == ("r1", Action.INSTALL, "v1.32.1", "a/b")


def test_unknown_fields_are_ignored_for_newer_clients() -> None:
    assert parse_request(b'{"id": "r1", "action": "status", "trace": {"x": 1}}').action == Action.STATUS


@pytest.mark.parametrize(
    ("payload", "code", "request_id"),
    [
        (b"", "malformed_json", None),
        (b"{", "malformed_json", None),
        (b"\xc3\x28", "malformed_json", None),
        (b"null", "invalid_request", None),
        (b'"install"', "invalid_request", None),
        (b'{"action": "install"}', "invalid_request", None),
        (b'{"id": "", "action": "install"}', "invalid_request", None),
        (b'{"id": ["r"], "action": "install"}', "invalid_request", None),
        (b'{"id": "r", "action": null}', "invalid_request", "r"),
        (b'{"id": "r", "action": "INSTALL"}', "unknown_action", "r"),
        (b'{"id": "r", "action": "upgrade"}', "invalid_request", "r"),
        (b'{"id": "r", "action": "upgrade", "kubernetes_version": "1.32"}', "invalid_request", "r"),
        (b'{"id": "r", "action": "upgrade-now"}', "unknown_action", "r"),
        (b'{"id": "r", "action": "install", "kubernetes_version": "1.31"}', "invalid_request", "r"),
        (b'{"id": "r", "action": "install", "kubernetes_version": true}', "invalid_request", "r"),
        (b'{"id": "r", "action": "reset", "kubernetes_version": "v1.31.4"}', "invalid_request", "r"),
        (b'{"id": "r", "action": "status", "reply_to": "a/+/b"}', "invalid_reply_to", "r"),
        (b'{"id": "r", "action": "status", "reply_to": ""}', "invalid_reply_to", "r"),
        (b'{"id": "r", "action": "status", "reply_to": 5}', "invalid_reply_to", "r"),
        # A key twice: which one counts is left open by JSON (a proxy may have checked the first; found by hand).
        (b'{"id": "r", "action": "status", "action": "reset"}', "invalid_request", "r"),
        (b'{"id": "r", "action": "install", "pki": {"ca": {"crt": "a", "crt": "b"}}}', "invalid_request", "r"),
    ],
)
def test_bad_requests_name_their_cause(payload: bytes, code: str, request_id: str | None) -> None:
    with pytest.raises(BadRequestError) as info:
        parse_request(payload)
    assert (info.value.code, info.value.request_id) == (code, request_id)
    assert info.value.message


def test_the_reply_address_of_a_bad_request_is_kept_when_readable() -> None:
    with pytest.raises(BadRequestError) as info:
        parse_request(b'{"id": "r", "action": "nope", "reply_to": "replies/7"}')
    assert info.value.reply_to == "replies/7"


def test_payload_limit_is_checked_before_parsing() -> None:
    ok = json.dumps({"id": "r", "action": "status", "pad": "x" * (MAX_PAYLOAD_BYTES - 60)}).encode()
    assert len(ok) <= MAX_PAYLOAD_BYTES and parse_request(ok).id == "r"
    with pytest.raises(BadRequestError) as info:
        parse_request(b"{" * (1024 * 1024))  # 1 MB: refused by size, not by the JSON parser
    assert info.value.code == "payload_too_large"


def test_wire_shapes() -> None:
    topics = Topics("lifecycle", "n1")
    assert (topics.status, topics.events, topics.availability, topics.requests) == (
        "lifecycle/n1/status", "lifecycle/n1/events", "lifecycle/n1/availability", "lifecycle/n1/requests")
    event = Event(type=EventType.STATE_CHANGED, seq=3, data={"seq": 3}, time_s=0.5, id="e3")
    assert event.to_cloudevent(topics.source) == {
        "specversion": "1.0", "id": "e3", "source": "/lifecycle/n1", "type": "lifecycle.state.changed",
        "time": "1970-01-01T00:00:00.500000Z", "datacontenttype": "application/json", "data": {"seq": 3}}
    status = Status(node="n1", state="failed", since=0.0, seq=9, request_id="r", kubernetes_version="v1.31.4",
                    step=2, steps=7, error=ErrorInfo("x", "y", details={"a": 1}))
    assert set(status.to_json()) == {"node", "state", "since", "seq", "request_id", "kubernetes_version", "step",
                                     "steps", "error", "certs", "config_drift", "state_seq", "usual_s", "slow"}
    assert status.to_json()["error"] == {"code": "x", "message": "y", "retryable": False, "details": {"a": 1}}
    reply = Reply(id=None, ok=False, state="idle", error=("malformed_json", "bad"))
    assert reply.to_json() == {"id": None, "ok": False, "state": "idle",
                               "error": {"code": "malformed_json", "message": "bad"}}
    assert iso_time(1_700_000_000.25) == "2023-11-14T22:13:20.250Z"


# ---- the documented JSON Schemas (docs/schemas) against what the code produces and accepts -------------------

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schemas"


def _validators() -> dict[str, Draft202012Validator]:
    schemas = {p.name.split(".")[0]: json.loads(p.read_text()) for p in SCHEMAS.glob("*.schema.json")}
    registry: Registry[Any] = Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema)) for schema in schemas.values()
    )
    return {name: Draft202012Validator(schema, registry=registry, format_checker=Draft202012Validator.FORMAT_CHECKER)
            for name, schema in schemas.items()}


async def _fake_renew(ctx: StepContext) -> list[str]:
    ctx.progress("renewed apiserver.crt", current=1, total=1, unit="files")
    return ["apiserver.crt"]


async def test_every_message_the_service_produces_matches_the_documented_schemas(tmp_path: Path) -> None:
    v = _validators()
    assert set(v) == {"request", "reply", "status", "event", "exposures"}  # exposures: tests/unit/test_exposures.py
    bus = Bus()
    sub = bus.subscribe("schemas")
    config = make_config(tmp_path, images=StepPolicy(timeout_s=5, retries=1, retry_delay_s=0))
    durations = StepDurations(tmp_path / "durations.json", slow_min_s=0.0)
    durations.record("binaries", 0.01)  # then it takes 0.1 s: lifecycle.step.slow, and `slow` in the status
    engine = Engine(config=config, paths=HostPaths(tmp_path), ports=null_ports(), plan=fake_plan(), reset=fake_reset,
                    store=state_file(HostPaths(tmp_path)), bus=bus, renew=_fake_renew, durations=durations)
    handler = RequestHandler(engine)
    steer(tmp_path, "images", fail="temporary", fail_times=1, progress=2)
    steer(tmp_path, "binaries", run_s=0.1)
    steer(tmp_path, "kubeadm", fail="command")
    replies = [await handler.handle(Request(id="r1", action=Action.INSTALL, kubernetes_version="v1.32.1"))]
    await engine.wait_job()
    steer(tmp_path, "kubeadm")
    replies.append(await handler.handle(Request(id="r2", action=Action.INSTALL)))
    await engine.wait_job()
    engine.report_certs(CertsStatus(2e9, "apiserver.crt", 1.9e9), expiring=[{
        "file": "apiserver.crt", "not_after": iso_time(2e9), "days_left": 29.5, "threshold_days": 30.0,
        "renew_at": iso_time(1.9e9)}])
    replies.append(await handler.handle(Request(id="renew", action=Action.RENEW_CERTS)))
    await engine.wait_job()
    lb = [{"metadata": {"namespace": "default", "name": name}, "spec": {"type": "LoadBalancer", "ports": [
        {"port": 8080, "protocol": "TCP", "nodePort": node_port}]}} for name, node_port in (("a", 31000), ("b", 31001))]
    engine.report_exposures(exposures_from_services(lb, node_ip="192.0.2.10"))  # added, conflict
    engine.report_exposures(exposures_from_services(lb[:1], node_ip="192.0.2.10"))  # removed, conflict resolved
    engine.report_skipped_ports(skipped_ports([{"metadata": {"namespace": "default", "name": "s"}, "spec": {
        "type": "LoadBalancer", "ports": [{"port": 9, "protocol": "SCTP", "nodePort": 31002}]}}]))
    for action in (Action.STATUS, Action.CANCEL, Action.INSTALL, Action.RESET):
        replies.append(await handler.handle(Request(id=f"x-{action}", action=action, kubernetes_version=None)))
    replies.append(await handler.handle(Request(id="bad", action=Action.INSTALL, kubernetes_version="v1.99.1")))
    replies.append(Reply(id=None, ok=False, state="idle", error=("malformed_json", "not JSON")))
    await engine.wait_job()

    items = []
    while len(sub):
        items.append(sub.pop())
    events = [i.to_cloudevent("/lifecycle/unit") for i in items if isinstance(i, Event)]
    statuses = [i.to_json() for i in items if isinstance(i, Status)]
    assert {e["type"] for e in events} == {t.value for t in EventType}
    for event in events:
        v["event"].validate(event)
    for status in statuses:
        v["status"].validate(status)
    assert any(status["slow"] for status in statuses) and statuses[-1]["usual_s"]
    exposures = [i.to_json() for i in items if isinstance(i, ExposureSet)]
    assert [len(e["exposures"]) for e in exposures] == [2, 1]
    for message in exposures:
        v["exposures"].validate(message)
    assert {r.ok for r in replies} == {True, False} and any(r.status for r in replies)
    for reply in replies:
        v["reply"].validate(reply.to_json())


@pytest.mark.parametrize(
    "payload",
    [
        b'{"id": "r", "action": "install"}',
        b'{"id": "r", "action": "install", "kubernetes_version": "v1.31.4", "reply_to": "a/b", "extra": 1}',
        b'{"id": "r", "action": "reset"}',
        b'{"id": "r", "action": "upgrade"}',
        b'{"id": "", "action": "status"}',
        b'{"id": "r", "action": "status", "reply_to": "a/#"}',
        b'{"id": "r", "action": "status", "reply_to": "a\\nb"}',
        b'{"id": "r", "action": "status", "reply_to": "a\\u0085b"}',
        b'{"id": "r", "action": "status", "reply_to": "a\\uffffb"}',
        b'{"id": "r", "action": "reset", "kubernetes_version": "v1.31.4"}',
        b'{"id": "r", "action": "install", "kubernetes_version": "1.31"}',
        b'{"action": "status"}',
        b"[]",
    ],
)
def test_the_request_schema_accepts_exactly_what_the_parser_accepts(payload: bytes) -> None:
    try:
        parse_request(payload)
        parsed = True
    except BadRequestError:
        parsed = False
    assert _validators()["request"].is_valid(json.loads(payload)) == parsed


def test_scrub_cuts_private_keys_out_of_text_and_line_lists() -> None:
    pem = "-----BEGIN PRIVATE KEY-----\nAAAAsecret\n-----END PRIVATE KEY-----"
    assert scrub(f"before\n{pem}\nafter") == f"before\n{REDACTED_KEY}\nafter"
    assert scrub({"tail": ["a", *pem.splitlines(), "b"], "n": 3}) == {"tail": ["a", REDACTED_KEY, "b"], "n": 3}
    assert scrub("-----BEGIN RSA PRIVATE KEY-----\ncut off") == REDACTED_KEY  # a truncated key goes too
    assert scrub("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----").startswith("-----BEGIN CERT")


def test_error_messages_quote_bad_values_cut_short() -> None:
    with pytest.raises(BadRequestError) as info:
        parse_request(json.dumps({"id": "x" * 5000, "action": "install"}).encode())
    assert info.value.code == "invalid_request" and len(info.value.message) < 160


def test_replies_may_go_only_below_the_node_reply_trees_and_to_topics_mosquitto_accepts() -> None:
    topics = Topics("lifecycle", "n1")
    for allowed in ("lifecycle-replies/n1/x", "lifecycle/n1/replies/a/b", "lifecycle-replies/n1/é/😀"):
        assert topics.reply_topic_problem(allowed) is None, allowed
    for refused in ("lifecycle/n1/status", "lifecycle/n1/events", "lifecycle/n1/availability", "lifecycle/n1/requests",
                    "lifecycle/n2/events", "lifecycle/n2/replies/x", "lifecycle-replies/n2/x", "lifecycle/n1/replies",
                    "lifecycle/n1/replies/", "lifecycle-replies/n1", "lifecycle-replies/n1x/y", "$SYS/x", "other/x",
                    "lifecycle-replies/n1/a\nb", "lifecycle-replies/n1/a\x7f", "lifecycle-replies/n1/\x9f",
                    "lifecycle-replies/n1/\ufdd0", "lifecycle-replies/n1/\U0001fffe", "lifecycle-replies/n1/\U0010ffff",
                    "lifecycle-replies/n1/\ud800", "lifecycle-replies/n1/+", "lifecycle-replies/n1/" + "x/" * 200):
        assert topics.reply_topic_problem(refused) is not None, repr(refused)
