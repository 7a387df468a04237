"""The public MQTT contract as data: topics, requests, replies, the retained status and CloudEvents.

Pure data and parsing, no I/O. `docs/protocol.md` and `docs/schemas/` describe the same contract for clients;
later versions may add fields and event types, never remove them.
"""

from __future__ import annotations

import json
import re
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from lifecycle.errors import RequestError

MAX_PAYLOAD_BYTES = 64 * 1024
MAX_PKI_PAYLOAD_BYTES = 256 * 1024  # a request carrying `pki` (a PKI bundle) may be this large
MAX_ID_CHARS = 128
MAX_TOPIC_CHARS = 1024  # a reply topic's limit: far below MQTT's 65535 bytes (4 bytes a character at most)
# mosquitto: src/mosquitto_broker_internal.h TOPIC_HIERARCHY_LIMIT, the most '/' a topic the broker accepts may have
MAX_TOPIC_SEPARATORS = 200
# [0-9], not \d (which takes any Unicode digit, e.g. Arabic-Indic), and used with fullmatch (`$` lets a
# trailing newline through).
_VERSION_RE = re.compile(r"v[0-9]+\.[0-9]+\.[0-9]+")
# A lone UTF-16 surrogate (a `\ud800` escape in JSON without its pair) decodes into a str that cannot be
# encoded as UTF-8: every reply, event, status or state file quoting it would fail to encode.
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
MAX_INT_DIGITS = sys.int_info.default_max_str_digits  # 4300: Python refuses to convert longer digit strings
_PEM_KEY_RE = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.S)
REDACTED_KEY = "[private key redacted]"


class Action(StrEnum):
    INSTALL = "install"
    RESET = "reset"
    STATUS = "status"
    CANCEL = "cancel"
    KUBECONFIG = "kubeconfig"
    RENEW_CERTS = "renew-certs"
    DIAGNOSE = "diagnose"
    STOP = "stop"
    START = "start"
    UPGRADE = "upgrade"


# The `lifecycle.step.progress` message that ends a stop: its change to `stopped` comes first, before the processes
# are ended (a stop cut short by a kill is then made again by the next start, which stays stopped).
STOPPED_MESSAGE = "stopped: no process of the node runs"


class EventType(StrEnum):
    STATE_CHANGED = "lifecycle.state.changed"
    STEP_PROGRESS = "lifecycle.step.progress"
    STEP_RETRYING = "lifecycle.step.retrying"
    STEP_FAILED = "lifecycle.step.failed"
    STEP_SLOW = "lifecycle.step.slow"
    CERTS_EXPIRING = "lifecycle.certs.expiring"
    CERTS_RENEWED = "lifecycle.certs.renewed"
    EXPOSURE_ADDED = "lifecycle.exposure.added"
    EXPOSURE_REMOVED = "lifecycle.exposure.removed"
    EXPOSURE_CONFLICT = "lifecycle.exposure.conflict"
    EXPOSURE_SKIPPED = "lifecycle.exposure.skipped"


@dataclass(frozen=True)
class Topics:
    prefix: str
    node: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.node}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    @property
    def availability(self) -> str:
        return f"{self.base}/availability"

    @property
    def requests(self) -> str:
        return f"{self.base}/requests"

    @property
    def exposures(self) -> str:
        """Retained: the LoadBalancer ports the host opens (docs/schemas/exposures.schema.json, lifecycle.forward)."""
        return f"{self.base}/exposures"

    @property
    def replies(self) -> str:
        """Replies may go below this (the deploy ACL lets only the host backend read them)."""
        return f"{self.base}/replies"

    @property
    def private_replies(self) -> str:
        """Replies may also go below this, outside `<prefix>/#`: what the CLI uses, so that an observer of
        `<prefix>/#` on an open broker does not get a kubeconfig by default."""
        return f"{self.prefix}-replies/{self.node}"

    def reply_topic_problem(self, topic: str) -> str | None:
        """Why a reply may not go to `topic` (a request's response topic or `reply_to`), or None.

        Only below `replies` or `private_replies`: never onto this node's or another node's status, events,
        availability or requests, nor anywhere else a requester might want to write with the service's rights."""
        problem = topic_problem(topic)
        if problem is not None:
            return problem
        if any(topic.startswith(f"{root}/") and len(topic) > len(root) + 1
               for root in (self.replies, self.private_replies)):
            return None
        return f"is not below {self.replies}/ or {self.private_replies}/, where replies go"

    @property
    def source(self) -> str:
        """CloudEvents `source` of every event this node emits."""
        return f"/{self.base}"


def iso_time(epoch_s: float) -> str:
    """RFC 3339 UTC with milliseconds, as the status uses it."""
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_time(epoch_s: float) -> str:
    """RFC 3339 UTC with microseconds: an event's `time`. A subscriber timing delivery (arrival - `time`, a few
    milliseconds here: bench/bench_event_latency.py) needs more than milliseconds."""
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


