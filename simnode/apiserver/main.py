"""kube-apiserver entry point: parse the real server's flags, load the store, serve HTTPS until SIGTERM.

Leaves `<root>/var/lib/etcd/simnode-store/snapshot.json`; logs klog-style lines to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from aiohttp import web

from simnode.apiserver import persist
from simnode.apiserver.api import Api
from simnode.apiserver.bootstrap import bootstrap
from simnode.apiserver.handlers import Handler
from simnode.apiserver.health import Health
from simnode.apiserver.kubeletlink import KubeletClientError, KubeletLink, load_kubelet_client
from simnode.apiserver.satokens import TokenIssuer
from simnode.apiserver.services import Allocator, first_ip, parse_range
from simnode.apiserver.tls import CertReloader, TLSConfigError, TLSServerProtocol
from simnode.faults import FaultsFileError, load_faults
from simnode.paths import NodeRoot, NodeRootError, resolve_root

log = logging.getLogger("simnode.apiserver")

_FLAG_RE = re.compile(r"^--?([A-Za-z0-9][A-Za-z0-9._-]*)(?:=(.*))?$", re.DOTALL)
STORE_DIR = "/var/lib/etcd/simnode-store"


class FlagError(Exception):
    """A command-line argument the server cannot accept."""


@dataclass(frozen=True)
class Settings:
    root: NodeRoot
    secure_port: int
    bind_address: str
    advertise_address: str
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None
    service_range: str
    anonymous_auth: bool
    verbosity: int
    kubelet_client_certificate: str | None = None  # real paths, as the flags name them
    kubelet_client_key: str | None = None
    sa_key_files: tuple[Path, ...] = ()
    sa_signing_key_file: Path | None = None
    sa_issuer: str = ""
    api_audiences: tuple[str, ...] = ()


def parse_flags(argv: list[str]) -> dict[str, str]:
    flags: dict[str, str] = {}
    for arg in argv:
        m = _FLAG_RE.match(arg)
        if not m:
            raise FlagError(f"unexpected argument {arg!r}: only --name=value flags are accepted")
        flags[m.group(1)] = m.group(2) if m.group(2) is not None else "true"
    return flags


def settings_from(flags: dict[str, str]) -> Settings:
    try:
        root = resolve_root(rootfs=flags.get("rootfs"))
    except NodeRootError as exc:
        raise FlagError(str(exc)) from exc
    try:
        port = int(flags.get("secure-port", "6443"))
        verbosity = int(flags.get("v", "0"))
    except ValueError as exc:
        raise FlagError(f"--secure-port and --v take integers: {exc}") from exc
    if not 0 <= port <= 65535:
        raise FlagError(f"--secure-port={port}: must be 0..65535")
    for required in ("tls-cert-file", "tls-private-key-file"):
        if not flags.get(required):
            raise FlagError(f"--{required} is required (this server does not generate self-signed certificates)")
    service_range = flags.get("service-cluster-ip-range", "10.96.0.0/12")
    try:
        parse_range(service_range)
    except ValueError as exc:
        raise FlagError(f"--service-cluster-ip-range={service_range}: {exc}") from exc
    anonymous = flags.get("anonymous-auth", "true").lower()
    if anonymous not in ("true", "false"):
        raise FlagError(f"--anonymous-auth={anonymous}: expected true or false")
    ca = flags.get("client-ca-file")
    bind = flags.get("bind-address", "0.0.0.0")
    return Settings(
        root=root,
        secure_port=port,
        bind_address=bind,
        advertise_address=flags.get("advertise-address") or ("127.0.0.1" if bind in ("0.0.0.0", "::") else bind),
        cert_file=root.path(flags["tls-cert-file"]),
        key_file=root.path(flags["tls-private-key-file"]),
        client_ca_file=root.path(ca) if ca else None,
        service_range=service_range,
        anonymous_auth=anonymous == "true",
        verbosity=verbosity,
        kubelet_client_certificate=flags.get("kubelet-client-certificate"),
        kubelet_client_key=flags.get("kubelet-client-key"),
        sa_key_files=tuple(root.path(f) for f in flags.get("service-account-key-file", "").split(",") if f),
        sa_signing_key_file=root.path(flags["service-account-signing-key-file"])
        if flags.get("service-account-signing-key-file") else None,
        sa_issuer=flags.get("service-account-issuer", ""),
        api_audiences=tuple(a for a in flags.get("api-audiences", "").split(",") if a),
    )


def token_issuer(s: Settings) -> TokenIssuer | None:
    """Service-account tokens, when the flags name the keys (kubeadm's manifest does: sa.key and sa.pub).

    The real server refuses to start without --service-account-issuer and a key; here a server started
    without them serves no tokens, and a key file that cannot be read is logged and skipped."""
    if not s.sa_issuer and s.sa_signing_key_file is None:
        return None
    readable = []
    for path in s.sa_key_files:
        if path.is_file():
            readable.append(path)
        else:
            log.warning("--service-account-key-file %s cannot be read; tokens signed with it will not verify", path)
    try:
        return TokenIssuer(signing_key_file=s.sa_signing_key_file, public_key_files=readable,
                           issuer=s.sa_issuer or "https://kubernetes.default.svc.cluster.local",
                           audiences=list(s.api_audiences))
    except (OSError, ValueError) as exc:
        raise FlagError(f"service-account keys: {exc}") from exc


class KlogFormatter(logging.Formatter):
    """`I0612 10:00:00.123456   12345 main.py:42] message`, like the real components."""

    def format(self, record: logging.LogRecord) -> str:
        level = {"DEBUG": "I", "INFO": "I", "WARNING": "W", "ERROR": "E", "CRITICAL": "F"}[record.levelname]
        ts = datetime.fromtimestamp(record.created).strftime("%m%d %H:%M:%S.%f")
        text = f"{level}{ts} {record.process:>7} {record.filename}:{record.lineno}] {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _setup_logging(verbosity: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KlogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity >= 5 else logging.INFO)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)


async def serve(s: Settings) -> int:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        faults = load_faults(s.root.faults_file)
    except FaultsFileError as exc:
        log.error("%s", exc)  # noqa: TRY400 (expected condition: no traceback)
        return 1
    start_delay_s = faults.delay_s("apiserver_start")
    if start_delay_s > 0:
        log.info("waiting %.1fs before listening (delays_s.apiserver_start)", start_delay_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=start_delay_s)
        if stopping.is_set():
            return 0
    try:
        reloader = CertReloader(s.cert_file, s.key_file, s.client_ca_file)
    except TLSConfigError as exc:
        log.error("cannot serve TLS: %s", exc)  # noqa: TRY400 (expected condition: no traceback)
        return 1
    try:
        kubelet_client = load_kubelet_client(s.root, s.kubelet_client_certificate, s.kubelet_client_key)
    except KubeletClientError as exc:
        log.error("Error: %s", exc)  # noqa: TRY400 (expected condition: no traceback)
        return 1
    if kubelet_client is not None:
        # Read once: a renewed file is used only by the next process (see kubeletlink.py).
        log.info("kubelet client certificate %s loaded: serial %x, notAfter %s", kubelet_client.file,
                 kubelet_client.cert.serial_number, kubelet_client.cert.not_valid_after_utc.isoformat())
    store_dir = s.root.path(STORE_DIR)
    try:
        store = persist.load(store_dir)
    except persist.StoreFileError as exc:
        log.error("%s", exc)  # noqa: TRY400 (expected condition: no traceback)
        return 1
    network = parse_range(s.service_range)
    api = Api(store, Allocator(store, network))
    bootstrap(api, service_ip=first_ip(network), advertise_address=s.advertise_address, secure_port=s.secure_port)
    persister = persist.Persister(store_dir, store)
    persister.flush()
    health = Health(s.root.faults_file)
    try:
        tokens = token_issuer(s)
    except FlagError as exc:
        log.error("%s", exc)  # noqa: TRY400 (expected condition: no traceback)
        return 1
    handler = Handler(api, health, server_address=f"{s.advertise_address}:{s.secure_port}",
                      anonymous_auth=s.anonymous_auth, verbosity=s.verbosity, stopping=stopping,
                      kubelet=KubeletLink(s.root, kubelet_client), tokens=tokens)
    http = web.Server(handler, handler_cancellation=True, access_log=None)
    try:
        server = await loop.create_server(lambda: TLSServerProtocol(reloader, http), host=s.bind_address,
                                          port=s.secure_port, reuse_address=True)
    except OSError as exc:
        log.error("failed to listen on %s:%d: %s", s.bind_address, s.secure_port, exc)  # noqa: TRY400 (expected condition: no traceback)
        return 1
    health.listening_at = time.monotonic()
    persist_task = asyncio.create_task(persister.run(), name="apiserver-persist")
    log.info("Serving securely on %s:%d (store %s, resourceVersion %d)", s.bind_address, s.secure_port,
             store_dir, store.resource_version)
    await stopping.wait()
    log.info("shutting down")
    health.shutting_down = True
    server.close()
    store.close_watchers()
    await http.shutdown(2.0)
    persist_task.cancel()
    persister.flush()
    log.info("store flushed at resourceVersion %d", store.resource_version)
    return 0


def main(argv: list[str]) -> int:
    try:
        flags = parse_flags(argv)
        settings = settings_from(flags)
    except FlagError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    _setup_logging(settings.verbosity)
    log.info("kube-apiserver (simnode) pid %d, root %s", os.getpid(), settings.root.root)
    return asyncio.run(serve(settings))
