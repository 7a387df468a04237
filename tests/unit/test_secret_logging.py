"""No private key reaches a log line: structlog fields and tracebacks, other libraries' stdlib records, uncaught
exceptions, and reply texts are scrubbed, whatever the key's PEM flavour."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator

import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lifecycle.logging import configure_logging, get_logger
from lifecycle.protocol import Reply


def _pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level, hook = list(root.handlers), root.level, sys.excepthook
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    try:
        yield stream
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        sys.excepthook = hook
        structlog.reset_defaults()


def _fail(exc: Exception) -> None:
    raise exc


def _body(pem: str) -> str:
    return pem.splitlines()[1]


def test_structlog_fields_and_tracebacks_lose_keys(log_stream: io.StringIO) -> None:
    pem = _pem()
    log = get_logger("test")
    log.info("something", output=f"kubeadm said\n{pem}", data={"nested": [pem]})
    try:
        _fail(ValueError(f"bad file content: {pem}"))
    except ValueError:
        log.exception("it failed")
    text = log_stream.getvalue()
    assert "it failed" in text and "something" in text
    assert "PRIVATE KEY" not in text and _body(pem) not in text


def test_other_libraries_records_and_uncaught_tracebacks_lose_keys(
    log_stream: io.StringIO, capsys: pytest.CaptureFixture[str]
) -> None:
    pem = _pem()
    logging.getLogger("asyncio").error("Task exception was never retrieved: %s", pem)
    try:
        _fail(RuntimeError(pem))
    except RuntimeError as exc:
        logging.getLogger("paho").warning("callback failed", exc_info=exc)
        sys.excepthook(type(exc), exc, exc.__traceback__)
    text = log_stream.getvalue() + capsys.readouterr().err
    assert "Task exception was never retrieved" in text and "RuntimeError" in text
    assert "PRIVATE KEY" not in text and _body(pem) not in text


def test_reply_texts_lose_keys() -> None:
    pem = _pem()
    reply = Reply(id="r", ok=False, state="idle", error=("internal", f"ValueError: {pem}"))
    assert "PRIVATE KEY" not in str(reply.to_json()) and _body(pem) not in str(reply.to_json())
