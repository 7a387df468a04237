"""TLS for the API server: pyOpenSSL over memory BIOs, presented to aiohttp as an ordinary asyncio transport.

Python's `ssl` cannot ask for a client certificate without rejecting bad ones in the handshake; the real
server accepts any certificate and answers 401 later. So the verify callback records OpenSSL's verdict
against --client-ca-file and lets the handshake finish. The serving cert/key are reloaded when their files
change (checked at most once per second, on new connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

log = logging.getLogger(__name__)

IDENTITY_KEY = "simnode_identity"
HANDSHAKE_TIMEOUT_S = 10.0
_RECORD_BYTES = 16384
# The OpenSSL verify errors clients meet in practice, worded as the real server logs them.
_VERIFY_ERRORS = {
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "certificate signed by unknown authority",
    21: "certificate signed by unknown authority",
    26: "certificate specifies an incompatible key usage",
}


class TLSConfigError(Exception):
    """The serving certificate, key or client CA cannot be loaded."""


@dataclass(frozen=True)
class Identity:
    """Who the client is: a verified certificate's CN and O, anonymous, or a rejected certificate."""

    user: str = ""
    groups: tuple[str, ...] = ()
    error: str | None = None

    @property
    def authenticated(self) -> bool:
        return bool(self.user) and self.error is None


@dataclass
class _ConnState:
    verify_errors: list[tuple[int, int]] = field(default_factory=list)  # (depth, errno)


def _verify(conn: SSL.Connection, cert: Any, errnum: int, depth: int, ok: int) -> bool:
    if not ok:
        state = conn.get_app_data()
        if isinstance(state, _ConnState):
            state.verify_errors.append((depth, errnum))
    return True  # never fail the handshake: the HTTP layer answers 401


def _select_alpn(conn: SSL.Connection, offered: list[bytes]) -> bytes:
    return b"http/1.1" if b"http/1.1" in offered else SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]


