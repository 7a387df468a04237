"""Certificate and key primitives (cryptography): create keys/certs the way kubeadm does, and check them.

Every check returns a problem string naming the file and the reason, or None; nothing here writes files.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

BACKDATE_S = 300.0  # kubeadm backdates certificates 5 minutes to tolerate clock skew
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def new_key(algorithm: str) -> PrivateKey:
    """A private key for kubeadm's encryptionAlgorithm (RSA-2048 ... ECDSA-P384)."""
    if algorithm == "ECDSA-P256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "ECDSA-P384":
        return ec.generate_private_key(ec.SECP384R1())
    bits = int(algorithm.removeprefix("RSA-"))
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def key_pem(key: PrivateKey) -> bytes:
    # kubeadm writes "RSA PRIVATE KEY" / "EC PRIVATE KEY" (traditional OpenSSL format).
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class CertRequest:
    cn: str
    orgs: tuple[str, ...] = ()
    is_ca: bool = False
    server: bool = False
    client: bool = False
    dns_names: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    validity_s: float = 365 * 86400.0


def _name(cn: str, orgs: tuple[str, ...]) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _digest(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def issue(
    req: CertRequest, key: PrivateKey, *, ca: tuple[x509.Certificate, PrivateKey] | None = None
) -> x509.Certificate:
    """Self-signed CA when `ca` is None, else a leaf signed by `ca` (never outliving it)."""
    now = dt.datetime.now(dt.UTC)
    not_before = now - dt.timedelta(seconds=BACKDATE_S)
    not_after = now + dt.timedelta(seconds=req.validity_s)
    issuer_name = _name(req.cn, req.orgs)
    signer: PrivateKey = key
    if ca is not None:
        issuer_name, signer = ca[0].subject, ca[1]
        not_after = min(not_after, ca[0].not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(req.cn, req.orgs))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(secrets.randbits(63) + 1)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=req.is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=isinstance(key, rsa.RSAPrivateKey),
                key_cert_sign=req.is_ca,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if req.is_ca:
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if req.server else []) + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if req.client else []
        )
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if ca is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca[1].public_key()), critical=False
        )
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in req.dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in req.ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(signer, _digest(signer))


# ---- reading and checking ----

def load_cert(path: Path, shown: str) -> x509.Certificate | str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return f"{shown}: file does not exist"
    except OSError as exc:
        return f"{shown}: cannot read: {exc.strerror}"
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        return f"{shown}: not a readable PEM certificate"


def load_key(path: Path, shown: str) -> PrivateKey | str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return f"{shown}: file does not exist"
    except OSError as exc:
        return f"{shown}: cannot read: {exc.strerror}"
    return parse_key(data, shown)


def parse_key(data: bytes, shown: str) -> PrivateKey | str:
    try:
        key: PrivateKeyTypes = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        return f"{shown}: not a readable unencrypted PEM private key"
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        return f"{shown}: unsupported key type {type(key).__name__} (RSA or ECDSA expected)"
    return key


def _stamp(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def check_validity(cert: x509.Certificate, shown: str) -> str | None:
    now = dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc <= now:
        return f"{shown}: certificate has expired (not after {_stamp(cert.not_valid_after_utc)})"
    if cert.not_valid_before_utc > now:
        return f"{shown}: certificate is not yet valid (not before {_stamp(cert.not_valid_before_utc)})"
    return None


def check_key_matches(cert: x509.Certificate, key: PrivateKey, key_shown: str) -> str | None:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*fmt) != key.public_key().public_bytes(*fmt):
        return f"{key_shown}: private key does not match certificate"
    return None


def check_public_matches(pub_pem: bytes, key: PrivateKey, pub_shown: str, key_shown: str) -> str | None:
    """sa.pub against sa.key, whatever PEM flavour (PKIX "PUBLIC KEY" or PKCS#1 "RSA PUBLIC KEY") it uses."""
    try:
        pub = serialization.load_pem_public_key(pub_pem)
    except (ValueError, TypeError):
        return f"{pub_shown}: not a readable PEM public key"
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if pub.public_bytes(*fmt) != key.public_key().public_bytes(*fmt):
        return f"{pub_shown}: public key does not match {key_shown}"
    return None


def check_is_ca(cert: x509.Certificate, shown: str) -> str | None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return f"{shown}: not a CA certificate (no basicConstraints CA:TRUE)"
    return None if constraints.ca else f"{shown}: not a CA certificate (basicConstraints CA:FALSE)"


def check_signed_by(cert: x509.Certificate, ca: x509.Certificate, shown: str, ca_shown: str) -> str | None:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return f"{shown}: certificate is not signed by the CA in {ca_shown} (signature check failed)"
    return None


def sans_of(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    """(DNS names, IPs as normalized strings) of a certificate."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    dns = {d.lower() for d in ext.get_values_for_type(x509.DNSName)}
    ips = {str(i) for i in ext.get_values_for_type(x509.IPAddress)}
    return dns, ips


def check_sans(cert: x509.Certificate, dns_names: tuple[str, ...], ips: tuple[str, ...], shown: str) -> str | None:
    have_dns, have_ips = sans_of(cert)
    missing = [d for d in dns_names if d.lower() not in have_dns]
    missing += [i for i in ips if str(ipaddress.ip_address(i)) not in have_ips]
    if missing:
        return f"{shown}: SANs do not cover " + ", ".join(f'"{m}"' for m in missing)
    return None
