"""kubeadm's init-system calls on the simulated machine: `systemctl` looked up on the machine's PATH (under the
node root) and run as real kubeadm runs it. No systemctl: not a systemd host, and kubeadm only prints so.

Follows kubernetes/kubernetes cmd/kubeadm/app/util/initsystem/initsystem_unix.go (GetInitSystem: systemctl on the
PATH means systemd; ServiceExists: `systemctl status` output without "Loaded: not-found"; ServiceRestart:
`daemon-reload` then `restart`; ServiceStop: `stop`) and cmd/kubeadm/app/phases/kubelet/kubelet.go
(TryStopKubelet, TryStartKubelet: failures are warnings, never errors).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

from simnode.paths import NodeRoot
from simnode.systemd import find_systemctl

KUBELET = "kubelet"
_TIMEOUT_S = 60.0


def _systemctl(root: NodeRoot, *args: str) -> tuple[int, str]:
    systemctl = find_systemctl(root)
    assert systemctl is not None
    proc = subprocess.run([str(systemctl), *args], capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
    return proc.returncode, proc.stdout


def _service_exists(root: NodeRoot, service: str) -> bool:
    _, stdout = _systemctl(root, "status", service)
    return "Loaded: not-found" not in stdout


def _run_or_error(root: NodeRoot, *args: str) -> str | None:
    code, _ = _systemctl(root, *args)
    return None if code == 0 else f"exit status {code}"


def try_stop_kubelet(root: NodeRoot, out: Callable[[str], None]) -> None:
    """TryStopKubelet: stop the kubelet service so it does not read half-written files."""
    if find_systemctl(root) is None:
        out("[kubelet-start] No supported init system detected, won't make sure the kubelet not running for a "
            "short period of time while setting up configuration for it.")
        return
    if not _service_exists(root, KUBELET):
        out("[kubelet-start] Couldn't detect a kubelet service, can't make sure the kubelet not running for a "
            "short period of time while setting up configuration for it.")
    error = _run_or_error(root, "stop", KUBELET)
    if error:
        out(f"[kubelet-start] WARNING: unable to stop the kubelet service momentarily: [{error}]")


def try_start_kubelet(root: NodeRoot, out: Callable[[str], None]) -> None:
    """TryStartKubelet: `systemctl daemon-reload && systemctl restart kubelet`, a warning if that fails."""
    if find_systemctl(root) is None:
        out("[kubelet-start] No supported init system detected, won't make sure the kubelet is running properly.")
        return
    if not _service_exists(root, KUBELET):
        out("[kubelet-start] Couldn't detect a kubelet service, can't make sure the kubelet is running properly.")
    error = _run_or_error(root, "daemon-reload")
    error = f"failed to reload systemd: {error}" if error else _run_or_error(root, "restart", KUBELET)
    if error:
        out(f"[kubelet-start] WARNING: unable to start the kubelet service: [{error}]")
        out("[kubelet-start] Please ensure kubelet is reloaded and running manually.")


def stop_kubelet_for_reset(root: NodeRoot, out: Callable[[str], None]) -> None:
    """cmd/kubeadm/app/cmd/phases/reset/cleanupnode.go runCleanupNode: stop the kubelet service first."""
    if find_systemctl(root) is None:
        out("[reset] The kubelet service could not be stopped by kubeadm. Unable to detect a supported init system!")
        out("[reset] Please ensure kubelet is stopped manually")
        return
    out("[reset] Stopping the kubelet service")
    error = _run_or_error(root, "stop", KUBELET)
    if error:
        out(f"[reset] The kubelet service could not be stopped by kubeadm: [{error}]")
        out("[reset] Please ensure kubelet is stopped manually")
