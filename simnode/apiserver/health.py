"""/healthz, /livez and /readyz with the real server's check names; readiness follows the fault knobs."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from simnode.faults import FaultsFileError, load_faults
from simnode.launch import component_version

log = logging.getLogger(__name__)

_CHECKS = (
    "ping",
    "log",
    "etcd",
    "etcd-readiness",
    "informer-sync",
    "poststarthook/start-apiserver-admission-initializer",
    "poststarthook/generic-apiserver-start-informers",
    "poststarthook/start-apiextensions-informers",
    "poststarthook/crd-informer-synced",
    "poststarthook/rbac/bootstrap-roles",
    "poststarthook/bootstrap-controller",
    "poststarthook/start-kube-aggregator-informers",
    "shutdown",
)
_READY_ONLY = ("etcd-readiness", "informer-sync", "shutdown")


class Health:
    def __init__(self, faults_file: Path) -> None:
        self.faults_file = faults_file
        self.listening_at: float | None = None
        self.shutting_down = False

    def _failures(self, endpoint: str) -> dict[str, str]:
        if self.listening_at is None:
            return {"ping": "not listening"}
        if endpoint != "readyz":
            return {}
        if self.shutting_down:
            return {"shutdown": "process is shutting down"}
        try:
            faults = load_faults(self.faults_file)
        except FaultsFileError as exc:
            log.error("readyz: %s", exc)  # noqa: TRY400 (expected condition: no traceback)
            return {"etcd-readiness": f"fault knobs unreadable: {exc}"}
        if faults.apiserver_never_ready:
            return {"etcd-readiness": "reason withheld"}
        if faults.apiserver_unhealthy_version is not None and faults.apiserver_unhealthy_version == component_version():
            return {"etcd-readiness": f"simulated fault: this {component_version()} kube-apiserver is not healthy"}
        if time.monotonic() - self.listening_at < faults.delay_s("apiserver_ready"):
            return {"poststarthook/rbac/bootstrap-roles": "not finished"}
        return {}

    def check(self, endpoint: str, sub: str, verbose: bool, excluded: list[str]) -> tuple[int, str]:
        """HTTP status and body for /<endpoint>[/<sub>]."""
        names = [c for c in _CHECKS if endpoint == "readyz" or c not in _READY_ONLY]
        failures = self._failures(endpoint)
        if sub:
            if sub not in names:
                return 404, "404 page not found\n"
            if sub in failures:
                return 500, f"internal server error: {failures[sub]}\n"
            return 200, "ok"
        shown = [c for c in names if c not in excluded]
        failed = [c for c in shown if c in failures]
        if not failed and not verbose:
            return 200, "ok"
        lines = [f"[-]{c} failed: {failures[c]}" if c in failures else f"[+]{c} ok" for c in shown]
        lines += [f"[+]{c} excluded: ok" for c in excluded if c in names]
        lines.append(f"{endpoint} check {'failed' if failed else 'passed'}")
        return (500 if failed else 200), "\n".join(lines) + "\n"
