"""The simulated machine as a systemd host (findings 10, 13): its systemctl answers with systemd's exit codes and
messages, uses a changed unit only after daemon-reload, refuses a second ExecStart, runs a real process for a unit
whose executable exists; kubeadm's kubelet-start restarts a packaged kubelet.service (a second kubelet) unless it
is masked, and kubeadm reset stops it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_kubeadm_support import config_v1beta4, free_port, run_kubeadm
from test_kubelet_support import pid_alive, wait_for

from simnode.host import install_kubelet_package_units, prepare_host
from simnode.kubelet.sandbox import CRI_DOCKERD_DEFAULT_PAUSE, pause_image_of

# A kubelet that only sleeps: enough to tell whether systemd started one.
STUB_KUBELET = "#!/bin/sh\nexec sleep 120\n"


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "root"
    prepare_host(root)
    yield root
    for name, record in _units(root).items():
        if record.get("pid"):
            subprocess.run([str(root / "usr/bin/systemctl"), "stop", name], capture_output=True, check=False,
                           timeout=30)


def systemctl(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMNODE_")}  # the root comes from usr/bin
    return subprocess.run([str(root / "usr/bin/systemctl"), *args], capture_output=True, text=True, env=env,
                          timeout=30, check=False)


def _units(root: Path) -> dict[str, dict[str, object]]:
    try:
        data: dict[str, dict[str, object]] = json.loads((root / "run/simnode/systemd/units.json").read_text())
    except FileNotFoundError:
        return {}
    return data


def _stub_kubelet(root: Path) -> None:
    kubelet = root / "usr/bin/kubelet"
    kubelet.write_text(STUB_KUBELET)
    kubelet.chmod(0o755)


def test_systemctl_exit_codes_and_messages_follow_systemd(root: Path) -> None:
    # src/systemctl: unknown unit -> status 4, start/restart 5; not active -> is-active 3.
    status = systemctl(root, "status", "kubelet")
    assert (status.returncode, status.stderr.strip()) == (4, "Unit kubelet.service could not be found.")
    restart = systemctl(root, "restart", "kubelet")
    assert (restart.returncode, restart.stderr.strip()) == (5, "Failed to restart kubelet.service: Unit "
                                                                "kubelet.service not found.")
    assert systemctl(root, "stop", "kubelet").returncode == 5
    assert (systemctl(root, "is-active", "kubelet").stdout.strip(),
            systemctl(root, "is-active", "kubelet").returncode) == ("inactive", 3)
    # cri-dockerd's packaged unit was started at boot with its packaged command line.
    assert systemctl(root, "is-active", "cri-docker").stdout.strip() == "active"
    assert systemctl(root, "status", "cri-docker").returncode == 0
    assert _units(root)["cri-docker.service"]["argv"] == ["/usr/bin/cri-dockerd", "--container-runtime-endpoint",
                                                          "fd://"]
    # A masked unit is refused by start and restart (exit 1) and stopping it is fine.
    assert systemctl(root, "mask", "kubelet").returncode == 0
    assert (root / "etc/systemd/system/kubelet.service").readlink() == Path("/dev/null")
    masked = systemctl(root, "restart", "kubelet")
    assert (masked.returncode, masked.stderr.strip()) == (1, "Failed to restart kubelet.service: Unit "
                                                             "kubelet.service is masked.")
    assert systemctl(root, "is-enabled", "kubelet").stdout.strip() == "masked"
    assert "Loaded: masked" in systemctl(root, "status", "kubelet").stdout
    assert systemctl(root, "unmask", "kubelet").returncode == 0
    assert not (root / "etc/systemd/system/kubelet.service").is_symlink()


def test_a_changed_unit_counts_only_after_daemon_reload_and_a_second_exec_start_is_refused(root: Path) -> None:
    drop_in = root / "etc/systemd/system/cri-docker.service.d/10-test.conf"
    drop_in.parent.mkdir(parents=True)
    drop_in.write_text("[Service]\nExecStart=\nExecStart=/usr/bin/cri-dockerd --container-runtime-endpoint fd:// "
                       "--pod-infra-container-image=example.test/pause:3.10\n")
    stale = systemctl(root, "restart", "cri-docker")
    assert stale.returncode == 0 and "changed on disk. Run 'systemctl daemon-reload'" in stale.stderr
    argv = [str(a) for a in _units(root)["cri-docker.service"]["argv"]]  # type: ignore[attr-defined]
    assert pause_image_of(argv) == CRI_DOCKERD_DEFAULT_PAUSE
    assert systemctl(root, "daemon-reload").returncode == 0
    assert systemctl(root, "restart", "cri-docker").returncode == 0
    argv = [str(a) for a in _units(root)["cri-docker.service"]["argv"]]  # type: ignore[attr-defined]
    assert pause_image_of(argv) == "example.test/pause:3.10"
    # Without the `ExecStart=` reset the unit has two commands: systemd refuses to load it.
    drop_in.write_text("[Service]\nExecStart=/usr/bin/cri-dockerd --pod-infra-container-image=x/pause:1\n")
    systemctl(root, "daemon-reload")
    bad = systemctl(root, "restart", "cri-docker")
    assert bad.returncode == 1 and "bad unit file setting" in bad.stderr and "more than one ExecStart" in bad.stderr


def test_kubeadm_kubelet_start_restarts_a_packaged_kubelet_unless_it_is_masked(root: Path, tmp_path: Path) -> None:
    install_kubelet_package_units(root)
    _stub_kubelet(root)
    config = tmp_path / "kubeadm.yaml"
    config.write_text(config_v1beta4(port=free_port(), healthz_port=free_port()))

    result = run_kubeadm(root, "init", "phase", "kubelet-start", f"--config={config}")
    assert result.returncode == 0, result.stderr
    record = _units(root)["kubelet.service"]
    pid = record["pid"]
    assert isinstance(pid, int) and pid_alive(pid), "kubelet-start did not start kubelet.service"
    # The flags of kubeadm's drop-in, with the env file kubelet-start just wrote.
    argv = record["argv"]
    assert isinstance(argv, list) and "--config=/var/lib/kubelet/config.yaml" in argv
    assert any(str(a).startswith("--pod-infra-container-image=") for a in argv)

    # Masked (what the lifecycle service does): `systemctl mask --now` stops it, kubelet-start only warns.
    assert systemctl(root, "mask", "--now", "kubelet").returncode == 0
    wait_for(lambda: not pid_alive(pid), timeout_s=10, what="kubelet.service to stop")
    result = run_kubeadm(root, "init", "phase", "kubelet-start", f"--config={config}")
    assert result.returncode == 0, result.stderr
    assert "[kubelet-start] WARNING: unable to start the kubelet service: [exit status 1]" in result.stdout
    assert systemctl(root, "is-active", "kubelet").returncode == 3

    # kubeadm reset's cleanup-node stops the unit first (and only warns when it cannot).
    systemctl(root, "unmask", "kubelet")
    assert systemctl(root, "start", "kubelet").returncode == 0
    started = _units(root)["kubelet.service"]["pid"]
    assert isinstance(started, int) and pid_alive(started)
    reset = run_kubeadm(root, "reset", "-f", "--cri-socket=unix:///var/run/cri-dockerd.sock")
    assert reset.returncode == 0, reset.stderr
    assert "[reset] Stopping the kubelet service" in reset.stdout
    deadline = time.monotonic() + 10
    while pid_alive(started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(started)


def test_without_systemctl_kubeadm_says_there_is_no_init_system(tmp_path: Path) -> None:
    root = tmp_path / "bare"
    config = tmp_path / "kubeadm.yaml"
    config.write_text(config_v1beta4(port=free_port(), healthz_port=free_port()))
    result = run_kubeadm(root, "init", "phase", "kubelet-start", f"--config={config}")
    assert result.returncode == 0, result.stderr
    assert "No supported init system detected, won't make sure the kubelet is running properly." in result.stdout