# ---- requests -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    id: str
    action: Action
    kubernetes_version: str | None = None
    reply_to: str | None = None
    # `install` only: the host's PKI bundle as sent (file name -> PEM text; checked by lifecycle.pki_bundle).
    # Holds private keys: never printed, never kept beyond the request.
    pki: dict[str, Any] | None = field(default=None, repr=False, compare=False)


class BadRequestError(RequestError):
    """A request that cannot be acted on; carries what could still be read of it, to address the reply."""

    def __init__(self, code: str, message: str, *, request_id: str | None = None, reply_to: str | None = None):
        super().__init__(code, message)
        self.request_id = request_id
        self.reply_to = reply_to


def _shown(value: object) -> str:
    """A value as quoted in an error message, cut short: the message goes back to the sender and to the log."""
    text = scrub(repr(value))
    return text if len(text) <= 80 else f"{text[:77]}..."


def _refused_code_point(code_point: int) -> bool:
    """What Mosquitto refuses in any MQTT string. mosquitto: lib/utf8_mosq.c, mosquitto_validate_utf8: NUL and
    the other C0 controls, DEL and the C1 controls, UTF-16 surrogates, the noncharacters U+FDD0..U+FDEF and
    U+xFFFE/U+xFFFF of every plane (U+FFFE, U+FFFF, U+10FFFF, ...)."""
    return (code_point <= 0x1F or 0x7F <= code_point <= 0x9F or 0xD800 <= code_point <= 0xDFFF
            or 0xFDD0 <= code_point <= 0xFDEF or (code_point & 0xFFFE) == 0xFFFE)


def topic_problem(topic: str) -> str | None:
    """Why Mosquitto would refuse `topic` in a PUBLISH, or None.

    A client publishing such a topic is disconnected for a malformed packet, and a QoS 1 reply is re-sent after
    every reconnect: the service would be deaf until restarted. mosquitto: lib/util_topic.c,
    mosquitto_pub_topic_check2 (no `+`/`#`, at most 65535 bytes, at most TOPIC_HIERARCHY_LIMIT '/' in the broker)
    and lib/packet_datatypes.c, packet__read_string -> mosquitto_validate_utf8; MQTT 5.0 sections 1.5.4 and
    4.7 (non-empty, no wildcards in a topic name, no U+0000)."""
    if not topic:
        return "is empty"
    if len(topic) > MAX_TOPIC_CHARS:
        return f"is longer than {MAX_TOPIC_CHARS} characters"
    if "+" in topic or "#" in topic:
        return "has a wildcard (+ or #)"
    if topic.count("/") > MAX_TOPIC_SEPARATORS:
        return f"has more than {MAX_TOPIC_SEPARATORS} '/'"
    refused = next((c for c in topic if _refused_code_point(ord(c))), None)
    if refused is not None:
        return f"has U+{ord(refused):04X}, which MQTT brokers refuse in a topic"
    return None


def valid_reply_topic(topic: str) -> bool:
    """A topic an MQTT broker accepts (where it may go is `Topics.reply_topic_problem`'s business)."""
    return topic_problem(topic) is None


