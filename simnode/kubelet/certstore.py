"""The kubelet's client certificate store and rotation: `<cert-dir>/kubelet-client-current.pem` is a symlink to a
dated pem (cert + key, 0600) the kubelet writes itself, first from kubelet.conf's embedded credentials at start,
then at each rotation. A current pem that is a plain file loads, but cannot be rotated: the error the real kubelet
logs, retried with its backoff. Leaves dated files in the cert dir (never removed, as upstream)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from simnode.faults import Faults
from simnode.paths import NodeRoot

log = logging.getLogger("kubelet.certificate")

PREFIX = "kubelet-client"
# pkg/kubelet/certificate/kubelet.go: the client manager is named after its signer; its messages start with it.
NAME = "kubernetes.io/kube-apiserver-client-kubelet"
SIGNING_DURATION_S = 365 * 86400.0  # kube-controller-manager --cluster-signing-duration default (8760h)
BACKOFF_S = (2.0, 4.0, 8.0, 16.0, 32.0)  # certificate_manager.go Start: Duration 2s, Factor 2, Steps 5
POLL_AFTER_BACKOFF_S = 32.0  # then wait.PollInfinite(32*time.Second, m.rotateCerts)


class StoreError(Exception):
    """The store cannot take the new pair (the message is client-go's)."""


class FileStore:
    """client-go util/certificate/certificate_store.go (fileStore), on the node root."""

    def __init__(self, root: NodeRoot, cert_dir: str) -> None:
        self.root = root
        self.dir = root.path(cert_dir)

    def path(self, qualifier: str) -> Path:
        return self.dir / f"{PREFIX}-{qualifier}.pem"

    def shown(self, path: Path) -> str:
        return self.root.real(path)  # paths in messages as the node sees them

    def current(self) -> bytes | None:
        """fileStore.Current: the pair the current pem names (os.Stat follows the symlink: a plain file loads)."""
        try:
            return self.path("current").read_bytes()
        except FileNotFoundError:
            return None

    def update(self, cert_pem: bytes, key_pem: bytes) -> Path:
        """fileStore.Update: a new dated pem (0600, O_TRUNC), then updateSymlink. Returns the dated file."""
        self.dir.mkdir(parents=True, exist_ok=True)
        dated = self.path(time.strftime("%Y-%m-%d-%H-%M-%S"))
        fd = os.open(dated, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(cert_pem.rstrip(b"\n") + b"\n" + key_pem)
        self._update_symlink(dated)
        return dated

    def _update_symlink(self, filename: Path) -> None:
        current, updated = self.path("current"), self.path("updated")
        # certificate_store.go updateSymlink: a 'current' that exists and is not a symlink is unrecoverable.
        current_exists = current.is_symlink()
        if not current_exists and current.exists():
            raise StoreError(f'expected "{self.shown(current)}" to be a symlink but it is a file')
        if updated.is_symlink():
            updated.unlink()
        elif updated.exists():
            raise StoreError(f'expected "{self.shown(updated)}" to be a symlink but it is a file')
        if not filename.exists():
            raise StoreError(f'file "{self.shown(filename)}" does not exist so it can not be used as the currently '
                             "selected cert/key")
        updated.symlink_to(filename.absolute())
        if current_exists:
            current.unlink()  # upstream removes, then renames (recover() completes a swap cut in between)
        updated.replace(current)


@dataclass(frozen=True)
class Signer:
    cert: x509.Certificate
    key: PrivateKeyTypes


def embedded_credentials(kubeconfig: Path) -> tuple[bytes, bytes] | None:
    """The current user's client-certificate-data and client-key-data, or None (files, a token, unreadable)."""
    try:
        doc = yaml.safe_load(kubeconfig.read_text())
        context = next(c["context"] for c in doc["contexts"] if c["name"] == doc["current-context"])
        user = next(u["user"] for u in doc["users"] if u["name"] == context["user"])
        return (base64.b64decode(user["client-certificate-data"], validate=True),
                base64.b64decode(user["client-key-data"], validate=True))
    except (OSError, yaml.YAMLError, KeyError, TypeError, StopIteration, binascii.Error, ValueError):
        return None


def _load_signer(root: NodeRoot) -> Signer:
    """The CA kube-controller-manager signs kubelet client CSRs with (its --cluster-signing-cert/key-file)."""
    manifest = root.manifests / "kube-controller-manager.yaml"
    try:
        pod = yaml.safe_load(manifest.read_text())
        command = pod["spec"]["containers"][0]["command"]
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError) as exc:
        raise StoreError(f"no kube-controller-manager to sign the request ({exc})") from exc
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in command if arg.startswith("--") and "=" in arg)
    try:
        cert = x509.load_pem_x509_certificate(root.path(flags["cluster-signing-cert-file"]).read_bytes())
        key = serialization.load_pem_private_key(root.path(flags["cluster-signing-key-file"]).read_bytes(), None)
    except (KeyError, OSError, ValueError) as exc:
        raise StoreError(f"the controller-manager cannot sign: {exc}") from exc
    return Signer(cert, key)


