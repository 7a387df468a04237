"""Structured logs: one JSON object per line on stderr, bound to request id and state by the engine.

Key material never reaches a log line: fields named like secrets are masked and any value that carries a PEM
private key is replaced, whatever its field name.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_SECRET_FIELD_PARTS = ("password", "private_key", "secret", "token", "key_pem", "client_key")
_PEM_MARKERS = ("PRIVATE KEY-----", "PRIVATE KEY -----")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _contains_key_material(value: Any) -> bool:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return any(marker in value for marker in _PEM_MARKERS)
    if isinstance(value, dict):
        return any(_contains_key_material(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_contains_key_material(v) for v in value)
    return False


def redact_secrets(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for name, value in list(event_dict.items()):
        lowered = name.lower()
        if any(part in lowered for part in _SECRET_FIELD_PARTS) and value is not None:
            event_dict[name] = "[redacted]"
        elif _contains_key_material(value):
            event_dict[name] = "[redacted: private key material]"
    return event_dict


def configure_logging(level: str = "info", *, stream: TextIO | None = None) -> None:
    """Route structlog to JSON lines on `stream` (default stderr); idempotent."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_secrets,  # after format_exc_info: a traceback may quote a key, too
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str, **bound: Any) -> Any:
    return structlog.get_logger(name).bind(**bound)
