"""PKI bundles sent by the host (`pki` in an install request): parsed and checked as kubeadm would use them, and
more strictly, before anything touches the disk. Pure: no disk, no I/O. Problems name the file and the reason,
never the content (the content is key material).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from lifecycle.errors import RequestError
from lifecycle.pki import Problem, pki_file_names
from lifecycle.pki_specs import CertSpec, PkiParams, cert_specs
from lifecycle.pki_x509 import check_cert, load_cert, load_key, same_public_key

REQUIRED_FILES = ("ca.crt", "ca.key", "front-proxy-ca.crt", "front-proxy-ca.key", "etcd/ca.crt", "etcd/ca.key",
                  "sa.key", "sa.pub")
KNOWN_FILES = tuple(pki_file_names())  # the three CAs, seven leaf pairs, sa.key, sa.pub: 22 names
MAX_FILE_BYTES = 16 * 1024  # an RSA-4096 key is ~3.3 KB of PEM, a certificate with many SANs ~3 KB
MAX_PROBLEMS_SHOWN = 5
MIN_RSA_BITS = 2048
EC_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}
STRONG_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
# One BEGIN or END line marker. Blocks are found by pairing markers, not by one regex spanning a block: a lazy
# `BEGIN (.*?) END \1` rescans to the end of the text at every BEGIN that has no END (quadratic: 15 files of
# repeated BEGIN lines cost seconds of CPU per request).
_PEM_MARKER_RE = re.compile(r"-----(BEGIN|END) ([A-Z0-9 ]+)-----")
_NAME_RE = re.compile(r"[A-Za-z0-9._/-]{1,64}")
_KEY_LABELS = ("PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY")
MISMATCH = "private key does not match certificate"  # as pki_x509.check_cert says it


@dataclass(frozen=True)
class PkiBundle:
    """Checked files by kubeadm name ("ca.crt", "etcd/ca.key"), each one PEM block as it will be written."""

    files: Mapping[str, bytes] = field(repr=False)  # holds private keys: never printed

    def names(self) -> list[str]:
        return sorted(self.files)


class BundleError(RequestError):
    """An invalid bundle: `ok: false`, code `invalid_pki`, the message lists the files and reasons."""

    def __init__(self, problems: list[Problem]) -> None:
        shown = "; ".join(str(p) for p in problems[:MAX_PROBLEMS_SHOWN])
        more = len(problems) - MAX_PROBLEMS_SHOWN
        super().__init__("invalid_pki", shown + (f" (and {more} more)" if more > 0 else ""))
        self.problems = problems


def load_bundle(raw: object, params: PkiParams, *, now: datetime) -> PkiBundle:
    """The bundle in `raw` (the request's `pki` value), checked against `params`; raises BundleError."""
    files, problems = parse_bundle(raw)
    if not problems:
        problems = check_bundle(files, params, now=now)
    if problems:
        raise BundleError(problems)
    return PkiBundle(files)


# ---- shape: names, sizes, PEM blocks ------------------------------------------------------------------


def parse_bundle(raw: object) -> tuple[dict[str, bytes], list[Problem]]:
    """File name -> the one PEM block it must hold; problems with names, sizes and PEM framing."""
    if not isinstance(raw, dict):
        return {}, [Problem("pki", f"must be an object of file name -> PEM text, got {type(raw).__name__}")]
    problems: list[Problem] = []
    unknown = sorted(str(name) for name in raw if name not in KNOWN_FILES)
    if unknown:
        shown = ", ".join(_shown_name(n) for n in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        problems.append(Problem("pki", f"unknown file name {shown} (known: kubeadm's names, e.g. ca.crt, "
                                       f"etcd/ca.key, apiserver.crt, sa.pub)"))
    problems += [Problem(name, "missing (the CAs and the service-account key pair are required)")
                 for name in REQUIRED_FILES if name not in raw]
    for name in KNOWN_FILES:
        if name.endswith(".crt") and name not in REQUIRED_FILES:
            pair = name.removesuffix(".crt") + ".key"
            if (name in raw) != (pair in raw):
                missing, given = (pair, name) if name in raw else (name, pair)
                problems.append(Problem(missing, f"missing: {given} comes with it (a leaf is a pair)"))
    files: dict[str, bytes] = {}
    for name in KNOWN_FILES:
        if name in raw:
            block, problem = _pem_block(name, raw[name])
            if problem:
                problems.append(Problem(name, problem))
            else:
                files[name] = block
    return files, problems


def _shown_name(name: str) -> str:
    # Quoted only when it looks like a file name: a key pasted where a name belongs must not be echoed.
    return repr(name) if _NAME_RE.fullmatch(name) else "(a name that is not a file name)"


def _expected_labels(name: str) -> tuple[str, ...]:
    if name == "sa.pub":
        return ("PUBLIC KEY",)
    return _KEY_LABELS if name.endswith(".key") else ("CERTIFICATE",)


def _pem_block(name: str, value: object) -> tuple[bytes, str | None]:
    """The single PEM block of one file, re-emitted alone (text around it is dropped), or why it is unfit."""
    if not isinstance(value, str):
        return b"", f"must be PEM text (a string), got {type(value).__name__}"
    size_bytes = len(value.encode("utf-8"))
    if size_bytes > MAX_FILE_BYTES:
        return b"", f"{size_bytes} bytes, the limit is {MAX_FILE_BYTES} per file"
    if not value.isascii():
        return b"", "not PEM text (non-ASCII characters)"
    expected = _expected_labels(name)
    blocks = pem_blocks(value)
    if name.endswith(".key"):
        blocks = [b for b in blocks if b[0] != "EC PARAMETERS"]  # `openssl ecparam -genkey` puts one first
    if not blocks:
        if "ENCRYPTED PRIVATE KEY" in value:
            return b"", "an encrypted private key (the service needs it unencrypted)"
        return b"", f"no PEM block (expected -----BEGIN {expected[0]}-----)"
    if len(blocks) > 1:
        return b"", (f"holds {len(blocks)} PEM blocks, expected one {expected[0]} "
                     "(chains are not accepted: each CA is used as a root on its own)")
    label, text = blocks[0]
    if label == "ENCRYPTED PRIVATE KEY":
        return b"", "an encrypted private key (the service needs it unencrypted)"
    if label not in expected:
        return b"", f"holds a {label}, expected {' or '.join(expected)}"
    return (text.replace("\r\n", "\n") + "\n").encode("ascii"), None


def pem_blocks(text: str) -> list[tuple[str, str]]:
    """(label, block text from BEGIN to END) of each PEM block in `text`, in one pass (linear in its length).

    A block is a BEGIN line (the marker, then a line break) whose next marker is the END of the same label, as
    RFC 7468 frames it; a BEGIN followed by another BEGIN, or by an END of another label, starts no block."""
    markers = list(_PEM_MARKER_RE.finditer(text))
    blocks: list[tuple[str, str]] = []
    i = 0
    while i + 1 < len(markers):
        begin, end = markers[i], markers[i + 1]
        if (begin.group(1) == "BEGIN" and end.group(1) == "END" and begin.group(2) == end.group(2)
                and text.startswith(("\n", "\r\n"), begin.end())):
            blocks.append((begin.group(2), text[begin.start():end.end()]))
            i += 2
        else:
            i += 1
    return blocks


# ---- contents: CAs, leaves, service-account keys -------------------------------------------------------


def check_bundle(files: Mapping[str, bytes], params: PkiParams, *, now: datetime) -> list[Problem]:
    """Every reason the bundle's files are unfit for a cluster with `params` (empty: fit).

    The same checks the certs state applies to what is on disk (`check_cert`), so whatever is accepted here is
    kept by the install; plus key algorithms, signature hashes and key usages.
    """
    problems: list[Problem] = []
    cas: dict[str, x509.Certificate] = {}
    for spec in cert_specs(params):
        if spec.name + ".crt" not in files:
            continue
        if spec.ca is not None and spec.ca not in cas:
            continue  # its CA is unusable: that problem is reported, a chain check would only repeat it
        found, cert = _check_pair(spec, files, cas.get(spec.ca) if spec.ca else None, params, now=now)
        problems += found
        if spec.ca is None and cert is not None and not found:
            cas[spec.name] = cert
    problems += _check_service_account(files)
    return problems


def _check_pair(
    spec: CertSpec, files: Mapping[str, bytes], issuer: x509.Certificate | None, params: PkiParams, *,
    now: datetime,
) -> tuple[list[Problem], x509.Certificate | None]:
    """Problems of one certificate and its key, and the certificate when it loaded."""
    crt = spec.name + ".crt"
    try:
        return _check_loaded_pair(spec, files, issuer, params, now=now)
    except UnsupportedAlgorithm:  # a key type or curve this build of cryptography cannot even load
        return [Problem(crt, "uses an unsupported key or signature algorithm")], None


def _check_loaded_pair(
    spec: CertSpec, files: Mapping[str, bytes], issuer: x509.Certificate | None, params: PkiParams, *,
    now: datetime,
) -> tuple[list[Problem], x509.Certificate | None]:
    crt, key_file = spec.name + ".crt", spec.name + ".key"
    try:
        cert = load_cert(files[crt])
    except ValueError as exc:
        return [Problem(crt, str(exc))], None
    try:
        key = load_key(files[key_file])
    except ValueError as exc:
        return [Problem(key_file, str(exc))], cert
    weak = key_strength(key)
    if weak:
        return [Problem(key_file, weak)], cert
    weak = key_strength(cert.public_key())
    if weak:
        return [Problem(crt, f"public key: {weak}")], cert
    problems = [Problem(key_file, f"does not match {crt}") if reason == MISMATCH else Problem(crt, reason)
                for reason in check_cert(spec, cert, key, issuer, params, now=now)]
    problems += [Problem(crt, reason) for reason in [*_signature_hash(cert), *_key_usage(cert, ca=spec.ca is None)]]
    return problems, cert


def key_strength(key: object) -> str | None:
    """Why a key is not accepted (RSA >= 2048 bits, ECDSA P-256 or P-384), or None."""
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            return f"RSA key of {key.key_size} bits (at least {MIN_RSA_BITS} are needed)"
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if key.curve.name not in EC_CURVES:
            return f"ECDSA key on curve {key.curve.name} (P-256 or P-384 are accepted)"
        return None
    return f"{type(key).__name__.lstrip('_')} keys are not accepted (RSA >= {MIN_RSA_BITS} or ECDSA P-256/P-384)"


def _signature_hash(cert: x509.Certificate) -> list[str]:
    algorithm = cert.signature_hash_algorithm
    if not isinstance(algorithm, STRONG_HASHES):
        name = algorithm.name.upper() if algorithm is not None else "no hash"
        return [f"signed with {name} (SHA-256 or stronger is needed)"]
    return []


def _key_usage(cert: x509.Certificate, *, ca: bool) -> list[str]:
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        # RFC 5280 4.2.1.3: a CA MUST carry it; a leaf without it may be used for anything.
        return ["no key usage extension (a CA needs keyCertSign)"] if ca else []
    if ca and not usage.key_cert_sign:
        return ["key usage lacks keyCertSign"]
    if not ca and not usage.digital_signature:
        return ["key usage lacks digitalSignature"]
    return []


def _check_service_account(files: Mapping[str, bytes]) -> list[Problem]:
    if "sa.key" not in files or "sa.pub" not in files:
        return []
    try:
        key = load_key(files["sa.key"])
    except ValueError as exc:
        return [Problem("sa.key", str(exc))]
    except UnsupportedAlgorithm:
        return [Problem("sa.key", "uses an unsupported key algorithm")]
    problem = key_strength(key)
    if problem:
        return [Problem("sa.key", problem)]
    if not same_public_key(files["sa.pub"], key):
        return [Problem("sa.pub", "not the public half of sa.key")]
    return []
