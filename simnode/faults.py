"""Fault and timing knobs of the simulated node, read from `<root>/etc/simnode/faults.json`.

The file is re-read at every decision point, so a test can add or remove a fault while the node runs.
A missing file means no faults and the default delays. A file that is not valid JSON or has keys of the
wrong type is an error the component reports (it never silently ignores a knob it cannot read).

Format (every key optional):

    {
      "delays_s": {                    # seconds; defaults below
        "kubeadm_phase": 0.0,          # before each kubeadm phase
        "kubelet_start": 0.0,          # before kubelet answers /healthz
        "apiserver_start": 0.0,        # before kube-apiserver listens
        "apiserver_ready": 0.5,        # after it listens, before /readyz says ok
        "pod_running": 0.3,            # from pod seen by kubelet to phase Running
        "pod_ready": 0.3               # from Running to the Ready condition
      },
      "kubeadm_fail": {"phase": "wait-control-plane", "message": "...", "exit_code": 1},
      "apiserver_never_ready": false,  # /readyz stays 500
      "crashloop_pods": ["coredns"],   # pods whose name starts with one of these crash-loop
      "kubelet_exit_after_s": null,    # kubelet exits (status 1) this long after it starts
      "kubelet_client_rotation_after_s": null, # kubelet rotates its client certificate this long after it
                                               # starts (instead of at 70-90 % of the certificate's lifetime)
      "engine_cgroup_driver": null,    # "systemd"/"cgroupfs": the driver the simulated runtime sees in `docker info`
      "apiserver_unhealthy_version": null, # "v1.32.1": a kube-apiserver of that version never passes /readyz
                                           # (`kubeadm upgrade apply` to it then rolls its static pods back)
      "kubeadm_upgrade_timeout_s": null    # how long `kubeadm upgrade apply` waits for each upgraded component
                                           # (upstream's UpgradeManifestTimeout, 5 min; a test shortens it)
    }
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_DELAYS_S: dict[str, float] = {
    "kubeadm_phase": 0.0,
    "kubelet_start": 0.0,
    "apiserver_start": 0.0,
    "apiserver_ready": 0.5,
    "pod_running": 0.3,
    "pod_ready": 0.3,
}


class FaultsFileError(Exception):
    """The faults file exists but cannot be used."""


@dataclass(frozen=True)
class KubeadmFail:
    phase: str
    message: str
    exit_code: int = 1


@dataclass(frozen=True)
class Faults:
    delays_s: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_DELAYS_S))
    kubeadm_fail: KubeadmFail | None = None
    apiserver_never_ready: bool = False
    crashloop_pods: tuple[str, ...] = ()
    kubelet_exit_after_s: float | None = None
    kubelet_client_rotation_after_s: float | None = None
    engine_cgroup_driver: str | None = None  # what the simulated runtime believes `docker info` says
    apiserver_unhealthy_version: str | None = None
    kubeadm_upgrade_timeout_s: float | None = None

    def delay_s(self, name: str) -> float:
        return self.delays_s.get(name, DEFAULT_DELAYS_S.get(name, 0.0))

    def crashloops(self, pod_name: str) -> bool:
        return any(pod_name.startswith(prefix) for prefix in self.crashloop_pods)


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise FaultsFileError(f"{key}: expected a number >= 0, got {value!r}")
    return float(value)


def load_faults(path: Path) -> Faults:
    """Read the faults file; a missing file means defaults."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Faults()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FaultsFileError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise FaultsFileError(f"{path}: expected a JSON object")
    known = {"delays_s", "kubeadm_fail", "apiserver_never_ready", "crashloop_pods", "kubelet_exit_after_s",
             "kubelet_client_rotation_after_s", "engine_cgroup_driver", "apiserver_unhealthy_version",
             "kubeadm_upgrade_timeout_s"}
    unknown = set(raw) - known
    if unknown:
        raise FaultsFileError(f"{path}: unknown keys {sorted(unknown)}")

    delays = dict(DEFAULT_DELAYS_S)
    raw_delays = raw.get("delays_s", {})
    if not isinstance(raw_delays, dict):
        raise FaultsFileError("delays_s: expected an object")
    for key, value in raw_delays.items():
        if key not in DEFAULT_DELAYS_S:
            raise FaultsFileError(f"delays_s.{key}: unknown delay (known: {sorted(DEFAULT_DELAYS_S)})")
        delays[key] = _number(value, f"delays_s.{key}")

    fail: KubeadmFail | None = None
    raw_fail = raw.get("kubeadm_fail")
    if raw_fail is not None:
        if not isinstance(raw_fail, dict) or not isinstance(raw_fail.get("phase"), str):
            raise FaultsFileError("kubeadm_fail: expected {\"phase\": str, \"message\": str}")
        exit_code = raw_fail.get("exit_code", 1)
        if not isinstance(exit_code, int) or not 1 <= exit_code <= 255:
            raise FaultsFileError("kubeadm_fail.exit_code: expected an integer 1..255")
        fail = KubeadmFail(
            phase=raw_fail["phase"],
            message=str(raw_fail.get("message", f"simulated failure in phase {raw_fail['phase']}")),
            exit_code=exit_code,
        )

    never_ready = raw.get("apiserver_never_ready", False)
    if not isinstance(never_ready, bool):
        raise FaultsFileError("apiserver_never_ready: expected true or false")
    crash = raw.get("crashloop_pods", [])
    if not isinstance(crash, list) or not all(isinstance(c, str) for c in crash):
        raise FaultsFileError("crashloop_pods: expected a list of pod name prefixes")
    exit_after = raw.get("kubelet_exit_after_s")
    rotation_after = raw.get("kubelet_client_rotation_after_s")
    cgroup_driver = raw.get("engine_cgroup_driver")
    if cgroup_driver not in (None, "cgroupfs", "systemd"):
        raise FaultsFileError('engine_cgroup_driver: expected "cgroupfs", "systemd" or null')
    unhealthy_version = raw.get("apiserver_unhealthy_version")
    if unhealthy_version is not None and not isinstance(unhealthy_version, str):
        raise FaultsFileError('apiserver_unhealthy_version: expected a version ("v1.32.1") or null')
    upgrade_timeout = raw.get("kubeadm_upgrade_timeout_s")
    return Faults(
        delays_s=delays,
        kubeadm_fail=fail,
        apiserver_never_ready=never_ready,
        crashloop_pods=tuple(crash),
        kubelet_exit_after_s=None if exit_after is None else _number(exit_after, "kubelet_exit_after_s"),
        kubelet_client_rotation_after_s=None if rotation_after is None
        else _number(rotation_after, "kubelet_client_rotation_after_s"),
        engine_cgroup_driver=cgroup_driver,
        apiserver_unhealthy_version=unhealthy_version,
        kubeadm_upgrade_timeout_s=None if upgrade_timeout is None
        else _number(upgrade_timeout, "kubeadm_upgrade_timeout_s"),
    )