def _sign(root: NodeRoot, current: x509.Certificate) -> tuple[bytes, bytes]:
    """A new ECDSA P-256 key (certificate_manager.go generateCSR) and a certificate for the same subject, as the
    controller-manager's csrsigning controller issues it: its signing duration, capped at the CA's expiry."""
    signer = _load_signer(root)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    not_after = min(now + timedelta(seconds=SIGNING_DURATION_S), signer.cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(current.subject)
        .issuer_name(signer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))  # the signer backdates against clock skew
        .not_valid_after(not_after)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(signer.key, hashes.SHA256())  # type: ignore[arg-type]  # a CA key is never X25519/X448
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _leaf(pem: bytes) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None


class ClientCertManager:
    """client-go util/certificate/certificate_manager.go for the kubelet's client certificate."""

    def __init__(self, root: NodeRoot, cert_dir: str, kubeconfig: Path | None) -> None:
        self.root = root
        self.store = FileStore(root, cert_dir)
        self.kubeconfig = kubeconfig
        self.started = time.monotonic()
        self._jitter: dict[int, float] = {}  # serial -> its 0.7..0.9, drawn once per certificate
        self.rotated = asyncio.Event()  # the API session reconnects with the new pair (transport.go closeAllConns)

    def bootstrap(self) -> None:
        """getCurrentCertificateOrBootstrap: with no current pair (or an expired one), kubelet.conf's embedded
        credentials go into the store. cmd/kubelet/app/server.go buildKubeletClientConfig: "kubeadm needs the
        initial data in the kubeconfig to be placed into the cert store"."""
        pem = self.store.current()
        leaf = _leaf(pem) if pem is not None else None
        if leaf is not None and datetime.now(UTC) < leaf.not_valid_after_utc:
            return
        embedded = embedded_credentials(self.kubeconfig) if self.kubeconfig is not None else None
        if embedded is None:
            return  # no kubelet.conf yet, or it already names files: nothing to bootstrap from
        cert_pem, key_pem = embedded
        try:
            dated = self.store.update(cert_pem, key_pem)
        except (StoreError, OSError) as exc:
            log.error("Unable to set the cert/key pair to the bootstrap certificate: %s", exc)  # noqa: TRY400
            return
        log.info("%s: wrote the bootstrap pair to %s", NAME, self.store.shown(dated))

    def deadline(self, leaf: x509.Certificate, faults: Faults) -> float:
        """nextRotationDeadline: notBefore + 70-90 % of the lifetime (jitteryDuration), as a monotonic time; the
        kubelet_client_rotation_after_s knob brings it forward (seconds after this kubelet started)."""
        lifetime_s = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
        fraction = self._jitter.setdefault(leaf.serial_number, random.uniform(0.7, 0.9))
        at = leaf.not_valid_before_utc.timestamp() + lifetime_s * fraction
        deadline = time.monotonic() + (at - time.time())
        if faults.kubelet_client_rotation_after_s is not None:
            deadline = min(deadline, self.started + faults.kubelet_client_rotation_after_s)
        return deadline

    def rotate(self) -> bool:
        """rotateCerts: True when a new pair is stored. Failures are logged with upstream's words."""
        log.info("%s: Rotating certificates", NAME)
        pem = self.store.current()
        leaf = _leaf(pem) if pem is not None else None
        if leaf is None:
            log.error("%s: Unable to load a client to request certificates: no current certificate", NAME)
            return False
        try:
            cert_pem, key_pem = _sign(self.root, leaf)
        except StoreError as exc:
            log.error("%s: certificate request was not signed: %s", NAME, exc)  # noqa: TRY400
            return False
        try:
            dated = self.store.update(cert_pem, key_pem)
        except (StoreError, OSError) as exc:
            log.error("%s: Unable to store the new cert/key pair: %s", NAME, exc)  # noqa: TRY400
            return False
        log.info("%s: rotated the client certificate: %s -> %s", NAME, self.store.shown(self.store.path("current")),
                 self.store.shown(dated))
        self.rotated.set()
        return True

    async def run(self, faults_now: Callable[[], Faults]) -> None:
        """Start: wait for the deadline, rotate with backoff, then every 32 s until it works; then the next one."""
        while True:
            pem = self.store.current()
            leaf = _leaf(pem) if pem is not None else None
            if leaf is None:
                await asyncio.sleep(1.0)  # no pair yet (bootstrap pending): look again
                continue
            wait_s = self.deadline(leaf, faults_now()) - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(min(wait_s, 1.0))  # short naps: a changed knob is seen within a second
                continue
            self.started = float("inf")  # the knob forces one rotation per kubelet start, not a loop
            await self._rotate_with_backoff()

    async def _rotate_with_backoff(self) -> None:
        if self.rotate():
            return
        for backoff_s in BACKOFF_S:
            await asyncio.sleep(backoff_s)
            if self.rotate():
                return
        log.error("%s: Reached backoff limit, still unable to rotate certs: timed out waiting for the condition", NAME)
        while True:
            await asyncio.sleep(POLL_AFTER_BACKOFF_S)
            if self.rotate():
                return
