"""The wait for the control plane that `kubeadm init` does in its wait-control-plane phase, done by the service.

kubeadm v1.31-v1.33 hide that phase (no `kubeadm init phase wait-control-plane`: cmd/kubeadm/app/cmd/phases/init/
waitcontrolplane.go, `Hidden: true` until WaitForAllControlPlaneComponents is GA in v1.34), so the readiness
state waits as it would: the kubelet's /healthz on the configured healthz port, then the API server's /readyz
with admin.conf's credentials (loaded from memory: `lifecycle.tls`). Writes nothing; every probe runs on the event
loop without blocking it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from lifecycle.errors import PermanentError, TemporaryError
from lifecycle.kubefiles import KubeconfigContent, parse_kubeconfig
from lifecycle.pki import rooted_reader
from lifecycle.step import StepContext, fail_at
from lifecycle.tls import client_context
from states.kubelet import healthz, os_error_text

POLL_INTERVAL_S = 0.2  # a local probe; each period is time added to a start or an install (issue 10)
REPORT_EVERY_S = 5.0  # while waiting, say what the last answer was: a stuck wait looks different from a slow one
PROBE_TIMEOUT_S = 2.0
_ANSWER_MAX_BYTES = 65536
# Versions before lifecycle.tls wrote admin.conf's key for a moment to a 0700 dir of this name in the state dir.
SCRATCH_PREFIX = "readyz-credentials-"

Probe = Callable[[float], Awaitable[tuple[bool, str]]]  # timeout_s -> (ok, what was seen)


async def wait_control_plane(ctx: StepContext) -> None:
    """Kubelet /healthz, then API /readyz; a TemporaryError naming what did not answer (and its last answer)."""
    port = ctx.cluster.kubelet_healthz_port
    kubelet_url = f"http://127.0.0.1:{port}/healthz"
    await _wait_until_ok(ctx, what=f"the kubelet ({kubelet_url})", code="kubelet_not_healthy",
                         probe=lambda timeout_s: healthz(port, timeout_s=timeout_s))
    # In a thread: YAML, the CA and the client key loaded into a TLS context cost ~30 ms of CPU (issue 11).
    api = await asyncio.to_thread(_ApiEndpoint.from_kubeconfig, ctx)
    await _wait_until_ok(ctx, what=f"the API server ({api.url}/readyz, admin.conf's credentials)",
                         code="apiserver_not_ready", probe=api.readyz)


async def _wait_until_ok(ctx: StepContext, *, what: str, code: str, probe: Probe) -> None:
    loop = asyncio.get_running_loop()
    give_up_at = fail_at(ctx)
    started = loop.time()
    last = "not asked yet"
    tries = 0
    report_at = started + REPORT_EVERY_S
    ctx.progress(f"waiting for {what}")
    while True:
        left_s = give_up_at - loop.time()
        if left_s <= 0:
            break
        ok, last = await probe(max(0.1, min(PROBE_TIMEOUT_S, left_s)))
        tries += 1
        if ok:
            ctx.progress(f"{what} answered ok after {loop.time() - started:.1f}s")
            return
        if loop.time() >= report_at:
            report_at = loop.time() + REPORT_EVERY_S
            ctx.progress(f"still waiting for {what}: {last} ({tries} tries in {loop.time() - started:.0f} s)")
        await asyncio.sleep(max(0.0, min(POLL_INTERVAL_S, give_up_at - loop.time())))
    raise TemporaryError(
        f"{what} did not answer ok within {loop.time() - started:.0f}s (last: {last})",
        code=code, details={"waited_for": what, "last": last},
    )


@dataclass(frozen=True)
class _ApiEndpoint:
    url: str  # https://host:port, as admin.conf names the server
    host: str
    port: int
    tls: ssl.SSLContext

    @classmethod
    def from_kubeconfig(cls, ctx: StepContext) -> _ApiEndpoint:
        admin = ctx.paths.admin_conf
        try:
            content = parse_kubeconfig(admin.read_bytes(),
                                       read_file=rooted_reader(ctx.paths.root, ctx.paths.kubernetes_dir))
        except (OSError, ValueError) as exc:
            raise PermanentError(f"{admin}: cannot be used to reach the API server: {exc}",
                                 code="admin_conf_invalid") from exc
        parts = urlsplit(content.server)
        if parts.scheme != "https" or not parts.hostname:
            raise PermanentError(f"{admin}: server {content.server!r} is not an https:// URL",
                                 code="admin_conf_invalid")
        return cls(url=content.server.rstrip("/"), host=parts.hostname, port=parts.port or 443,
                   tls=_tls_context(content, scratch_parent=ctx.paths.state_dir))

    async def readyz(self, timeout_s: float) -> tuple[bool, str]:
        """GET /readyz: (True, "ok") on 200, else (False, the status and the failed checks, or the error)."""
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.tls,
                                                               server_hostname=self.host)
                writer.write(f"GET /readyz HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nConnection: close\r\n\r\n"
                             .encode())
                await writer.drain()
                answer = await reader.read(_ANSWER_MAX_BYTES)
        except TimeoutError:
            return False, f"no answer within {timeout_s:.1f}s"
        except ssl.SSLError as exc:
            return False, f"TLS: {exc.reason or exc}"
        except OSError as exc:
            return False, os_error_text(exc)
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
        head, _, body = answer.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
        parts = status_line.split(" ", 2)
        if len(parts) >= 2 and parts[1] == "200":
            return True, "ok"
        failed = [line for line in body.decode(errors="replace").splitlines() if line.startswith("[-]")]
        detail = "; ".join(failed) if failed else body.decode(errors="replace").strip()[:200]
        return False, f"{status_line or 'closed without answering'}" + (f": {detail}" if detail else "")


def _tls_context(content: KubeconfigContent, *, scratch_parent: Path) -> ssl.SSLContext:
    """Verifies the server with admin.conf's CA and presents its client certificate (no file written)."""
    for stale in scratch_parent.glob(f"{SCRATCH_PREFIX}*"):  # an older version's, left by a crash
        shutil.rmtree(stale, ignore_errors=True)
    try:
        return client_context(ca_pem=content.ca_pem, cert_pem=content.cert_pem, key_pem=content.key_pem)
    except ValueError as exc:
        raise PermanentError(f"admin.conf: {exc}", code="admin_conf_invalid") from exc
