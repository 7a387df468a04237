"""Watches certificate expiry: the earliest expiry for the status, `lifecycle.certs.expiring` once per threshold
crossed, automatic renewal `pki.renew_before_days` before the first leaf expires (all through the engine, which
alone emits). Leaves `<state_dir>/certs.json`: the thresholds that fired, so a restart does not repeat them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from lifecycle.atomicfile import write_atomic
from lifecycle.bus import Bus
from lifecycle.config import PkiConfig
from lifecycle.engine import Engine
from lifecycle.errors import RequestError
from lifecycle.kubefiles import parse_kubeconfig
from lifecycle.logging import get_logger
from lifecycle.machine import State
from lifecycle.paths import KUBECONFIG_NAMES, HostPaths
from lifecycle.pki import rooted_reader
from lifecycle.pki_specs import CA_NAMES
from lifecycle.pki_x509 import load_cert
from lifecycle.protocol import CertsStatus, iso_time
from lifecycle.renewal import client_files

DAY_S = 86400.0
_MIN_WAIT_S = 0.05
_BUSY_RETRY_S = 2.0  # the engine refused an automatic renewal (a re-check after a restart runs): ask again soon


@dataclass(frozen=True)
class CertInfo:
    file: str  # as in CertsStatus.file
    not_after: float  # epoch seconds
    is_ca: bool


@dataclass(frozen=True)
class Scan:
    certs: tuple[CertInfo, ...]
    can_renew: bool  # every CA key is present: the service can issue leaves

    @property
    def earliest(self) -> CertInfo | None:
        return min(self.certs, key=lambda c: (c.not_after, c.file), default=None)

    def renew_at(self, renew_before_days: float) -> float | None:
        """When automatic renewal is due; None when disabled, impossible, or useless (a CA ends first)."""
        leaves = [c for c in self.certs if not c.is_ca]
        if renew_before_days <= 0 or not self.can_renew or not leaves:
            return None
        first = min(c.not_after for c in leaves)
        ca_end = min((c.not_after for c in self.certs if c.is_ca), default=float("inf"))
        if first >= ca_end - 1:
            return None  # leaves end with their CA: renewing them would not move the date
        return first - renew_before_days * DAY_S


def scan_certs(paths: HostPaths) -> Scan:
    """Every certificate of the node: PKI files, kubeconfig client certificates (or the files they point at)."""
    found: list[CertInfo] = []
    if paths.pki_dir.is_dir():
        for path in sorted(paths.pki_dir.rglob("*.crt")):
            if path.name.startswith("."):
                continue  # a renewal's staged file
            with contextlib.suppress(OSError, ValueError):
                cert = load_cert(path.read_bytes())
                found.append(CertInfo(str(path.relative_to(paths.pki_dir)), cert.not_valid_after_utc.timestamp(),
                                      _is_ca(cert)))
    reader = rooted_reader(paths.root, paths.kubernetes_dir)
    for name in KUBECONFIG_NAMES:
        with contextlib.suppress(OSError, ValueError):
            data = paths.kubeconfig(name).read_bytes()
            cert = load_cert(parse_kubeconfig(data, read_file=reader).cert_pem)
            referenced = client_files(data)
            found.append(CertInfo(referenced[0] if referenced else name, cert.not_valid_after_utc.timestamp(), False))
    can_renew = all((paths.pki_dir / f"{ca}.key").is_file() for ca in CA_NAMES)
    return Scan(tuple(found), can_renew)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


@dataclass(frozen=True)
class Fired:
    """Thresholds already announced for the certificate that expires first (by its expiry: a new one re-arms)."""

    not_after: float
    thresholds: tuple[float, ...] = ()


def due_warning(
    earliest: CertInfo, thresholds: tuple[float, ...], fired: Fired | None, *, now: float
) -> tuple[dict[str, Any] | None, Fired]:
    """The `lifecycle.certs.expiring` data to emit now (None: nothing new) and what has fired after it.

    Thresholds crossed together (a certificate issued for less than the largest) give one event, for the
    tightest; the others count as fired, so each threshold is announced at most once per certificate."""
    if fired is None or round(fired.not_after) != round(earliest.not_after):
        fired = Fired(earliest.not_after)
    days_left = (earliest.not_after - now) / DAY_S
    new = [t for t in thresholds if days_left <= t and t not in fired.thresholds]
    if not new:
        return None, fired
    data = {"file": earliest.file, "not_after": iso_time(earliest.not_after), "days_left": round(days_left, 6),
            "threshold_days": min(new)}
    return data, Fired(fired.not_after, tuple(sorted({*fired.thresholds, *new}, reverse=True)))


def next_wake_s(scan: Scan, fired: Fired | None, pki: PkiConfig, *, now: float) -> float:
    """Seconds until something is due (a threshold, the renewal), at most `check_interval_s`."""
    waits = [pki.check_interval_s]
    earliest = scan.earliest
    if earliest is not None:
        done = fired.thresholds if fired is not None and round(fired.not_after) == round(earliest.not_after) else ()
        waits += [earliest.not_after - t * DAY_S - now for t in pki.expiry_warning_days if t not in done]
    renew_at = scan.renew_at(pki.renew_before_days)
    if renew_at is not None:
        waits.append(renew_at - now)
    return max(_MIN_WAIT_S, min(w for w in waits if w > 0))  # check_interval_s > 0 is always among them


def load_fired(path: Path) -> Fired | None:
    try:
        raw = json.loads(path.read_text())
        return Fired(float(raw["not_after"]), tuple(float(t) for t in raw["fired_days"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None  # a torn or foreign file: warnings may repeat once, nothing worse


def save_fired(path: Path, fired: Fired) -> None:
    data = json.dumps({"not_after": fired.not_after, "fired_days": list(fired.thresholds)}).encode()
    write_atomic(path, data, 0o644)


class CertWatch:
    """The background task: checks at every state change and whenever something falls due."""

    def __init__(
        self, *, pki: PkiConfig, paths: HostPaths, engine: Engine, bus: Bus,
        on_scan: Callable[[Scan], None] | None = None,
    ) -> None:
        self._on_scan = on_scan  # told every scan (the metrics' expiry per file)
        self._pki = pki
        self._paths = paths
        self._engine = engine
        self._changes = bus.subscribe("certs-watch", max_items=1000)
        self._fired_path = paths.state_dir / "certs.json"
        self._fired = load_fired(self._fired_path)
        self._auto_tried: tuple[float, float] | None = None  # (earliest leaf expiry, loop time) of the last try
        self._log = get_logger("lifecycle.certwatch")

    async def run(self) -> None:
        while True:
            try:
                wait_s = await self.check()
            except Exception:  # a bug here must not end expiry checks for the life of the service
                self._log.exception("certificate check failed")
                wait_s = min(self._pki.check_interval_s, 60.0)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._changes.state_changed()

    async def check(self) -> float:
        """One pass; returns how long to wait before the next one (a state change cuts it short)."""
        if self._engine.state in (State.RENEWING, State.RESETTING):
            return self._pki.check_interval_s  # files in flux; the end of the job is a state change
        scan = await asyncio.to_thread(scan_certs, self._paths)
        if self._on_scan is not None:
            self._on_scan(scan)
        now = time.time()
        earliest, renew_at = scan.earliest, scan.renew_at(self._pki.renew_before_days)
        status = CertsStatus(earliest.not_after, earliest.file, renew_at) if earliest else None
        retry_in_s: float | None = None
        if renew_at is not None and now >= renew_at and self._engine.state == State.RUNNING:
            retry_in_s = await self._renew(renew_at)
            if retry_in_s is None:
                self._engine.report_certs(status)
                return self._pki.check_interval_s  # renewing: its end is a state change
        if earliest is None:
            self._engine.report_certs(None)
            return self._pki.check_interval_s
        warning, fired = due_warning(earliest, self._pki.expiry_warning_days, self._fired, now=now)
        if warning is not None:
            warning["renew_at"] = iso_time(renew_at) if renew_at is not None else None
        self._engine.report_certs(status, expiring=[warning] if warning else [])
        if fired != self._fired:
            self._fired = fired
            await asyncio.to_thread(save_fired, self._fired_path, fired)
        # A renewal that does not happen (it failed, the engine is busy) leaves the warnings to say so.
        return min(next_wake_s(scan, self._fired, self._pki, now=now), retry_in_s or float("inf"))

    async def _renew(self, renew_at: float) -> float | None:
        """Start an automatic renewal; None once started, else seconds until the next try."""
        loop_now = asyncio.get_running_loop().time()
        leaf_end = renew_at + self._pki.renew_before_days * DAY_S
        if self._auto_tried is not None and self._auto_tried[0] == leaf_end:
            # The last try left the same certificates: do not loop on a renewal that fails.
            wait_s = self._auto_tried[1] + self._pki.check_interval_s - loop_now
            if wait_s > 0:
                return wait_s
        self._auto_tried = (leaf_end, loop_now)
        request_id = f"auto-renew-{int(time.time())}"
        try:
            await self._engine.renew_certs(request_id=request_id)
        except RequestError as exc:
            self._log.info("automatic renewal not started", code=exc.code, reason=exc.message)
            self._auto_tried = None
            return _BUSY_RETRY_S
        self._log.info("automatic renewal started", request_id=request_id, due=iso_time(renew_at))
        return None
