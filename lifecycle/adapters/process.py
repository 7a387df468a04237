"""Runs a command to completion, streaming its merged stdout+stderr line by line (`CommandRunner`).

The child runs in its own process group so that cancelling the caller kills it and everything it started;
nothing is left on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import deque
from collections.abc import Callable, Mapping, Sequence

from lifecycle.ports import CommandResult

_READ_CHUNK_BYTES = 64 * 1024
_MAX_LINE_CHARS = 16 * 1024  # a runaway line without newline is cut, not buffered without bound
_KILL_WAIT_S = 5.0


class SubprocessRunner:
    """`CommandRunner` on `asyncio.create_subprocess_exec`; argument lists only, never a shell."""

    async def run(
        self,
        argv: Sequence[str],
        *,
        on_line: Callable[[str], None] | None = None,
        env: Mapping[str, str] | None = None,
        tail_lines: int = 40,
    ) -> CommandResult:
        if not argv:
            raise ValueError("argv must name a program")
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            start_new_session=True,  # its own process group: one killpg reaches its children too
        )
        tail: deque[str] = deque(maxlen=max(tail_lines, 1))

        def emit(line: str) -> None:
            tail.append(line)
            if on_line is not None:
                on_line(line)

        try:
            assert proc.stdout is not None
            await _pump_lines(proc.stdout, emit)
            exit_code = await proc.wait()
        except BaseException:
            # Cancellation (deadline, reset) or a failing on_line: never leave the child running.
            await _kill_group(proc)
            raise
        return CommandResult(argv=tuple(argv), exit_code=exit_code, output_tail=tuple(tail)[-tail_lines:])


async def _pump_lines(stream: asyncio.StreamReader, emit: Callable[[str], None]) -> None:
    """Split the byte stream into lines ourselves: StreamReader.readline fails on lines over its limit."""
    pending = b""
    while True:
        chunk = await stream.read(_READ_CHUNK_BYTES)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            emit(_decode(raw))
        while len(pending) > _MAX_LINE_CHARS:
            emit(_decode(pending[:_MAX_LINE_CHARS]))
            pending = pending[_MAX_LINE_CHARS:]
    if pending:
        emit(_decode(pending))


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").rstrip("\r")


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    # Shielded so a second cancellation cannot leave a zombie behind.
    with contextlib.suppress(TimeoutError, ProcessLookupError):
        await asyncio.shield(asyncio.wait_for(proc.wait(), timeout=_KILL_WAIT_S))
