"""Renewal on disk: every leaf certificate and kubeconfig (or the kubelet pem kubelet.conf points at) re-issued
with new keys from the CAs on disk, never the CAs or sa.key. All files are generated and staged next to their
targets before the first rename: a failure before that changes nothing. Key material never reaches a message.
The kubelet's `*-current.pem` stays what its certificate store needs: a symlink, swapped to a new dated file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from lifecycle import yamlsafe
from lifecycle.kubefiles import KubeconfigSpec, render_kubeconfig
from lifecycle.paths import HostPaths
from lifecycle.pki import CERT_MODE, KEY_MODE, KUBECONFIG_MODE, PkiError, plan_pki, read_existing, rooted_reader
from lifecycle.pki_specs import CA_NAMES, CertSpec, PkiParams, cert_specs, kubeconfig_specs
from lifecycle.pki_x509 import PrivateKey, cert_pem, issue_leaf, key_pem, load_cert, load_key, new_key, same_public_key


class RenewalError(Exception):
    """Renewal is impossible with what is on disk (a CA without its key, an expired CA); nothing was written."""

    def __init__(self, file: str, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.file = file
        self.reason = reason


@dataclass(frozen=True)
class RenewedFile:
    name: str  # as reported: "apiserver.crt", "etcd/server.key", "admin.conf", or a real path for a referenced pem
    path: Path  # where it goes (under the root)
    data: bytes = field(repr=False)  # may be key material
    mode: int
    # The kubelet's certificate store: `path` is a new dated pem and `link` (the `-current.pem` kubelet.conf names)
    # is the symlink swapped to it, as the kubelet's own rotation does.
    link: Path | None = None


# client-go util/certificate/certificate_store.go: the store keeps `<prefix>-current.pem` as a symlink to
# `<prefix>-<2006-01-02-15-04-05>.pem` and refuses to rotate ("expected ... to be a symlink but it is a file")
# once it is a plain file; `<prefix>-updated.pem` is its temporary link (its recover() completes a swap from it).
CURRENT_PEM_SUFFIX = "-current.pem"
UPDATED_PEM_SUFFIX = "-updated.pem"


def plan_renewal(paths: HostPaths, params: PkiParams, *, now: datetime) -> list[RenewedFile]:
    """Every file a renewal writes, generated in memory. Raises RenewalError (CA problems) or ValueError (bad SANs
    in the config) before anything is written."""
    existing = read_existing(paths.pki_dir, paths.kubernetes_dir)
    cas = {name: _load_ca(existing, name, now=now) for name in CA_NAMES}
    files: list[RenewedFile] = []
    for spec in cert_specs(params):
        if spec.ca is None:
            continue
        key = new_key(params.key_algorithm)
        cert = issue_leaf(spec, key, *cas[spec.ca], params, now=now)
        files.append(RenewedFile(f"{spec.name}.key", paths.pki_dir / f"{spec.name}.key", key_pem(key), KEY_MODE))
        files.append(RenewedFile(f"{spec.name}.crt", paths.pki_dir / f"{spec.name}.crt", cert_pem(cert), CERT_MODE))
    ca_cert, ca_key = cas["ca"]
    for kspec in kubeconfig_specs(params):
        files += _kubeconfig_files(paths, kspec, existing.get(kspec.file), ca_cert=ca_cert, ca_key=ca_key,
                                   params=params, now=now)
    return files


def has_cluster(paths: HostPaths) -> bool:
    """kubeadm's kubelet config and a static pod manifest exist: components run on (or start from) these files."""
    return paths.kubelet_config.is_file() and any(paths.manifests_dir.glob("*.yaml"))


def leaves_to_renew(paths: HostPaths, params: PkiParams, *, now: datetime) -> list[str]:
    """On a node with a cluster, the leaf certificates and kubeconfigs that must be re-issued from the CAs in place
    (expired, within the certs state's margin, wrong SANs...). [] when there is no cluster or nothing to re-issue,
    and when a renewal cannot do it: a CA to make anew, a CA key missing, a bad config (the certs step says why)."""
    if not has_cluster(paths):
        return []
    existing = read_existing(paths.pki_dir, paths.kubernetes_dir)
    try:
        _, problems = plan_pki(existing, params, now=now, read_file=rooted_reader(paths.root, paths.kubernetes_dir),
                               generate=False)
    except (PkiError, ValueError):
        return []
    leaves = {f"{spec.name}.crt" for spec in cert_specs(params) if spec.ca is not None}
    leaves |= {spec.file for spec in kubeconfig_specs(params)}
    if any(f"{spec.name}.crt" in {p.file for p in problems} for spec in cert_specs(params) if spec.ca is None):
        return []  # a CA is made anew: that is an install on a new PKI, not a renewal
    return [p.file for p in problems if p.file in leaves]


def _load_ca(existing: Mapping[str, bytes], name: str, *, now: datetime) -> tuple[x509.Certificate, PrivateKey]:
    try:
        cert = load_cert(existing[f"{name}.crt"])
    except KeyError:
        raise RenewalError(f"{name}.crt", "missing: there is no PKI to renew (install first)") from None
    except ValueError as exc:
        raise RenewalError(f"{name}.crt", str(exc)) from None
    try:
        key = load_key(existing[f"{name}.key"])
    except KeyError:
        raise RenewalError(f"{name}.key", "missing: certificates of an external CA are renewed by whoever holds "
                                          "its key (send them with the next install)") from None
    except ValueError as exc:
        raise RenewalError(f"{name}.key", str(exc)) from None
    public = cert.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if not same_public_key(public, key):
        raise RenewalError(f"{name}.key", f"does not match {name}.crt")
    if cert.not_valid_after_utc <= now:
        raise RenewalError(f"{name}.crt", f"the CA expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z: renewing "
                                          "what it signed cannot help (reset, then install with a new CA)")
    return cert, key


