"""deploy/lifecycle.service on a Debian 12 machine (finding 14): `systemd-analyze verify` is clean with the unit
at its install path and the `lifecycle` executable where ExecStart says, and the unit pulls in what it orders
after: the Docker Engine (required) and cri-dockerd (wanted, so that restarting cri-dockerd to set its sandbox
image does not restart the service itself)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from simnode.host import CRI_DOCKER_UNIT
from simnode.systemd import parse_unit_text

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "lifecycle.service"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")  # the machine's own (systemd's targets, docker.service, ...)
# Units the service depends on, as their Debian packages ship them, for a machine that lacks one.
PACKAGED = {
    "cri-docker.service": CRI_DOCKER_UNIT,
    "cri-docker.socket": "[Unit]\nDescription=CRI Docker Socket for the API\nPartOf=cri-docker.service\n\n"
                         "[Socket]\nListenStream=%t/cri-dockerd.sock\nSocketMode=0660\nSocketUser=root\n"
                         "SocketGroup=docker\n\n[Install]\nWantedBy=sockets.target\n",
    "docker.service": "[Unit]\nDescription=Docker Application Container Engine\n\n"
                      "[Service]\nType=notify\nExecStart=/usr/sbin/dockerd -H fd://\n\n[Install]\n"
                      "WantedBy=multi-user.target\n",
    "mosquitto.service": "[Unit]\nDescription=Mosquitto MQTT Broker\n\n[Service]\nType=notify\n"
                         "ExecStart=/usr/sbin/mosquitto -c /etc/mosquitto/mosquitto.conf\n\n[Install]\n"
                         "WantedBy=multi-user.target\n",
}

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None or not SYSTEM_UNITS.is_dir(),
                                reason="systemd-analyze is missing: install Debian's systemd (scripts/services.sh)")


def _machine(tmp_path: Path) -> Path:
    """A root with the machine's systemd units, the packaged units we depend on, our unit at its install path
    (/etc/systemd/system/lifecycle.service) and a stub at its ExecStart path (/usr/local/bin/lifecycle)."""
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "lib").symlink_to("usr/lib")  # Debian 12: merged /usr
    for name, text in PACKAGED.items():
        path = root / "usr/lib/systemd/system" / name
        if not path.exists():
            path.write_text(text)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system/lifecycle.service")
    stub = root / "usr/local/bin/lifecycle"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return root


def _verify(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}", "/etc/systemd/system/lifecycle.service"],
                          capture_output=True, text=True, timeout=60, check=False)


def _dependencies(text: str) -> dict[str, set[str]]:
    deps: dict[str, set[str]] = {}
    for section, key, value in parse_unit_text(text):
        if section == "Unit":
            deps.setdefault(key, set()).update(value.split())
    return deps


def test_systemd_analyze_verify_is_clean_at_the_install_path(tmp_path: Path) -> None:
    root = _machine(tmp_path)
    result = _verify(root)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    # The check is real: without the executable, verify says so.
    (root / "usr/local/bin/lifecycle").unlink()
    missing = _verify(root)
    assert missing.returncode != 0 and "/usr/local/bin/lifecycle" in missing.stderr


def test_the_unit_pulls_in_docker_and_cri_dockerd_and_orders_after_them() -> None:
    deps = _dependencies(UNIT.read_text())
    after = deps.get("After", set())
    pulled = deps.get("Wants", set()) | deps.get("Requires", set())
    assert {"docker.service", "cri-docker.service"} <= after
    assert {"docker.service", "cri-docker.service"} <= pulled, "ordered after cri-docker.service but never starts it"
    assert "docker.service" in deps.get("Requires", set())
    # The service restarts cri-docker.service itself (lifecycle/hostunits.py): a Requires=, BindsTo= or PartOf=
    # on it would restart the service in the middle of its own install.
    binding = deps.get("Requires", set()) | deps.get("BindsTo", set()) | deps.get("PartOf", set())
    assert "cri-docker.service" not in binding


def _service_keys(text: str) -> dict[str, str]:
    return {key: value for section, key, value in parse_unit_text(text) if section == "Service"}


def test_the_unit_waits_for_ready_and_watches_the_loop() -> None:
    """Issue 11, part 3: READY=1 from the service itself, and a watchdog that a stalled loop trips."""
    keys = _service_keys(UNIT.read_text())
    assert keys["Type"] == "notify" and keys["NotifyAccess"] == "main"
    assert keys["WatchdogSec"] == "30"  # the service pings every WATCHDOG_USEC / 2 = 15 s
    assert keys["Restart"] in {"on-failure", "always", "on-watchdog"}  # a watchdog timeout gets a restart
