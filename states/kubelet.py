"""kubelet: starts the kubelet as kubeadm's systemd drop-in would (flags from kubeadm-flags.env), supervised.
Leaves a running kubelet (pid file of the supervisor) logging to `<log_dir>/kubelet.log`.
Done when the supervisor's kubelet runs, was started from the binary now in place (not one replaced since), and
answers http://127.0.0.1:<healthz port>/healthz.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from lifecycle.errors import PermanentError, TemporaryError
from lifecycle.paths import HostPaths
from lifecycle.step import StepContext, fail_at

_POLL_S = 0.2
_HEALTHZ_TIMEOUT_S = 2.0
_LOG_TAIL_BYTES = 4096


class Kubelet:
    """Starts the kubelet through `ctx.ports.kubelet` and waits for its /healthz."""

    name = "kubelet"
    timeout_s = 120.0
    retries = 2  # starting is idempotent: the supervisor keeps (or adopts) the one kubelet

    async def is_done(self, ctx: StepContext) -> bool:
        if not ctx.ports.kubelet.is_running():
            return False
        if ctx.ports.kubelet.binary_replaced():  # healthy, but the old code: an upgrade left it, say
            return False
        healthy, _ = await healthz(ctx.cluster.kubelet_healthz_port)
        return healthy

    async def run(self, ctx: StepContext) -> None:
        argv = kubelet_argv(ctx.paths)
        log_path = ctx.paths.log_dir / "kubelet.log"
        restarts_before = ctx.ports.kubelet.restarts
        if ctx.ports.kubelet.binary_replaced():  # only of a kubelet that runs
            ctx.progress(f"restarting the kubelet: {argv[0]} was replaced since it started")
        ctx.progress("starting the kubelet")
        try:
            await ctx.ports.kubelet.start(argv, log_path=log_path)
        except OSError as exc:
            raise PermanentError(f"cannot start {argv[0]}: {exc}", code="kubelet_start_failed") from exc
        await self._wait_healthy(ctx, log_path=log_path, restarts_before=restarts_before)
        ctx.progress("kubelet healthy")

    async def before_retry(self, ctx: StepContext) -> None:
        return None  # the supervisor keeps restarting a kubelet that died; a retry just waits again

    async def _wait_healthy(self, ctx: StepContext, *, log_path: Path, restarts_before: int) -> None:
        loop = asyncio.get_running_loop()
        port = ctx.cluster.kubelet_healthz_port
        started_at = loop.time()
        give_up_at = fail_at(ctx)
        while True:
            healthy, detail = await healthz(port, timeout_s=min(_HEALTHZ_TIMEOUT_S, max(0.1, give_up_at - loop.time())))
            if healthy:
                return
            if ctx.ports.kubelet.restarts > restarts_before:
                # It died before ever being healthy: its own last words say why better than a timeout would.
                raise TemporaryError(
                    f"the kubelet exited before it was healthy; {log_path} ends with:\n{_tail(log_path)}",
                    code="kubelet_exited",
                )
            if loop.time() + _POLL_S >= give_up_at:
                waited_s = loop.time() - started_at
                raise TemporaryError(
                    f"kubelet not healthy on http://127.0.0.1:{port}/healthz after {waited_s:.0f}s ({detail}); "
                    f"{log_path} ends with:\n{_tail(log_path)}",
                    code="kubelet_unhealthy",
                )
            await asyncio.sleep(_POLL_S)


class StartsBeforeTheLoop(Protocol):
    """lifecycle.adapters.kubelet.ProcessKubeletSupervisor.start_now"""

    def start_now(self, argv: Sequence[str], *, log_path: Path, env: Mapping[str, str]) -> bool: ...


def start_at_boot(paths: HostPaths, kubelet: StartsBeforeTheLoop, *, env: Mapping[str, str]) -> tuple[bool, str]:
    """The first act of a boot (the saved state `running`, lifecycle.__main__), before the service has imported the
    rest of itself: the kubelet started on the files the node last ran on, when the cheapest local evidence vouches
    for them: the kubelet binary has the size and mtime recorded when its sha256 last held (states.binaries) and
    kubeadm's flags file is there. Every other check follows in the boot job (lifecycle.engine `_boot`), which
    finds this kubelet running; what it finds not holding is repaired with the kubelet running, as after the
    background check. Whether it started one, and what was done, for the log."""
    from states.binaries import unchanged_since_checked  # here: a boot that does not start early never pays for it

    binary = paths.binary("kubelet")
    if not unchanged_since_checked(paths, "/" + str(binary.relative_to(paths.root))):
        return False, "not started early: the kubelet binary is not as its last full check left it"
    try:
        argv = kubelet_argv(paths)
    except PermanentError as exc:
        return False, f"not started early: {exc.message}"
    try:
        started = kubelet.start_now(argv, log_path=paths.log_dir / "kubelet.log", env=env)
    except OSError as exc:  # the kubelet step tries again and reports it
        return False, f"not started early: {exc}"
    return started, "kubelet started before the service's checks" if started else "a kubelet was already running"


def kubelet_argv(paths: HostPaths) -> list[str]:
    """The command line of kubeadm's systemd drop-in (10-kubeadm.conf), with rooted paths."""
    kubelet = paths.binary("kubelet")
    if not kubelet.is_file():
        raise PermanentError(f"{kubelet} is missing (the binaries state copies it)", code="kubelet_missing")
    return [
        str(kubelet),
        f"--bootstrap-kubeconfig={paths.kubeconfig('bootstrap-kubelet.conf')}",
        f"--kubeconfig={paths.kubeconfig('kubelet.conf')}",
        f"--config={paths.kubelet_config}",
        *kubeadm_flags(paths.kubeadm_flags_env),
    ]


