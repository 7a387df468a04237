"""Upgrade in place: the version rules checked before anything changes, and what an upgrade keeps on disk.

Leaves `<state_dir>/upgrade.json` ({"from": version, "to": version}) from the request until the upgrade ends
(a restart in an upgrade state reads its target there), and the new binaries under `<state_dir>/upgrade/<to>/`
(a node root of their own: `<staging>/usr/bin/kubeadm`, ...) until they are in place. No I/O beyond those files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from lifecycle.errors import RequestError
from lifecycle.paths import HostPaths

RECORD_NAME = "upgrade.json"
STAGING_DIR = "upgrade"
_VERSION = re.compile(r"v([0-9]+)\.([0-9]+)\.([0-9]+)")


@dataclass(frozen=True)
class UpgradeRecord:
    from_version: str
    to_version: str


def parse_version(text: str) -> tuple[int, int, int]:
    match = _VERSION.fullmatch(text)
    if match is None:
        raise RequestError("invalid_request", f"'kubernetes_version' must look like v1.32.1, got {text!r}")
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def check_upgrade(current: str, target: str) -> None:
    """RequestError `upgrade_not_allowed` with the reason when kubeadm's skew rules forbid current -> target.

    kubeadm: cmd/kubeadm/app/phases/upgrade/policy.go (EnforceVersionPolicies): at most one minor version up
    (MaximumAllowedMinorVersionUpgradeSkew = 1), the major kept. Stricter than kubeadm: no downgrade at all
    (kubeadm lets one minor down through; etcd's data is not guaranteed to go back), and the same version is
    refused as nothing to do rather than re-applied."""
    c, t = parse_version(current), parse_version(target)
    if t == c:
        raise RequestError("upgrade_not_allowed", f"the cluster already runs {current}: nothing to upgrade")
    if t < c:
        raise RequestError("upgrade_not_allowed", f"{target} is older than the cluster's {current}: downgrades are "
                                                  "not supported (reset and install the older version instead)")
    if t[0] != c[0]:
        raise RequestError("upgrade_not_allowed", f"{current} -> {target} changes the major version")
    if t[1] > c[1] + 1:
        raise RequestError("upgrade_not_allowed",
                           f"{current} -> {target} skips a minor version: kubeadm upgrades one minor version at a "
                           f"time (upgrade to the latest configured v{c[0]}.{c[1] + 1}.x first)")


def staging_paths(paths: HostPaths, version: str) -> HostPaths:
    """The node root the new binaries are extracted under while the old ones still run."""
    return HostPaths(paths.state_dir / STAGING_DIR / version)


def read_record(paths: HostPaths) -> UpgradeRecord | None:
    try:
        raw = json.loads((paths.state_dir / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("from"), str) or not isinstance(raw.get("to"), str):
        return None
    return UpgradeRecord(from_version=raw["from"], to_version=raw["to"])


def write_record(paths: HostPaths, record: UpgradeRecord) -> None:
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    path = paths.state_dir / RECORD_NAME
    tmp = path.with_name(f".{RECORD_NAME}.tmp")
    with open(tmp, "w") as f:
        json.dump({"from": record.from_version, "to": record.to_version}, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def clear(paths: HostPaths) -> None:
    """The upgrade ended (done, abandoned or failed): its record and staged files go."""
    (paths.state_dir / RECORD_NAME).unlink(missing_ok=True)
    shutil.rmtree(paths.state_dir / STAGING_DIR, ignore_errors=True)


def control_plane_version(paths: HostPaths) -> str | None:
    """The version in the kube-apiserver manifest's image tag: what the control plane runs (None: unreadable)."""
    try:
        text = (paths.manifests_dir / "kube-apiserver.yaml").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        stripped = line.strip().removeprefix("- ")
        if stripped.startswith("image:"):
            tag = stripped.partition(":")[2].strip().strip("'\"").rpartition(":")[2]
            return tag if _VERSION.fullmatch(tag) else None
    return None


def staged_file(paths: HostPaths, version: str, path: str) -> Path:
    return staging_paths(paths, version).under(path)
