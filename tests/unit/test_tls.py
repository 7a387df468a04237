"""lifecycle.tls: a client certificate and key loaded into an SSL context from memory files, leaving no file and
no descriptor; a swapped pair or an encrypted key is refused (never a prompt on a terminal)."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lifecycle.tls import load_client_certificate, memory_file


def _pair() -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes-admin")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), key


def _key_pem(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _fds() -> set[str]:
    return {fd.name for fd in Path("/proc/self/fd").iterdir()}


def test_a_pair_loads_from_memory_and_leaves_no_descriptor() -> None:
    cert_pem, key = _pair()
    before = _fds()
    for _ in range(20):
        load_client_certificate(ssl.create_default_context(), cert_pem=cert_pem, key_pem=_key_pem(key))
    assert _fds() == before


def test_a_memory_file_is_readable_while_open_and_gone_after() -> None:
    with memory_file(b"secret", name="test") as path:
        assert Path(path).read_bytes() == b"secret"
        assert "memfd:test" in str(Path(path).readlink())
    assert not Path(path).exists() or "memfd:test" not in str(Path(path).readlink())


def test_a_swapped_pair_and_an_encrypted_key_are_refused() -> None:
    cert_pem, key = _pair()
    with pytest.raises(ssl.SSLError):
        load_client_certificate(ssl.create_default_context(), cert_pem=_key_pem(key), key_pem=cert_pem)
    with pytest.raises(ssl.SSLError):
        load_client_certificate(ssl.create_default_context(), cert_pem=cert_pem,
                                key_pem=_key_pem(key, password=b"hunter2"))