def kubeadm_flags(flags_env: Path) -> list[str]:
    """KUBELET_KUBEADM_ARGS from kubeadm-flags.env, split the way systemd expands `$KUBELET_KUBEADM_ARGS`."""
    try:
        text = flags_env.read_text()
    except FileNotFoundError:
        raise PermanentError(f"{flags_env} is missing (kubeadm's kubelet-start phase writes it)",
                             code="kubelet_flags_missing") from None
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key == "KUBELET_KUBEADM_ARGS":
            try:
                unquoted = " ".join(shlex.split(value))
                return shlex.split(unquoted)
            except ValueError as exc:
                raise PermanentError(f"{flags_env}: KUBELET_KUBEADM_ARGS cannot be parsed: {exc}",
                                     code="kubelet_flags_invalid") from exc
    raise PermanentError(f"{flags_env}: no KUBELET_KUBEADM_ARGS line", code="kubelet_flags_invalid")


async def healthz(port: int, *, timeout_s: float = _HEALTHZ_TIMEOUT_S) -> tuple[bool, str]:
    """GET http://127.0.0.1:<port>/healthz: (True, "ok") on 200, else (False, what went wrong)."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                await writer.drain()
                answer = await reader.read(65536)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        return False, f"no answer within {timeout_s:.1f}s"
    except OSError as exc:
        return False, os_error_text(exc)
    status_line = answer.split(b"\r\n", 1)[0].decode(errors="replace")
    parts = status_line.split(" ", 2)
    if len(parts) >= 2 and parts[1] == "200":
        return True, "ok"
    return False, f"answered {status_line!r}" if status_line else "closed without answering"


def os_error_text(exc: OSError) -> str:
    """`connection refused` rather than asyncio's `Connect call failed ('127.0.0.1', 10248)` (its strerror)."""
    return os.strerror(exc.errno).lower() if exc.errno else str(exc)


def _tail(log_path: Path) -> str:
    try:
        with open(log_path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - _LOG_TAIL_BYTES))
            data = f.read()
    except FileNotFoundError:
        return "(no log)"
    lines = data.decode(errors="replace").splitlines()
    return "\n".join(lines[-10:]) if lines else "(empty log)"