def parse_request(payload: bytes) -> Request:
    """Decode one request; raise `BadRequestError` (a `RequestError`) naming what is wrong.

    Unknown fields are ignored so that newer clients can talk to this service. The size is checked before
    parsing (the larger limit, for requests carrying `pki`) and after (the normal limit for the others).
    """
    if len(payload) > MAX_PKI_PAYLOAD_BYTES:
        raise BadRequestError("payload_too_large",
                              f"request is {len(payload)} bytes, the limit is {MAX_PKI_PAYLOAD_BYTES} (with 'pki')")
    twice: list[str] = []  # keys named twice in one object, at any depth

    def object_of(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                twice.append(key)
            obj[key] = value
        return obj

    try:
        raw = json.loads(payload.decode("utf-8"), object_pairs_hook=object_of)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequestError("malformed_json", f"request is not UTF-8 JSON: {exc}") from None
    except ValueError:  # the one other ValueError json.loads raises: Python's int-string conversion limit
        raise BadRequestError("invalid_request", f"request holds an integer of more than {MAX_INT_DIGITS} "
                                                 "digits") from None
    except RecursionError:  # the C decoder's guard against deep nesting ("[" * 10000)
        raise BadRequestError("malformed_json", "request is nested too deeply") from None
    try:
        return _parse_object(raw, size_bytes=len(payload), keys_twice=twice)
    except RecursionError:  # e.g. quoting a value nested almost as deep as the decoder allows
        raise BadRequestError("invalid_request", "request is nested too deeply") from None


def has_lone_surrogate(value: object) -> bool:
    """True if a string anywhere in `value` (keys too) holds a UTF-16 surrogate code point."""
    stack = [value]
    while stack:  # no recursion: `value` may be nested as deep as the JSON decoder allows
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE_RE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _parse_object(raw: object, *, size_bytes: int, keys_twice: Sequence[str]) -> Request:
    if not isinstance(raw, dict):
        raise BadRequestError("invalid_request", f"request must be a JSON object, got {type(raw).__name__}")
    if size_bytes > MAX_PAYLOAD_BYTES and raw.get("pki") is None:
        raise BadRequestError("payload_too_large", f"request is {size_bytes} bytes, the limit is "
                                                   f"{MAX_PAYLOAD_BYTES} ({MAX_PKI_PAYLOAD_BYTES} with 'pki')")
    request_id = raw.get("id")
    readable_id = (request_id if isinstance(request_id, str) and 0 < len(request_id) <= MAX_ID_CHARS
                   and not _SURROGATE_RE.search(request_id) else None)
    reply_to = raw.get("reply_to")
    readable_reply_to = reply_to if isinstance(reply_to, str) and valid_reply_topic(reply_to) else None

    def bad(code: str, message: str) -> BadRequestError:
        return BadRequestError(code, message, request_id=readable_id, reply_to=readable_reply_to)

    if readable_id is None:
        raise bad("invalid_request", f"'id' must be a string of 1..{MAX_ID_CHARS} characters (no lone UTF-16 "
                                     f"surrogate), got {_shown(request_id)}")
    if reply_to is not None and readable_reply_to is None:
        raise bad("invalid_reply_to", f"'reply_to' must be a topic without wildcards or control characters, "
                                      f"got {_shown(reply_to)}")
    if keys_twice:  # JSON leaves it open which one counts (RFC 8259, 4): a reader before us may have taken the other
        raise bad("invalid_request", f"the request names {_shown(keys_twice[0])} twice in one object")
    if has_lone_surrogate(raw):  # checked before any field is acted on: nothing of it may reach disk
        raise bad("invalid_request", "a string in the request holds a lone UTF-16 surrogate (\\ud800-\\udfff)")
    action = raw.get("action")
    if not isinstance(action, str):
        raise bad("invalid_request", f"'action' must be a string, got {_shown(action)}")
    if action not in Action.__members__.values():
        known = ", ".join(a.value for a in Action)
        raise bad("unknown_action", f"unknown action {_shown(action)} (known: {known})")
    version = raw.get("kubernetes_version")
    if version is None and action == Action.UPGRADE:
        raise bad("invalid_request", "'upgrade' needs 'kubernetes_version', the version to upgrade to (v1.32.1)")
    if version is not None:
        if action not in (Action.INSTALL, Action.UPGRADE):
            raise bad("invalid_request", f"'kubernetes_version' only goes with 'install' and 'upgrade', not "
                                         f"{_shown(action)}")
        if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
            raise bad("invalid_request", f"'kubernetes_version' must look like v1.31.4, got {_shown(version)}")
    pki = raw.get("pki")
    if pki is not None:
        if action != Action.INSTALL:
            raise bad("invalid_request", f"'pki' only goes with 'install', not {_shown(action)}")
        if not isinstance(pki, dict):  # its content is never quoted: it is meant to hold private keys
            raise bad("invalid_pki", f"'pki' must be an object of file name -> PEM text, got {type(pki).__name__}")
    return Request(id=readable_id, action=Action(action), kubernetes_version=version, reply_to=readable_reply_to,
                   pki=pki)


# ---- replies, status, events ----------------------------------------------------------------------------


def scrub(value: Any) -> Any:
    """`value` with PEM private keys cut out: error texts carry command output, which must never leak a key.

    In a list of lines (an output tail) every line from a BEGIN ... PRIVATE KEY line to its END line goes."""
    if isinstance(value, str):
        return _PEM_KEY_RE.sub(REDACTED_KEY, value)
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        out: list[Any] = []
        inside = False
        for item in value:
            if isinstance(item, str) and "-----BEGIN" in item and "PRIVATE KEY-----" in item:
                inside = "-----END" not in item
                out.append(REDACTED_KEY)
            elif inside:
                inside = not (isinstance(item, str) and "-----END" in item)
            else:
                out.append(scrub(item))
        return out
    return value


@dataclass(frozen=True)
class ErrorInfo:
    """Why a step or a reset failed, as it appears in the status and in `lifecycle.step.failed`."""

    code: str
    message: str
    retryable: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "retryable": self.retryable, "details": self.details}

    @classmethod
    def safe(cls, code: str, message: str, retryable: bool = False, details: dict[str, Any] | None = None) -> ErrorInfo:
        """An ErrorInfo from text that came from outside (step errors, command output), with keys scrubbed."""
        return cls(code=code, message=scrub(message), retryable=retryable, details=scrub(dict(details or {})))

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ErrorInfo:
        details = raw.get("details") or {}
        if not isinstance(raw.get("code"), str) or not isinstance(raw.get("message"), str):
            raise TypeError("error needs string 'code' and 'message'")
        if not isinstance(details, dict):
            raise TypeError("error 'details' must be an object")
        return cls(code=raw["code"], message=raw["message"], retryable=bool(raw.get("retryable")), details=details)


