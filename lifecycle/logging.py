"""Structured logs: one JSON object per line on stderr, bound to request id and state by the engine.

Key material never reaches a log line: fields named like secrets are masked and any value that carries a PEM
private key is replaced, whatever its field name. Records of other libraries (stdlib logging: asyncio's "task
exception was never retrieved", paho) and uncaught tracebacks go through the same scrubbing.
"""

from __future__ import annotations

import logging
import sys
from collections import deque
from collections.abc import MutableMapping
from types import TracebackType
from typing import Any, TextIO

import structlog

from lifecycle.protocol import scrub

_SECRET_FIELD_PARTS = ("password", "private_key", "secret", "token", "key_pem", "client_key")
_PEM_MARKERS = ("PRIVATE KEY-----", "PRIVATE KEY -----")
# The service logs to stderr only (the journal on a systemd host): the last lines are also kept here, already
# redacted, for `lifecycle diagnose` (lifecycle.diagnose), which cannot read the journal.
RECENT_LOG_LINES: deque[str] = deque(maxlen=2000)
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


def _keep_recent(_logger: Any, _method: str, line: Any) -> Any:
    """After the renderer: keep the rendered line for `diagnose`, pass it on unchanged."""
    if isinstance(line, str):
        RECENT_LOG_LINES.append(line)
    return line


class ScrubbingFormatter(logging.Formatter):
    """Stdlib records as text with PEM private keys cut out (the message, its arguments and the traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        text: str = scrub(super().format(record))
        return text


def _scrubbing_excepthook(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    import traceback

    sys.stderr.write(scrub("".join(traceback.format_exception(kind, value, tb))))


def _route_stdlib_logging(level: str, stream: TextIO | None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(ScrubbingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h.formatter, ScrubbingFormatter)]:
        root.removeHandler(old)  # idempotent
    root.addHandler(handler)
    root.setLevel(max(_LEVELS.get(level, logging.INFO), logging.WARNING))  # other libraries: warnings and up
    sys.excepthook = _scrubbing_excepthook


def configure_logging(level: str = "info", *, stream: TextIO | None = None) -> None:
    """Route structlog to JSON lines on `stream` (default stderr), and stdlib logging and uncaught tracebacks
    through the same key scrubbing; idempotent."""
    _route_stdlib_logging(level, stream)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_secrets,  # after format_exc_info: a traceback may quote a key, too
            structlog.processors.JSONRenderer(),
            _keep_recent,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str, **bound: Any) -> Any:
    return structlog.get_logger(name).bind(**bound)
