"""wait-control-plane: wait for the kubelet's /healthz, then the API server's /readyz (admin.conf), each
within kubeadm's configured timeout. Writes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import aiohttp

from simnode.kubeadm.apiclient import client_for, wait_for
from simnode.kubeadm.config import Config
from simnode.kubeadm.errors import PhaseError
from simnode.kubeadm.manifests import MANIFESTS_DIR
from simnode.kubeadm.values import format_duration, join_host_port
from simnode.paths import NodeRoot

PHASE = "wait-control-plane"


async def kubelet_healthy(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as session, session.get(
            url, timeout=aiohttp.ClientTimeout(total=2.0)
        ) as resp:
            await resp.read()
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False


def _elapsed(start: float) -> str:
    return format_duration(round(time.monotonic() - start, 6))


async def wait_kubelet(cfg: Config, out: Callable[[str], None]) -> None:
    url = f"http://{join_host_port(cfg.healthz_host, cfg.healthz_port)}/healthz"
    timeout_s = cfg.init.kubelet_timeout_s
    out(f"[kubelet-check] Waiting for a healthy kubelet at {url}. This can take up to {format_duration(timeout_s)}")
    start = time.monotonic()
    try:
        await wait_for("the kubelet", timeout_s, lambda: kubelet_healthy(url))
    except TimeoutError as exc:
        out(f"[kubelet-check] The kubelet is not healthy after {_elapsed(start)}")
        out("\nUnfortunately, an error has occurred, likely caused by:\n\t- The kubelet is not running\n"
            "\t- The kubelet is unhealthy due to a misconfiguration of the node in some way\n")
        raise PhaseError(PHASE, f"failed while waiting for the kubelet: the kubelet is not healthy after "
                                f"{format_duration(timeout_s)} ({url}): context deadline exceeded") from exc
    out(f"[kubelet-check] The kubelet is healthy after {_elapsed(start)}")


async def wait_api(root: NodeRoot, timeout_s: float, out: Callable[[str], None], phase: str = PHASE) -> None:
    out(f"[api-check] Waiting for a healthy API server. This can take up to {format_duration(timeout_s)}")
    start = time.monotonic()
    async with client_for(root, timeout_s=min(5.0, timeout_s)) as client:
        try:
            await wait_for("the API server", timeout_s, client.readyz)
        except TimeoutError as exc:
            out(f"[api-check] The API server is not healthy after {_elapsed(start)}")
            raise PhaseError(phase, f"failed while waiting for the control plane: the API server at {client.server} "
                                    f"is not healthy after {format_duration(timeout_s)}: context deadline exceeded"
                             ) from exc
    out(f"[api-check] The API server is healthy after {_elapsed(start)}")


async def wait_control_plane(cfg: Config, root: NodeRoot, out: Callable[[str], None]) -> None:
    out(f"[wait-control-plane] Waiting for the kubelet to boot up the control plane as static Pods from directory "
        f'"{MANIFESTS_DIR}"')
    await wait_kubelet(cfg, out)
    await wait_api(root, cfg.init.control_plane_timeout_s, out)
