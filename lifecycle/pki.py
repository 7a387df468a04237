"""The kubeadm PKI and kubeconfigs on disk: which files to keep, which to (re)issue (`plan_pki`, pure: all
generation happens before anything is written), checks (`validate_pki`, `earliest_expiry`), and their writing.
Key material never appears in a message, a log line or a repr.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from lifecycle.atomicfile import write_atomic
from lifecycle.kubefiles import KubeconfigSpec, parse_kubeconfig, render_kubeconfig
from lifecycle.paths import KUBECONFIG_NAMES
from lifecycle.pki_specs import CERT_NAMES, CertSpec, PkiParams, cert_specs, kubeconfig_specs
from lifecycle.pki_x509 import (
    PrivateKey,
    cert_pem,
    check_cert,
    issue_ca,
    issue_leaf,
    key_pem,
    load_cert,
    load_key,
    new_key,
    public_pem,
    same_cert,
    same_public_key,
)

__all__ = [
    "PkiError",
    "PkiParams",
    "PlannedFile",
    "Problem",
    "earliest_expiry",
    "plan_pki",
    "read_existing",
    "validate_pki",
    "write_files",
]

KEY_MODE, CERT_MODE, KUBECONFIG_MODE = 0o600, 0o644, 0o600
ReadFile = Callable[[str], bytes]


@dataclass(frozen=True)
class Problem:
    file: str  # relative to the directory checked: "apiserver.crt", "etcd/server.key", "admin.conf"
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


@dataclass(frozen=True)
class PlannedFile:
    name: str  # as in Problem.file
    data: bytes = field(repr=False)  # may be key material
    mode: int
    reason: str  # why it is written: the problem it fixes


class PkiError(Exception):
    """The PKI cannot be completed from what is on disk (a CA certificate without its key)."""

    def __init__(self, file: str, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.file = file
        self.reason = reason


# ---- planning -----------------------------------------------------------------------------------------


def _no_files(path: str) -> bytes:
    raise FileNotFoundError(2, "file references are not followed here", path)


class _Planner:
    """Walks the specs in order (CAs first), keeping what is valid and issuing the rest from the current CAs."""

    def __init__(
        self, existing: Mapping[str, bytes], params: PkiParams, *, now: datetime, read_file: ReadFile, generate: bool
    ) -> None:
        self.existing = existing
        self.params = params
        self.now = now
        self.read_file = read_file
        self.generate = generate
        self.cas: dict[str, tuple[x509.Certificate | None, PrivateKey | None]] = {}
        self.renewed: set[str] = set()  # CAs made anew: everything they signed is re-issued
        self.files: list[PlannedFile] = []
        self.problems: list[Problem] = []

    def _load(self, name: str) -> tuple[x509.Certificate | None, PrivateKey | None, list[str]]:
        cert = key = None
        reasons: list[str] = []
        try:
            cert = load_cert(self.existing[name + ".crt"])
        except KeyError:
            reasons.append(f"{name}.crt is missing")
        except ValueError as exc:
            reasons.append(f"{name}.crt: {exc}")
        try:
            key = load_key(self.existing[name + ".key"])
        except KeyError:
            reasons.append(f"{name}.key is missing")
        except ValueError as exc:
            reasons.append(f"{name}.key: {exc}")
        return cert, key, reasons

    def ca(self, spec: CertSpec) -> None:
        cert, key, reasons = self._load(spec.name)
        if cert is not None:
            reasons += check_cert(spec, cert, key, None, self.params, now=self.now)
        if not reasons:
            self.cas[spec.name] = (cert, key)
            return
        if cert is not None and reasons == [f"{spec.name}.key is missing"]:
            self.cas[spec.name] = (cert, None)  # external CA: fine while nothing needs issuing from it
            return
        self.renewed.add(spec.name)
        why = "; ".join(reasons)
        self.problems.append(Problem(spec.name + ".crt", why))
        new_ca_key = new_key(self.params.key_algorithm) if self.generate else None
        new_ca = issue_ca(spec, new_ca_key, self.params, now=self.now) if new_ca_key is not None else None
        self.cas[spec.name] = (new_ca, new_ca_key)
        self._add_pair(spec.name, new_ca, new_ca_key, f"new CA ({why})")

    def leaf(self, spec: CertSpec) -> None:
        assert spec.ca is not None
        cert, key, reasons = self._load(spec.name)
        if spec.ca in self.renewed:
            reasons = [f"its CA {spec.ca}.crt is new"]
        elif cert is not None:
            reasons += check_cert(spec, cert, key, self.cas[spec.ca][0], self.params, now=self.now)
        if reasons:
            why = "; ".join(reasons)
            self.problems.append(Problem(spec.name + ".crt", why))
            new_cert, new_leaf_key = self._issue(spec, why)
            self._add_pair(spec.name, new_cert, new_leaf_key, why)

    def _issue(self, spec: CertSpec, why: str) -> tuple[x509.Certificate | None, PrivateKey | None]:
        assert spec.ca is not None
        ca_cert, ca_key = self.cas[spec.ca]
        if ca_key is None and spec.ca not in self.renewed:
            raise PkiError(f"{spec.ca}.key", f"missing (external CA mode): cannot issue {spec.name} ({why})")
        if not self.generate or ca_cert is None or ca_key is None:
            return None, None
        key = new_key(self.params.key_algorithm)
        return issue_leaf(spec, key, ca_cert, ca_key, self.params, now=self.now), key

    def _add_pair(self, name: str, cert: x509.Certificate | None, key: PrivateKey | None, why: str) -> None:
        self.files.append(PlannedFile(name + ".key", key_pem(key) if key else b"", KEY_MODE, why))
        self.files.append(PlannedFile(name + ".crt", cert_pem(cert) if cert else b"", CERT_MODE, why))

    def service_account(self) -> None:
        key: PrivateKey | None = None
        try:
            key = load_key(self.existing["sa.key"])
        except KeyError:
            self.problems.append(Problem("sa.key", "missing"))
        except ValueError as exc:
            self.problems.append(Problem("sa.key", str(exc)))
        if key is None:
            key = new_key(self.params.key_algorithm) if self.generate else None
            self.files.append(PlannedFile("sa.key", key_pem(key) if key else b"", KEY_MODE, "new key"))
        elif same_public_key(self.existing.get("sa.pub", b""), key):
            return
        else:
            self.problems.append(Problem("sa.pub", "missing or not the public half of sa.key"))
        self.files.append(PlannedFile("sa.pub", public_pem(key) if key else b"", CERT_MODE, "public half of sa.key"))

    def kubeconfig(self, spec: KubeconfigSpec) -> None:
        reasons = self._kubeconfig_reasons(spec)
        if not reasons:
            return
        why = "; ".join(reasons)
        self.problems.append(Problem(spec.file, why))
        client = CertSpec(spec.file, spec.common_name, spec.organization, ca="ca", client=True)
        cert, key = self._issue(client, why)
        ca_cert = self.cas["ca"][0]
        data = b""
        if cert is not None and key is not None and ca_cert is not None:
            data = render_kubeconfig(spec, ca_pem=cert_pem(ca_cert), cert_pem=cert_pem(cert), key_pem=key_pem(key))
        self.files.append(PlannedFile(spec.file, data, KUBECONFIG_MODE, why))

    def _kubeconfig_reasons(self, spec: KubeconfigSpec) -> list[str]:
        data = self.existing.get(spec.file)
        if data is None:
            return ["missing"]
        if "ca" in self.renewed:
            return ["its CA ca.crt is new"]
        try:
            content = parse_kubeconfig(data, read_file=self.read_file)
            ca, cert, key = load_cert(content.ca_pem), load_cert(content.cert_pem), load_key(content.key_pem)
        except ValueError as exc:
            return [str(exc)]
        reasons = []
        if content.server != spec.server:
            reasons.append(f"has got the wrong API server URL {content.server!r} (expected {spec.server!r})")
        if (content.cluster, content.user, content.context) != (spec.cluster, spec.user, spec.context):
            reasons.append(f"cluster/user/context are {content.cluster}/{content.user}/{content.context}, "
                           f"expected {spec.cluster}/{spec.user}/{spec.context}")
        ca_cert = self.cas["ca"][0]
        if ca_cert is None or not same_cert(ca, ca_cert):
            reasons.append("embedded CA is not ca.crt")
        client = CertSpec(spec.file, spec.common_name, spec.organization, ca="ca", client=True)
        return reasons + check_cert(client, cert, key, ca_cert, self.params, now=self.now)


def plan_pki(
    existing: Mapping[str, bytes], params: PkiParams, *, now: datetime, read_file: ReadFile = _no_files,
    generate: bool = True, kubeconfigs: bool = True,
) -> tuple[list[PlannedFile], list[Problem]]:
    """What to write so that the PKI (and kubeconfigs) is complete and valid; files not listed are kept as they are.

    `existing` maps names ("ca.crt", "etcd/server.key", "admin.conf") to contents. With `generate=False` nothing
    is issued (the planned files have no data): a dry run for checks. Raises ValueError for bad SANs in `params`,
    PkiError when a missing CA key makes issuing impossible.
    """
    planner = _Planner(existing, params, now=now, read_file=read_file, generate=generate)
    for spec in cert_specs(params):
        if spec.ca is None:
            planner.ca(spec)
        else:
            planner.leaf(spec)
    planner.service_account()
    if kubeconfigs:
        for kspec in kubeconfig_specs(params):
            planner.kubeconfig(kspec)
    return planner.files, planner.problems


# ---- disk ---------------------------------------------------------------------------------------------


def pki_file_names() -> list[str]:
    return [*(f"{name}{suffix}" for name in CERT_NAMES for suffix in (".crt", ".key")), "sa.key", "sa.pub"]


def rooted_reader(root: Path, kubeconfig_dir: Path) -> ReadFile:
    """Reads a path named inside a kubeconfig: real paths (`/var/lib/kubelet/...`) are re-rooted under `root`."""

    def read(name: str) -> bytes:
        path = Path(name)
        if not path.is_absolute():
            path = kubeconfig_dir / path
        elif not path.is_relative_to(root):
            path = root / name.lstrip("/")
        return path.read_bytes()

    return read


def read_existing(pki_dir: Path, kubeconfig_dir: Path | None) -> dict[str, bytes]:
    """Contents of every PKI file (and kubeconfig) that exists, by name."""
    existing: dict[str, bytes] = {}
    wanted = [(pki_dir, n) for n in pki_file_names()]
    wanted += [(kubeconfig_dir, n) for n in KUBECONFIG_NAMES] if kubeconfig_dir else []
    for directory, name in wanted:
        with contextlib.suppress(FileNotFoundError):
            existing[name] = (directory / name).read_bytes()
    return existing


def validate_pki(
    pki_dir: Path, expectations: PkiParams, *, kubeconfig_dir: Path | None = None, root: Path | None = None,
    now: datetime | None = None,
) -> list[Problem]:
    """Every problem with the PKI (and the kubeconfigs, when `kubeconfig_dir` is given), each naming its file."""
    existing = read_existing(pki_dir, kubeconfig_dir)
    reader = rooted_reader(root, kubeconfig_dir) if root and kubeconfig_dir else _no_files
    try:
        _, problems = plan_pki(existing, expectations, now=now or datetime.now(UTC), read_file=reader,
                               generate=False, kubeconfigs=kubeconfig_dir is not None)
    except PkiError as exc:
        return [Problem(exc.file, exc.reason)]
    return problems


def earliest_expiry(directory: Path) -> tuple[Path, datetime] | None:
    """The certificate (a *.crt below `directory`, or a kubeconfig's client certificate in it) that expires first."""
    found: list[tuple[datetime, Path]] = []
    for path in sorted(directory.rglob("*.crt")):
        try:
            found.append((load_cert(path.read_bytes()).not_valid_after_utc, path))
        except (OSError, ValueError):
            continue
    for path in sorted(directory.glob("*.conf")):
        try:
            content = parse_kubeconfig(path.read_bytes(), read_file=_no_files)
            found.append((load_cert(content.cert_pem).not_valid_after_utc, path))
        except (OSError, ValueError):
            continue
    if not found:
        return None
    when, path = min(found)
    return path, when


def write_files(planned: list[PlannedFile], *, pki_dir: Path, kubeconfig_dir: Path,
                wrote: Callable[[int, PlannedFile], None] | None = None) -> list[Path]:
    """Write every planned file atomically; `wrote(index, item)` (1-based) after each, from the calling thread."""
    written: list[Path] = []
    for item in planned:
        if not item.data:
            raise ValueError(f"{item.name}: planned without data (a dry-run plan cannot be written)")
    for index, item in enumerate(planned, start=1):
        target = (kubeconfig_dir if item.name in KUBECONFIG_NAMES else pki_dir) / item.name
        write_atomic(target, item.data, item.mode)
        written.append(target)
        if wrote is not None:
            wrote(index, item)
    for directory in {p.parent for p in written}:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the renames survive a crash
        finally:
            os.close(dir_fd)
    return written