class CertReloader:
    """Builds SSL contexts from files, rebuilding when their mtimes change."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self.files = [p for p in (cert_file, key_file, client_ca_file) if p is not None]
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self._stamp = self._stat()
        self._ctx = self._build()  # errors here are fatal (startup)
        self._checked_at = time.monotonic()

    def _stat(self) -> tuple[tuple[int, int], ...]:
        out = []
        for p in self.files:
            try:
                st = p.stat()
            except OSError as exc:
                raise TLSConfigError(f"{p}: {exc.strerror}") from exc
            out.append((st.st_mtime_ns, st.st_size))
        return tuple(out)

    def _build(self) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_options(SSL.OP_NO_RENEGOTIATION)
        try:
            ctx.use_certificate_chain_file(str(self.cert_file))
        except SSL.Error as exc:
            raise TLSConfigError(f"{self.cert_file}: not a PEM certificate chain: {exc}") from exc
        try:
            ctx.use_privatekey_file(str(self.key_file))
            ctx.check_privatekey()
        except SSL.Error as exc:
            raise TLSConfigError(f"{self.key_file}: not a private key matching {self.cert_file}") from exc
        if self.client_ca_file is not None:
            try:
                cas = x509.load_pem_x509_certificates(self.client_ca_file.read_bytes())
                ctx.load_verify_locations(str(self.client_ca_file))
            except (ValueError, OSError, SSL.Error) as exc:
                raise TLSConfigError(f"{self.client_ca_file}: not a PEM CA bundle: {exc}") from exc
            for ca in cas:
                ctx.add_client_ca(ca)
            ctx.set_verify(SSL.VERIFY_PEER, _verify)
        ctx.set_alpn_select_callback(_select_alpn)
        return ctx

    def context(self) -> SSL.Context:
        now = time.monotonic()
        if now - self._checked_at >= 1.0:
            self._checked_at = now
            try:
                stamp = self._stat()
                if stamp != self._stamp:
                    self._ctx = self._build()
                    self._stamp = stamp
                    log.info("reloaded serving certificate %s", self.cert_file)
            except TLSConfigError as exc:
                # Keep serving with the old pair (a renewal may be half-written); retry on a later connection.
                log.error("certificate reload failed, keeping the previous one: %s", exc)  # noqa: TRY400 (expected condition: no traceback)
        return self._ctx


def _name_attr(name: x509.Name, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(a.value) for a in name.get_attributes_for_oid(oid)]


def identify(conn: SSL.Connection, state: _ConnState, has_client_ca: bool) -> Identity:
    cert = conn.get_peer_certificate(as_cryptography=True)
    if cert is None:
        return Identity()
    if not has_client_ca:
        return Identity(error="client certificates are not accepted (no --client-ca-file)")
    if state.verify_errors:
        depth, errnum = state.verify_errors[0]
        why = _VERIFY_ERRORS.get(errnum, f"certificate verification error {errnum} at depth {depth}")
        return Identity(error=f"verifying certificate {cert.subject.rfc4514_string()} failed: x509: {why}")
    cn = _name_attr(cert.subject, NameOID.COMMON_NAME)
    if not cn:
        return Identity(error="client certificate has no CommonName")
    return Identity(user=cn[0], groups=tuple(_name_attr(cert.subject, NameOID.ORGANIZATION_NAME)))


class TLSServerProtocol(asyncio.Protocol):
    """Terminates TLS for one connection and feeds plaintext to an inner HTTP protocol."""

    def __init__(self, reloader: CertReloader, app_factory: Callable[[], asyncio.Protocol]) -> None:
        self._reloader = reloader
        self._app_factory = app_factory
        self._state = _ConnState()
        self._app: asyncio.Protocol | None = None
        self._app_transport: _AppTransport | None = None
        self._raw: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.identity = Identity()
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._raw = transport
        self.ctx = self._reloader.context()
        self.conn = SSL.Connection(self.ctx, None)
        self.conn.set_app_data(self._state)
        self.conn.set_accept_state()
        self._timer = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT_S, self._handshake_timeout)

    def _handshake_timeout(self) -> None:
        if self._app is None and self._raw is not None:
            self._raw.abort()

    def data_received(self, data: bytes) -> None:
        self.conn.bio_write(data)
        if self._app is None:
            try:
                self.conn.do_handshake()
            except SSL.WantReadError:
                self._flush()
                return
            except SSL.Error as exc:
                log.debug("TLS handshake failed: %s", exc)
                self._flush()
                self._close_raw()
                return
            if self._timer is not None:
                self._timer.cancel()
            self._flush()
            self.identity = identify(self.conn, self._state, self._reloader.client_ca_file is not None)
            self._app = self._app_factory()
            self._app_transport = _AppTransport(self)
            self._app.connection_made(self._app_transport)
        self._pump()

    def _pump(self) -> None:
        while self._app is not None and not self.closing:
            try:
                chunk = self.conn.recv(65536)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self._app.eof_received()
                self.close()
                break
            except SSL.Error as exc:
                log.debug("TLS error: %s", exc)
                self.abort()
                break
            self._app.data_received(chunk)
        self._flush()

    def _flush(self) -> None:
        out = []
        while True:
            try:
                chunk = self.conn.bio_read(65536)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            out.append(chunk)
        if out and self._raw is not None and not self._raw.is_closing():
            self._raw.write(b"".join(out))

    def write_plain(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                sent = self.conn.send(view[:_RECORD_BYTES])
                view = view[sent:]
        except SSL.Error as exc:
            log.debug("TLS write failed: %s", exc)
            self.abort()
            return
        self._flush()

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        with contextlib.suppress(SSL.Error):
            self.conn.shutdown()  # close_notify
        self._flush()
        self._close_raw()

    def _close_raw(self) -> None:
        if self._raw is not None:
            self._raw.close()

    def abort(self) -> None:
        self.closing = True
        if self._raw is not None:
            self._raw.abort()

    def raw_extra(self, name: str, default: Any) -> Any:
        return self._raw.get_extra_info(name, default) if self._raw is not None else default

    @property
    def raw(self) -> asyncio.Transport | None:
        return self._raw

    def eof_received(self) -> bool | None:
        if self._app is not None:
            self._app.eof_received()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
        if self._app is not None:
            app, self._app = self._app, None
            app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None:
            self._app.resume_writing()


class _AppTransport(asyncio.Transport):
    """What the HTTP protocol sees: writes are encrypted, reads come decrypted."""

    def __init__(self, tls: TLSServerProtocol) -> None:
        super().__init__()
        self._tls = tls

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == IDENTITY_KEY:
            return self._tls.identity
        if name == "sslcontext":
            return self._tls.ctx
        if name in ("ssl_object", "peercert", "cipher", "compression"):
            return default
        return self._tls.raw_extra(name, default)

    def is_closing(self) -> bool:
        raw = self._tls.raw
        return self._tls.closing or raw is None or raw.is_closing()

    def close(self) -> None:
        self._tls.close()

    def abort(self) -> None:
        self._tls.abort()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.is_closing():
            self._tls.write_plain(data)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(bytes(d) for d in list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        if (raw := self._tls.raw) is not None:
            raw.pause_reading()

    def resume_reading(self) -> None:
        if (raw := self._tls.raw) is not None:
            raw.resume_reading()

    def is_reading(self) -> bool:
        raw = self._tls.raw
        return raw is not None and raw.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if (raw := self._tls.raw) is not None:
            raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        raw = self._tls.raw
        return raw.get_write_buffer_size() if raw is not None else 0


def check_files_exist(paths: list[Path]) -> None:
    for p in paths:
        if not os.access(p, os.R_OK):
            raise TLSConfigError(f"{p}: cannot read (missing or no permission)")
