"""X.509 for the kubeadm PKI: keys, issuing CAs and leaves the way kubeadm does, and checking a certificate
against what it must be. Pure: no disk; keys only ever leave as PEM bytes for the caller to write.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lifecycle.pki_specs import CertSpec, PkiParams

BACKDATE = timedelta(minutes=5)  # kubeadm backdates CAs so that small clock jumps do not break them
CLOCK_SKEW = timedelta(minutes=5)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


# ---- keys and certificates ----------------------------------------------------------------------------


def new_key(algorithm: str) -> PrivateKey:
    if algorithm == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: PrivateKey) -> bytes:
    # "EC PRIVATE KEY" / "RSA PRIVATE KEY", as kubeadm writes them.
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(spec: CertSpec) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in spec.organization]
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, spec.common_name)])


def _serial() -> int:
    return secrets.randbelow(2**63 - 1) + 1


def issue_ca(spec: CertSpec, key: PrivateKey, params: PkiParams, *, now: datetime) -> x509.Certificate:
    name = _name(spec)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=params.ca_validity_days))
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(spec.common_name)]), critical=False)
    )
    return builder.sign(key, hashes.SHA256())


def issue_leaf(
    spec: CertSpec, key: PrivateKey, ca_cert: x509.Certificate, ca_key: PrivateKey, params: PkiParams, *, now: datetime
) -> x509.Certificate:
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if spec.server else []
    usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if spec.client else []
    not_after = min(now + timedelta(days=params.cert_validity_days), ca_cert.not_valid_after_utc)
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        authority = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:  # a CA made elsewhere (a host's bundle) may lack it
        authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(spec))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(ca_cert.not_valid_before_utc)  # as kubeadm does
        .not_valid_after(not_after)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(authority, critical=False)
    )
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in spec.dns_names]
    sans += [x509.IPAddress(ip) for ip in spec.ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=True, data_encipherment=False,
        key_agreement=False, key_cert_sign=ca, crl_sign=False, encipher_only=False, decipher_only=False,
    )


# ---- checking -----------------------------------------------------------------------------------------


def load_cert(data: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ValueError("not a PEM certificate") from exc


def load_key(data: bytes) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError("not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError("neither an ECDSA nor an RSA key")  # noqa: TRY004 - a bad file, not a bad call
    return key


def _spki(key: object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return b""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def check_cert(
    spec: CertSpec, cert: x509.Certificate, key: PrivateKey | None, issuer: x509.Certificate | None,
    params: PkiParams, *, now: datetime,
) -> list[str]:
    """Reasons `cert` is unfit for `spec` (empty: keep it). `issuer` None: a CA, checked against itself.

    A CA's subject is not checked, so that a CA made elsewhere (host-provided) is accepted.
    """
    reasons: list[str] = []
    if key is not None and _spki(cert.public_key()) != _spki(key.public_key()):
        reasons.append("private key does not match certificate")
    try:
        cert.verify_directly_issued_by(issuer or cert)
    except (ValueError, TypeError, InvalidSignature):
        reasons.append(f"not signed by {spec.ca or 'itself'}.crt")
    reasons += _check_period(cert, params, ca=issuer is None, now=now)
    if issuer is not None:
        reasons += _check_subject(spec, cert)
    reasons += _check_usages(spec, cert, ca=issuer is None)
    reasons += _check_sans(spec, cert)
    return reasons


def _check_period(cert: x509.Certificate, params: PkiParams, *, ca: bool, now: datetime) -> list[str]:
    days = params.ca_validity_days if ca else params.cert_validity_days
    margin = min(timedelta(days=30), timedelta(days=days) / 10)  # renew before clients start failing
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if not_before > now + CLOCK_SKEW:
        return [f"certificate is not valid yet (not before {not_before:%Y-%m-%d %H:%M}Z)"]
    if not_after <= now:
        return [f"certificate has expired (not after {not_after:%Y-%m-%d %H:%M}Z)"]
    if not_after <= now + margin:
        within = f"{margin.days} days" if margin.days else f"{margin.total_seconds():.0f} s"  # short test lifetimes
        return [f"certificate expires within {within} (not after {not_after:%Y-%m-%d %H:%M:%S}Z)"]
    return []


def _check_subject(spec: CertSpec, cert: x509.Certificate) -> list[str]:
    # Compared as values, not as a DER sequence: other tools order the attributes differently.
    cns = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    orgs = sorted(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME))
    if cns != [spec.common_name] or orgs != sorted(spec.organization):
        return [f"subject is {cert.subject.rfc4514_string()}, expected {_name(spec).rfc4514_string()}"]
    return []


def _check_usages(spec: CertSpec, cert: x509.Certificate, *, ca: bool) -> list[str]:
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if is_ca != ca:
        return ["is a CA certificate" if is_ca else "is not a CA certificate"]
    if ca:
        return []
    try:
        ekus = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        ekus = set()
    missing = [name for oid, name, wanted in (
        (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth", spec.server),
        (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth", spec.client),
    ) if wanted and oid not in ekus]
    return [f"extended key usage lacks {', '.join(missing)}"] if missing else []


def _check_sans(spec: CertSpec, cert: x509.Certificate) -> list[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = {d.lower() for d in sans.get_values_for_type(x509.DNSName)}
        ips = set(sans.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = set(), set()
    missing = [d for d in spec.dns_names if d.lower() not in dns] + [str(ip) for ip in spec.ips if ip not in ips]
    return [f"SANs do not cover {', '.join(repr(m) for m in missing)}"] if missing else []


def public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def same_public_key(public_pem_data: bytes, key: PrivateKey) -> bool:
    try:
        public = serialization.load_pem_public_key(public_pem_data)
    except ValueError:
        return False
    return _spki(public) == _spki(key.public_key())


def same_cert(a: x509.Certificate, b: x509.Certificate) -> bool:
    return a.public_bytes(serialization.Encoding.DER) == b.public_bytes(serialization.Encoding.DER)
