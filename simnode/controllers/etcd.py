"""`etcd` stand-in: creates its data directory (`--data-dir`, re-rooted, mode 0700, with `member/`),
answers plain-HTTP /health, /livez and /readyz on the first `--listen-metrics-urls` address (what the
kubelet probes), and waits for SIGTERM. The API simulator keeps its own data under /var/lib/etcd.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from urllib.parse import urlsplit

from aiohttp import web

from simnode.controllers.common import FlagError, parse_flags, run_until_signal, setup_logging
from simnode.machine import can_assign
from simnode.paths import NodeRoot, NodeRootError, resolve_root

log = logging.getLogger("etcd")

BIND_RETRY_S = 2.0  # another node's etcd on this host may hold the port; take it over when it is free


def metrics_address(flags: dict[str, str]) -> tuple[str, int] | None:
    first = (flags.get("listen-metrics-urls") or "").split(",")[0].strip()
    if not first:
        return None
    url = urlsplit(first)
    if url.scheme != "http" or not url.hostname or not url.port:
        raise FlagError(f"etcd: --listen-metrics-urls={first}: expected http://host:port")
    return url.hostname, url.port


async def serve_health(address: tuple[str, int]) -> None:
    async def health(request: web.Request) -> web.Response:
        if request.path == "/health":
            return web.json_response({"health": "true", "reason": ""})
        return web.Response(text="ok")

    app = web.Application()
    for path in ("/health", "/livez", "/readyz"):
        app.router.add_get(path, health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    warned = False
    try:
        while True:
            try:
                await web.TCPSite(runner, address[0], address[1]).start()
                break
            except OSError as exc:
                if not warned:
                    log.warning("cannot listen on %s:%d (%s); retrying", address[0], address[1], exc.strerror)
                    warned = True
                await asyncio.sleep(BIND_RETRY_S)
        log.info("serving health on http://%s:%d", *address)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def unassignable(root: NodeRoot, flags: dict[str, str]) -> str | None:
    """etcd-io/etcd server/embed/etcd.go configurePeerListeners / configureClientListeners: etcd listens on every
    --listen-peer-urls and --listen-client-urls address at start; one that is not the node's fails the bind
    (EADDRNOTAVAIL) and etcd exits. The node's addresses come from its own /proc/net view (simnode/machine.py)."""
    for flag in ("listen-peer-urls", "listen-client-urls"):
        for url in filter(None, (u.strip() for u in (flags.get(flag) or "").split(","))):
            parts = urlsplit(url)
            if parts.hostname and not can_assign(root, parts.hostname):
                host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
                return f"listen tcp {host}:{parts.port}: bind: cannot assign requested address"
    return None


def main(argv: list[str]) -> int:
    try:
        flags = parse_flags("etcd", argv)
        address = metrics_address(flags)
        root = resolve_root()
    except (FlagError, NodeRootError) as exc:
        print(f"etcd: {exc}", file=sys.stderr)
        return 1
    setup_logging(flags)
    problem = unassignable(root, flags)
    if problem:
        print(json.dumps({"level": "fatal", "msg": "discovery failed", "error": problem}), file=sys.stderr)
        return 1
    data_dir = root.path(flags.get("data-dir") or "/var/lib/etcd")
    try:
        (data_dir / "member").mkdir(parents=True, exist_ok=True)
        data_dir.chmod(0o700)
    except OSError as exc:
        print(f"etcd: cannot create data dir {data_dir}: {exc.strerror}", file=sys.stderr)
        return 1
    log.info("etcd %s running (simulated), data dir %s", flags.get("name", "default"), root.real(data_dir))

    async def run() -> None:
        if address is not None:
            await serve_health(address)
        else:
            await asyncio.Event().wait()

    code = run_until_signal(run)
    log.info("etcd exiting")
    return code