def _kubeconfig_files(
    paths: HostPaths, spec: KubeconfigSpec, current: bytes | None, *, ca_cert: x509.Certificate, ca_key: PrivateKey,
    params: PkiParams, now: datetime,
) -> list[RenewedFile]:
    client = CertSpec(spec.file, spec.common_name, spec.organization, ca="ca", client=True)
    key = new_key(params.key_algorithm)
    cert = issue_leaf(client, key, ca_cert, ca_key, params, now=now)
    referenced = client_files(current) if current is not None else None
    if referenced is None:
        data = render_kubeconfig(spec, ca_pem=cert_pem(ca_cert), cert_pem=cert_pem(cert), key_pem=key_pem(key))
        return [RenewedFile(spec.file, paths.kubeconfig(spec.file), data, KUBECONFIG_MODE)]
    # kubelet-finalize made the kubeconfig point at files: renew those, keep the kubeconfig as it is.
    cert_file, key_file = referenced
    if cert_file == key_file:
        pem, data = paths.under(cert_file), cert_pem(cert) + key_pem(key)
        if not pem.name.endswith(CURRENT_PEM_SUFFIX):
            return [RenewedFile(cert_file, pem, data, KEY_MODE)]  # a combined pem of someone else's: in place
        # Local time, as the kubelet's store names its files (time.Now().Format("2006-01-02-15-04-05")).
        dated = pem.with_name(f"{pem.name.removesuffix(CURRENT_PEM_SUFFIX)}-{now.astimezone():%Y-%m-%d-%H-%M-%S}.pem")
        return [RenewedFile(cert_file, dated, data, KEY_MODE, link=pem)]
    return [RenewedFile(key_file, paths.under(key_file), key_pem(key), KEY_MODE),
            RenewedFile(cert_file, paths.under(cert_file), cert_pem(cert), CERT_MODE)]


def client_files(kubeconfig: bytes) -> tuple[str, str] | None:
    """(client-certificate, client-key) paths of the current context's user when it names files, else None."""
    try:
        doc = yamlsafe.load(kubeconfig)
    except yaml.YAMLError:
        return None
    if not isinstance(doc, dict):
        return None
    context = _named(doc, "contexts", doc.get("current-context"), "context")
    user = _named(doc, "users", context.get("user"), "user")
    cert_file, key_file = user.get("client-certificate"), user.get("client-key")
    if "client-certificate-data" in user or not isinstance(cert_file, str) or not isinstance(key_file, str):
        return None
    if not cert_file.startswith("/") or not key_file.startswith("/"):
        return None  # kubeadm writes absolute paths; a relative one is not ours to guess
    return cert_file, key_file


def _named(doc: dict[str, Any], section: str, name: object, inner: str) -> dict[str, Any]:
    for item in doc.get(section) or []:
        if isinstance(item, dict) and item.get("name") == name and isinstance(item.get(inner), dict):
            return dict(item[inner])
    return {}


def write_renewal(files: list[RenewedFile]) -> list[str]:
    """Stage every file (written and fsynced next to its target), then rename them all into place.

    A failure while staging removes the staged files: nothing changed. Each file is replaced atomically; a key is
    renamed right before its certificate, so readers that check the pair (the API server) see a mismatch for
    microseconds at most and retry. A kubelet pem goes to its new dated file, then its `-current.pem` symlink is
    swapped by renaming a new symlink over it (the old dated file stays, as the kubelet leaves it). Returns the
    names, in order.
    """
    staged: list[tuple[Path, RenewedFile]] = []
    links: dict[Path, Path] = {}  # current symlink -> its staged replacement
    try:
        for item in files:
            staged.append((_stage(item), item))
            if item.link is not None:
                links[item.link] = _stage_link(item.link, target=item.path)
        for temp, item in staged:
            temp.replace(item.path)
            if item.link is not None:
                links[item.link].replace(item.link)  # rename(2): readers see the old link or the new one
    finally:
        for temp in [*(t for t, _ in staged), *links.values()]:
            temp.unlink(missing_ok=True)  # only those not renamed (a failure) are still there
    for directory in {item.path.parent for item in files}:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the renames survive a crash
        finally:
            os.close(dir_fd)
    return [item.name for item in files]


def _stage_link(current: Path, *, target: Path) -> Path:
    """`<prefix>-updated.pem` -> target (absolute, as the kubelet's store writes it). A leftover link of that name
    is replaced as the kubelet does; anything else there is not ours to remove."""
    updated = current.with_name(current.name.removesuffix(CURRENT_PEM_SUFFIX) + UPDATED_PEM_SUFFIX)
    if updated.is_symlink():
        updated.unlink()
    elif updated.exists():
        raise RenewalError(str(updated), "expected a symlink (the kubelet's temporary link) but it is a file")
    updated.symlink_to(target)
    return updated


def _stage(item: RenewedFile) -> Path:
    fd, name = tempfile.mkstemp(dir=item.path.parent, prefix=f".{item.path.name}.renew-")
    temp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), item.mode)  # before any key byte is written
            out.write(item.data)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    return temp
