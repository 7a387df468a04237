"""`parse_request` under generated input (issue 8, defects 10-12, 15): whatever the bytes, it returns a Request or
raises its own refusal (BadRequestError with a documented code), and what it returns can always be encoded into
a reply, an event, a status or the state file. PEM parsing of a `pki` bundle stays linear (defect 14)."""

from __future__ import annotations

import json
import time
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from lifecycle.pki_bundle import KNOWN_FILES, parse_bundle
from lifecycle.protocol import Action, BadRequestError, Reply, Request, dumps, parse_request

# The codes docs/protocol.md lists for a refused request.
DOCUMENTED_CODES = {"malformed_json", "invalid_request", "unknown_action", "payload_too_large", "invalid_pki",
                    "invalid_reply_to"}

# Every code point, lone surrogates included (JSON can carry them as `\ud800` escapes).
any_text = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=20,
)
field_values = st.one_of(json_values, st.sampled_from([a.value for a in Action]),
                         st.sampled_from(["v1.31.4", "v1.31.4\n", "v\u0661.\u0663\u0661.\u0664", "v1.31", "x/#"]))
requests = st.dictionaries(
    st.sampled_from(["id", "action", "kubernetes_version", "reply_to", "pki", "extra"]), field_values, max_size=6,
)


def assert_parses_or_refuses(payload: bytes) -> Request | None:
    try:
        request = parse_request(payload)
    except BadRequestError as exc:
        assert exc.code in DOCUMENTED_CODES, exc.code
        reply = Reply(id=exc.request_id, ok=False, state="idle", error=(exc.code, exc.message))
        dumps(reply.to_json()).decode("utf-8")  # the refusal itself is sendable
        return None
    # What is kept of a request (its id in replies, status and state.json) must encode as UTF-8.
    request.id.encode("utf-8")
    dumps(Reply(id=request.id, ok=True, state="idle", request_id=request.id).to_json()).decode("utf-8")
    return request


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
@example(b"[" * 10000)
@example(b'{"id": "a", "action": "status", "n": ' + b"1" * 5000 + b"}")
@example(b'{"id": "\\ud800", "action": "reset"}')
@example(b'{"id": ' + b"[" * 990 + b"]" * 990 + b', "action": "status"}')
def test_any_bytes_parse_or_are_refused_with_a_documented_code(payload: bytes) -> None:
    assert_parses_or_refuses(payload)


@settings(max_examples=600, deadline=None)
@given(requests, st.booleans())
@example({"id": "i", "action": "install", "kubernetes_version": "v1.31.4\n"}, True)
@example({"id": "i", "action": "install", "kubernetes_version": "v\u0661.\u0663\u0661.\u0664"}, False)
@example({"id": "i", "action": "reset", "extra": ["\udfff"]}, True)
def test_any_json_request_parses_or_is_refused_and_what_is_kept_encodes(body: dict[str, Any], ascii: bool) -> None:
    payload = json.dumps(body, ensure_ascii=ascii).encode("utf-8", "surrogatepass")
    request = assert_parses_or_refuses(payload)
    if request is not None and request.kubernetes_version is not None:
        assert request.kubernetes_version.isascii() and "\n" not in request.kubernetes_version


def test_pem_scanning_of_a_pki_bundle_is_linear_in_its_size() -> None:
    """15 files of repeated BEGIN lines: 8x the bytes may cost about 8x the CPU, not 64x (the old regex
    rescanned to the end at every BEGIN). A ratio, not a time: the machine may be busy."""

    def cpu_s(file_bytes: int) -> float:
        line = "-----BEGIN A-----\n"
        raw = {name: (line * (file_bytes // len(line) + 1))[:file_bytes] for name in KNOWN_FILES[:15]}
        best = float("inf")
        for _ in range(3):
            started = time.process_time()
            files, problems = parse_bundle(raw)
            best = min(best, time.process_time() - started)
            assert files == {} and len(problems) >= 15
        return best

    small, large = cpu_s(2 * 1024), cpu_s(16 * 1024)
    assert large / max(small, 1e-4) < 24, (small, large)