@dataclass(frozen=True)
class CertsStatus:
    """The certificate that expires first (any in the PKI, a kubeconfig's or the kubelet's client certificate)."""

    earliest_expiry: float  # epoch seconds
    file: str  # "apiserver.crt", "etcd/server.crt", "admin.conf", "/var/lib/kubelet/pki/kubelet-client-current.pem"
    renew_at: float | None  # when automatic renewal is due (epoch seconds); None when disabled or impossible

    def to_json(self) -> dict[str, Any]:
        return {
            "earliest_expiry": iso_time(self.earliest_expiry),
            "file": self.file,
            "renew_at": iso_time(self.renew_at) if self.renew_at is not None else None,
        }


@dataclass(frozen=True)
class Status:
    node: str
    state: str
    since: float  # epoch seconds
    seq: int  # the last event's seq when this status was produced
    request_id: str | None
    kubernetes_version: str | None
    step: int | None  # 1-based index of the state's step in the plan (failed: the step that failed)
    steps: int
    error: ErrorInfo | None
    certs: CertsStatus | None = None  # None when there are no certificates (idle)
    # Configured keys that differ from the installed cluster's and wait for a reset: {key, installed, configured}
    config_drift: tuple[dict[str, Any], ...] = ()
    # The `state_seq` of the state change that led here (0 before the first), so that a host that subscribes late
    # can tell which `lifecycle.state.changed` this status reflects.
    state_seq: int = 0
    # Median seconds of each step's last successful runs (steps never run are absent), and, while the current
    # step runs longer than usual, what `lifecycle.step.slow` said: {state, elapsed_s, usual_s, runs}.
    usual_s: dict[str, float] = field(default_factory=dict)
    slow: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "state": self.state,
            "since": iso_time(self.since),
            "seq": self.seq,
            "state_seq": self.state_seq,
            "request_id": self.request_id,
            "kubernetes_version": self.kubernetes_version,
            "step": self.step,
            "steps": self.steps,
            "error": self.error.to_json() if self.error else None,
            "certs": self.certs.to_json() if self.certs else None,
            "config_drift": [dict(item) for item in self.config_drift],
            "usual_s": dict(self.usual_s),
            "slow": dict(self.slow) if self.slow is not None else None,
        }


@dataclass(frozen=True)
class Reply:
    id: str | None
    ok: bool
    state: str
    error: tuple[str, str] | None = None  # (code, message)
    request_id: str | None = None  # the install or reset this request joined or started
    note: str | None = None  # what happened, for people ("already running", ...)
    status: Status | None = None  # for `status`
    kubeconfig: str | None = field(default=None, repr=False)  # for `kubeconfig`: YAML holding the admin key
    message_expiry_s: int | None = None  # MQTT 5 message expiry of the reply (not in the payload)
    # `diagnose`: the bundle's chunks (lifecycle.diagnose.chunk); the reply goes out once per chunk, with it as
    # `chunk`.
    chunks: tuple[dict[str, Any], ...] = field(default=(), repr=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "ok": self.ok,
            "state": self.state,
            "error": {"code": self.error[0], "message": scrub(self.error[1])} if self.error else None,
        }
        if self.request_id is not None:
            out["request_id"] = self.request_id
        if self.note is not None:
            out["note"] = self.note
        if self.status is not None:
            out["status"] = self.status.to_json()
        if self.kubeconfig is not None:
            out["kubeconfig"] = self.kubeconfig  # the one payload allowed to carry a key (base64, in YAML)
        return out


@dataclass(frozen=True)
class Event:
    """One CloudEvent; `seq` is also in `data` (increases by one per event, across restarts)."""

    type: EventType
    seq: int
    data: dict[str, Any]
    time_s: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_cloudevent(self, source: str) -> dict[str, Any]:
        return {
            "specversion": "1.0",
            "id": self.id,
            "source": source,
            "type": self.type.value,
            "time": event_time(self.time_s),
            "datacontenttype": "application/json",
            "data": self.data,
        }


def dumps(obj: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON. Never fails on a lone surrogate (which requests are refused for, but a state file
    written before that may hold): it is then escaped as JSON allows (`\\ud800`), so the publish goes out."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":")).encode("ascii")
