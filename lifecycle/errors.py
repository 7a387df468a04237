"""Errors a step raises, classified so the engine knows whether repeating the step can help.

A temporary error carries the delay before the next attempt; a permanent one says retrying is useless.
A failed command carries its argv, exit code and output tail, so "kubeadm failed" comes with kubeadm's words.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class StepError(Exception):
    """A step could not do its work. `code` is a stable machine-readable word on the wire."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "step_failed",
        retryable: bool = False,
        delay_s: float = 0.0,
        details: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.retryable = retryable
        self.delay_s = delay_s
        self.details: dict[str, object] = dict(details or {})


class TemporaryError(StepError):
    """Repeating the step may succeed (a registry hiccup, a port not yet open)."""

    def __init__(
        self, message: str, *, code: str = "temporary", delay_s: float = 1.0,
        details: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message, code=code, retryable=True, delay_s=delay_s, details=details)


class PermanentError(StepError):
    """Repeating the step cannot help until something outside changes (bad input, missing image)."""

    def __init__(self, message: str, *, code: str = "permanent", details: Mapping[str, object] | None = None):
        super().__init__(message, code=code, retryable=False, details=details)


class CommandError(StepError):
    """An external command exited non-zero. The message ends with the last lines it printed."""

    def __init__(
        self,
        argv: Sequence[str],
        exit_code: int,
        output_tail: Sequence[str],
        *,
        retryable: bool = False,
        delay_s: float = 1.0,
        code: str = "command_failed",
    ) -> None:
        tail = "\n".join(output_tail)
        name = argv[0].rsplit("/", 1)[-1] if argv else "command"
        super().__init__(
            f"{name} exited with code {exit_code}" + (f":\n{tail}" if tail else ""),
            code=code,
            retryable=retryable,
            delay_s=delay_s,
            details={"argv": list(argv), "exit_code": exit_code, "output_tail": list(output_tail)},
        )
        self.argv = list(argv)
        self.exit_code = exit_code
        self.output_tail = list(output_tail)


class RequestError(Exception):
    """A request from outside is invalid; nothing was changed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class MetricsListenError(Exception):
    """The configured metrics address cannot be listened on (in use, not an address of this host): the start
    fails with it, as with a bad config, rather than running without the metrics the operator asked for."""
